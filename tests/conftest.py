"""Test setup shared by every test file.

Without a GPU, Triton kernels run under its interpreter (NumPy on CPU tensors). The
variable is read when `@triton.jit` decorates a function, so it must be set here, before
any test module imports gpurnn. On a machine with CUDA the kernels run for real.
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Inputs are fresh every session, yet reproducible: tests that seed their own generators
# mix this in, and the header prints it (GPURNN_TEST_SEED=<n> reruns the same draw).
TEST_SEED = int(os.environ.get("GPURNN_TEST_SEED", random.randrange(2**31)))
os.environ["GPURNN_TEST_SEED"] = str(TEST_SEED)  # the same draw in xdist workers


def pytest_report_header(config):
    return f"gpurnn test seed: {TEST_SEED} (GPURNN_TEST_SEED={TEST_SEED} reproduces this run)"


def seeded_generator(*key) -> torch.Generator:
    """A CPU generator for `key` (a test's parameters) in this session's draw."""
    import zlib

    return torch.Generator().manual_seed(TEST_SEED ^ zlib.crc32(repr(key).encode()))


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the tests marked slow (left out by default, unless -m names slow)",
    )


def pytest_collection_modifyitems(config, items):
    # `slow`: larger or rarer cases (e.g. the CUDA build for sm_80 beside sm_90's), kept
    # out of `make test` so that it stays within a few minutes on two cores
    run_slow = config.getoption("--slow") or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: run with --slow (or -m slow)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    on_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)
