"""Test setup shared by every test file.

Without a GPU, Triton kernels run under its interpreter (NumPy on CPU tensors). The
variable is read when `@triton.jit` decorates a function, so it must be set here, before
any test module imports gpurnn. On a machine with CUDA the kernels run for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
