"""The CUDA kernels' step and index arithmetic, on CPU.

kernels/cuda/rnn_index.cuh holds every time-index and offset computation of the persistent
kernels (rnn_persistent.cu). Compiled here as plain C++ (tests/cuda_index_probe.cpp walks the
steps as the kernels do and exports what they would read and write), it is compared with the
float64 reference's loops (gpurnn/reference.py): the order in which each row's steps run,
the state each backward step starts from, the step whose dgates each backward GEMM adds, and
every offset against the size of its buffer up to T = 100 000. Skipped without a C++ compiler.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gpurnn import reference
from tests.conftest import seeded_generator

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER_DIR = os.path.join(os.path.dirname(HERE), "kernels", "cuda")
PROBE = os.path.join(HERE, "cuda_index_probe.cpp")
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

INT_P = np.ctypeslib.ndpointer(np.int32, flags="C")
I64_P = np.ctypeslib.ndpointer(np.int64, flags="C")


def build_probe(out_dir, *defines: str) -> str:
    lib = os.path.join(out_dir, "libprobe" + "".join(d.lower() for d in defines) + ".so")
    cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-I", HEADER_DIR,
           *(f"-D{d}" for d in defines), PROBE, "-o", lib]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return lib


def load_probe(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    c_int, c_ll = ctypes.c_int, ctypes.c_longlong
    lib.forward_schedule.argtypes = [c_int, c_int, c_int, I64_P, INT_P, INT_P, I64_P]
    lib.backward_schedule.argtypes = [c_int, c_int, c_int, I64_P, INT_P, INT_P, INT_P, I64_P, I64_P]
    lib.count_out_of_bounds.argtypes = [c_int] * 6 + [I64_P, c_int]
    lib.count_out_of_bounds.restype = c_ll
    lib.offset_at.argtypes = [c_ll, c_int, c_ll, c_int]
    lib.offset_at.restype = c_ll
    return lib


@pytest.fixture(scope="module")
def probe_path(tmp_path_factory):
    return build_probe(str(tmp_path_factory.mktemp("probe")))


@pytest.fixture(scope="module")
def probe(probe_path):
    return load_probe(probe_path)


def forward_schedule(probe, T, B, reverse, lengths):
    time = np.zeros(T, np.int32)
    valid = np.zeros((T, B), np.int32)
    row = np.zeros((T, B), np.int64)
    probe.forward_schedule(T, B, int(reverse), lengths, time, valid, row)
    return time, valid.astype(bool), row


def backward_schedule(probe, T, B, reverse, lengths):
    time = np.zeros(T + 1, np.int32)
    source = np.zeros(T + 1, np.int32)
    valid = np.zeros((T, B), np.int32)
    cur = np.zeros((T, B), np.int64)
    prev = np.zeros((T, B), np.int64)
    probe.backward_schedule(T, B, int(reverse), lengths, time, source, valid, cur, prev)
    return time, source, valid.astype(bool), cur, prev


def reference_order(T, B, reverse, lengths) -> list[list[int]]:
    """The time indices of each row in the order the reference's forward loop visits them
    (its backward visits them reversed), read off `reference._run` with H = 1."""
    rng = np.random.default_rng(0)
    xg = rng.standard_normal((T, B, 4))
    _, _, _, caches = reference._run("lstm", xg, rng.standard_normal((4, 1)), np.zeros((B, 1)),
                                     np.zeros((B, 1)), lengths, reverse, None, None)  # fmt: skip
    return [[t for t, _ in seq] for seq in caches]


def length_patterns(T, B, gen):
    yield "full", np.full(B, T, np.int64)
    if T > 0:
        yield "random", np.random.default_rng(int(gen.integers(2**31))).integers(0, T + 1, B)
    yield "empty", np.zeros(B, np.int64)
    yield "ones", np.minimum(np.ones(B, np.int64), T)
    yield "short last", np.maximum(np.arange(T, T - B, -1, dtype=np.int64), 0)


def cases(T, reverse):
    """(B, name, lengths) for many batch sizes and length patterns."""
    gen = np.random.default_rng(seeded_generator("index", T, reverse).initial_seed() % 2**31)
    for B in (1, 2, 5, 9):
        for name, lengths in length_patterns(T, B, gen):
            yield B, name, lengths.astype(np.int64)


SIZES = [1, 2, 3, 7, 16, 33]


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_follows_the_reference_loop(probe, T, reverse):
    for B, name, lengths in cases(T, reverse):
        check_forward(probe, T, B, reverse, lengths, f"B={B} lengths {name}")


def check_forward(probe, T, B, reverse, lengths, what):
    time, valid, row = forward_schedule(probe, T, B, reverse, lengths)
    order = reference_order(T, B, reverse, lengths)
    assert sorted(time.tolist()) == list(range(T)), "every time index once"
    np.testing.assert_array_equal(row, time[:, None] * B + np.arange(B)[None, :])
    for b in range(B):
        assert [int(t) for s, t in enumerate(time) if valid[s, b]] == order[b], f"{what} row {b}"
        # the state carried past invalid steps: each valid step starts from the previous one
        state, starts_from = -1, {}
        for s, t in enumerate(time):
            if valid[s, b]:
                starts_from[int(t)], state = state, int(t)
        assert starts_from == {t: order[b][i - 1] if i else -1 for i, t in enumerate(order[b])}


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("reverse", [False, True])
def test_backward_follows_the_reference_loop(probe, T, reverse):
    """Backward: each row's valid steps run in the reference's backward order, each reads
    the state it started from at its forward predecessor (or h0/c0), and the dgates reaching
    dh_t through the recurrent GEMM are those of t's forward successor, as in the
    reference's chain rule."""
    for B, name, lengths in cases(T, reverse):
        check_backward(probe, T, B, reverse, lengths, f"B={B} lengths {name}")


def check_backward(probe, T, B, reverse, lengths, what):
    time, source, valid, cur, prev = backward_schedule(probe, T, B, reverse, lengths)
    order = reference_order(T, B, reverse, lengths)
    assert time[T] == -1 and source[0] == -1
    np.testing.assert_array_equal(source[1:], time[:-1], "the GEMM reads the previous step's")
    np.testing.assert_array_equal(cur, time[:T, None] * B + np.arange(B)[None, :])
    for b in range(B):
        seq = order[b]
        assert [int(time[s]) for s in range(T) if valid[s, b]] == seq[::-1], f"{what} row {b} order"
        for s in range(T):
            if not valid[s, b]:
                assert prev[s, b] == -1
                continue
            i = seq.index(int(time[s]))
            expected = seq[i - 1] * B + b if i > 0 else -1
            assert prev[s, b] == expected, (
                f"{what} row {b}, t={time[s]}: reads its starting state at row {prev[s, b]}, "
                f"the reference at {expected} (-1: h0/c0)"
            )

        # dh flow, symbolically: what reaches each valid step's dh, and dh0. The kernel adds
        # W_hh^T dgates(source) where source is valid for the row (its exchange row holds
        # zeros otherwise) to the carry, which a valid step replaces by its own direct term
        # and an invalid step passes on.
        carry, reaching = {"dh_T"}, {}
        for s in range(T + 1):
            incoming = set(carry)
            if 0 <= source[s] < lengths[b]:
                incoming.add(("W", int(source[s])))
            if s == T:
                dh0 = incoming
            elif valid[s, b]:
                reaching[int(time[s])] = incoming
                carry = {("direct", int(time[s]))}
            else:
                carry = incoming
        ref_reaching, dh = {}, {"dh_T"}
        for t in reversed(seq):  # reference.recurrence_backward's loop
            ref_reaching[t] = dh
            dh = {("W", t), ("direct", t)}
        assert reaching == ref_reaching, f"{what} row {b}"
        assert dh0 == dh, f"{what} row {b}: dh0"


@pytest.mark.parametrize("T", [1, 2, 1000, 100_000])
@pytest.mark.parametrize("reverse", [False, True])
def test_every_access_stays_inside_its_buffer(probe, T, reverse):
    """Both kernels' reads and writes for every step, up to T = 100 000 (the size at which
    a step index past the end of the workspace used to cross a page boundary), with lengths
    full, empty, 1, random and T - b."""
    B, H = 9, 48
    gen = np.random.default_rng(T + reverse)
    for (name, lengths), (G, F), group in itertools.product(
        length_patterns(T, B, gen), [(4, 5), (3, 4), (1, 0)], [8, 16]
    ):
        bad = probe.count_out_of_bounds(T, B, H, G, F, int(reverse), lengths.astype(np.int64),
                                        group)  # fmt: skip
        assert bad == 0, f"{bad} accesses outside their buffer: T={T} G={G} lengths {name}"


def test_offsets_are_64_bit(probe):
    """T * B * G * H passes 2**31 at real sizes: the offsets must not wrap."""
    T, B, H, G = 100_000, 64, 1024, 4
    TB = T * B
    last = probe.offset_at(TB - 1, G * H - 1, TB, G * H)
    assert last == TB * G * H - 1 > 2**31
    lengths = np.full(B, T, np.int64)
    assert probe.count_out_of_bounds(T, B, H, G, 5, 0, lengths, 16) == 0


def test_debug_bounds_trap(tmp_path):
    """With GPURNN_DEBUG_BOUNDS the offset functions trap on an index outside the buffer
    (the same code traps on the GPU), and stay silent over a whole valid schedule."""
    lib = build_probe(str(tmp_path), "GPURNN_DEBUG_BOUNDS")
    # a separate process (the trap kills it), importing nothing heavy
    program = (
        "import ctypes as c; p = c.CDLL({lib!r});"
        "p.count_out_of_bounds.restype = p.offset_at.restype = c.c_longlong;"
        "p.offset_at.argtypes = [c.c_longlong, c.c_int, c.c_longlong, c.c_int];"
        "n = p.count_out_of_bounds(50, 3, 8, 4, 5, 1, (c.c_longlong * 3)(50, 0, 7), 8);"
        "print('schedule', n, flush=True);"
        "p.offset_at({row}, 0, 10, 4)"
    )
    ok = subprocess.run([sys.executable, "-c", program.format(lib=lib, row=9)],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0 and "schedule 0" in ok.stdout, ok.stderr[-2000:]
    for row in (10, -1):
        bad = subprocess.run([sys.executable, "-c", program.format(lib=lib, row=row)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert "schedule 0" in bad.stdout, bad.stderr[-2000:]
        assert bad.returncode < 0, f"row {row}: no trap ({bad.returncode})"
