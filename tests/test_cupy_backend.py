"""The `cupy` backend.

CPU (always): gpurnn imports and reports the backend unavailable with a clear reason when CuPy
is absent; asking for it by name raises; the launch planner and the weight packing (the
tensor-core fragment order the kernels read) are checked against their definitions.

GPU (@pytest.mark.gpu, skipped without CUDA): every cell x dtype x direction x lengths x h0
at real sizes against the float64 reference (outputs and every gradient) and torch.nn.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import math
import re
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import gpurnn
from gpurnn import reference
from gpurnn.backends import cupy as cupy_backend
from gpurnn.backends.base import Inputs
from gpurnn.backends.cupy import compile as cupy_compile
from gpurnn.backends.cupy import launch as cupy_launch
from gpurnn.backends.cupy import plan as cupy_plan
from gpurnn.backends.cupy.pack import block_rows, lstmp_block_rows, pack_fragments
from gpurnn.backends.cupy.plan import (
    CLUSTER_SIZE,
    MMA_K,
    PROJ_OUT_ROWS,
    plan_launch,
    plan_lstmp_launch,
    units_per_block,
)
from gpurnn.cells import GATES
from tests.conftest import seeded_generator
from tests.helpers import make_torch_module

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
H100 = dict(sm_count=132, smem_limit=227 * 1024, has_clusters=True)
A100 = dict(sm_count=108, smem_limit=163 * 1024, has_clusters=False)


# ------------------------------------------------------------------ without CuPy


@pytest.fixture
def no_cupy(monkeypatch):
    """As if CuPy were not installed: `import cupy` raises ImportError."""
    import gpurnn.backends as registry

    for name in [m for m in sys.modules if m == "cupy" or m.startswith("cupy.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(registry, "_instances", {})
    monkeypatch.setattr(registry, "_import_errors", {})
    yield


def test_reason_without_cupy(no_cupy):
    reason = gpurnn.available_backends()["cupy"]
    assert reason is not None and "CuPy is not installed" in reason
    assert "pip install gpurnn[cupy13]" in reason


def test_module_imports_without_cupy(no_cupy, monkeypatch):
    monkeypatch.delitem(sys.modules, "gpurnn.backends.cupy")
    module = importlib.import_module("gpurnn.backends.cupy")
    assert module.CupyBackend().unavailable_reason().startswith("CuPy is not installed")


def test_asking_for_cupy_without_it_raises(no_cupy):
    xg, w_hh = torch.randn(3, 2, 8), torch.randn(8, 2)
    with pytest.raises(RuntimeError, match="backend 'cupy' cannot run this case: CuPy is not"):
        gpurnn.recurrence("lstm", xg, w_hh, backend="cupy")
    # auto never trips over it
    y, _, _ = gpurnn.recurrence("lstm", xg, w_hh)
    assert y.shape == (3, 2, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_reason_without_gpu():
    pytest.importorskip("cupy")
    assert cupy_backend.CupyBackend().unavailable_reason() == "no CUDA device"


def test_unsupported_cases(monkeypatch):
    backend = cupy_backend.CupyBackend()
    cuda = torch.device("cuda", 0)
    assert "float64" in backend.unsupported_reason("lstm", cuda, torch.float64, False)
    assert "float64" in backend.unsupported_reason("lstm", cuda, torch.float64, True)
    cpu = torch.device("cpu")
    assert "CUDA tensors" in backend.unsupported_reason("gru", cpu, torch.float32, False)
    assert "CUDA tensors" in backend.unsupported_reason("lstm", cpu, torch.float32, True)
    # projections run in the grid variant only
    monkeypatch.setenv("GPURNN_CUPY_VARIANT", "cluster")
    cluster = cupy_backend.CupyBackend()
    assert "grid variant" in cluster.unsupported_reason("lstm", cuda, torch.float16, True)
    inputs = Inputs("lstm", torch.randn(3, 2, 16), torch.randn(16, 2), w_hr=torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="grid variant"):
        cluster.forward(inputs, True)


def test_auto_leaves_projections_to_others_until_gpu_tested():
    backend = cupy_backend.CupyBackend()
    assert "GPU tests" in backend.auto_reason("lstm", True)
    assert backend.auto_reason("lstm", False) is None


# ------------------------------------------------------------------ plan


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("variant", ["auto", "grid", "cluster"])
def test_plan_invariants(cell, dtype, direction, variant):
    for H, B, device in itertools.product([1, 40, 96, 256, 500, 768, 1024], [1, 8, 9, 64],
                                          [H100, A100]):  # fmt: skip
        plan = plan_launch(direction, cell, dtype, H, B, **device, variant=variant)
        if plan is None:
            continue
        assert plan.variant == ("cluster" if variant == "cluster" else "grid")
        assert plan.shared_bytes <= device["smem_limit"]
        assert plan.units == units_per_block(direction, cell, plan.m_tiles)
        K = H if direction == "forward" else GATES[cell] * H
        assert plan.K == K and plan.KT * MMA_K[dtype] >= K
        if plan.variant == "grid":
            assert plan.blocks * plan.units >= H and plan.blocks <= device["sm_count"]
            assert plan.batch_rows >= B and plan.batch_rows % (8 * plan.n_tiles) == 0
            assert plan.n_tiles == (1 if B <= 8 else 2)  # B <= 8 pays for one n-tile
        else:
            assert device["has_clusters"]
            assert CLUSTER_SIZE * plan.units >= H
            assert plan.blocks == CLUSTER_SIZE * math.ceil(B / 8)
            # fp32 planes, rows padded for conflict-free fragment loads, and two mbarriers
            assert plan.ldx >= plan.KT * MMA_K[dtype] and plan.ldx % 32 in (4, 8)
            assert plan.shared_bytes % 16 == 0
        assert plan.kernel_name(cell, dtype) in cupy_plan.kernel_names(clusters=True)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_cluster_tiles_built_are_the_tiles_used(cell, dtype, direction):
    """The cluster instantiations compiled (`cluster_m_tiles`) are exactly those an H100
    plan can pick for some hidden size."""
    used = set()
    for H in range(1, 1100, 3):
        plan = plan_launch(direction, cell, dtype, H, 1, **H100, variant="cluster")
        if plan is not None:
            used.add(plan.m_tiles)
    assert used == set(cupy_plan.cluster_m_tiles(direction, cell, dtype))


def test_plan_covers_the_benchmark_shapes():
    """H=768, B=16 (the benchmark's main LSTM shape) runs in every cell and 16-bit dtype."""
    for cell, dtype, direction in itertools.product(
        CELLS, [torch.bfloat16, torch.float16], ["forward", "backward"]
    ):
        plan = plan_launch(direction, cell, dtype, 768, 16, **H100)
        assert plan is not None and plan.variant == "grid", (cell, dtype, direction)
    # the cluster variant only when asked for (its step has not yet run on a GPU)
    assert plan_launch("forward", "lstm", torch.bfloat16, 128, 4, **H100).variant == "grid"
    forced = plan_launch("forward", "lstm", torch.bfloat16, 128, 4, **H100, variant="cluster")
    assert forced.variant == "cluster"
    for cell, H in (("lstm", 256), ("gru", 256), ("rnn_tanh", 512)):  # the GPU tests' sizes
        for direction in ("forward", "backward"):
            plan = plan_launch(direction, cell, torch.bfloat16, H, 16, **H100, variant="cluster")
            assert plan is not None and plan.variant == "cluster", (cell, direction)
    assert plan_launch("forward", "lstm", torch.bfloat16, 128, 4, **A100, variant="cluster") is None


# ------------------------------------------------------------------ fragment packing


def unpack_fragments(packed: torch.Tensor, dtype, m_tiles: int, K: int) -> np.ndarray:
    """Rebuild each block's A (P, 16*m_tiles, K) from packed fragments, reading the PTX ISA
    fragment tables directly (mma.m16n8k16 / m16n8k8.tf32, operand A, .row)."""
    P = packed.shape[0]
    k = MMA_K[dtype]
    KT = math.ceil(K / k)
    words = packed.cpu().numpy().reshape(P, m_tiles, KT, -1, 32, 4)
    A = np.zeros((P, 16 * m_tiles, KT * k))
    for mt, kt, lane, reg in itertools.product(range(m_tiles), range(KT), range(32), range(4)):
        g, q = lane // 4, lane % 4
        row = 16 * mt + g + 8 * (reg % 2)
        if dtype == torch.float32:
            col = 8 * kt + q + 4 * (reg // 2)
            hi = words[:, mt, kt, 0, lane, reg].view(np.float32)
            lo = words[:, mt, kt, 1, lane, reg].view(np.float32)
            A[:, row, col] = hi.astype(np.float64) + lo
        else:
            col = 16 * kt + 2 * q + 8 * (reg // 2)
            pair = words[:, mt, kt, 0, lane, reg].astype(np.uint32)
            halves = np.stack([pair & 0xFFFF, pair >> 16], -1).astype(np.uint16)
            torch_halves = torch.from_numpy(halves.view(np.int16)).view(dtype).double()
            A[:, row, col : col + 2] = torch_halves.numpy()
    return A[:, :, :K]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m_tiles", [1, 2])
def test_pack_matches_ptx_fragment_layout(dtype, m_tiles):
    P, rows, K = 3, 16 * m_tiles - 3, 40
    a = torch.randn(P, rows, K).to(dtype)
    packed = pack_fragments(a, m_tiles)
    A = unpack_fragments(packed, dtype, m_tiles, K)
    expected = np.zeros_like(A)
    expected[:, :rows] = a.double().numpy()
    if dtype == torch.float32:
        np.testing.assert_allclose(A, expected, rtol=2e-7, atol=0)  # hi + lo ~ exact fp32
        hi = packed.view(P, m_tiles, -1, 2, 32, 4)[:, :, :, 0].view(torch.int32)
        assert not (hi & 0x1FFF).any(), "hi halves must be exact tf32"
    else:
        np.testing.assert_array_equal(A, expected)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_block_rows_feed_the_kernel_epilogue(cell, direction):
    """A_p @ h gives what the kernel epilogue expects: forward, row g*units + u of block p is
    gate g of unit p*units + u; backward, row u is (dgates @ W_hh)[unit p*units + u]."""
    G, H, B = GATES[cell], 37, 3
    plan = plan_launch(direction, cell, torch.float32, H, B, **A100)
    w_hh = torch.randn(G * H, H, dtype=torch.float64)
    A = block_rows(direction, cell, w_hh, plan)
    x = torch.randn(B, A.shape[-1], dtype=torch.float64)
    D = A @ x.t()  # (P, rows, B)
    full = x @ (w_hh.t() if direction == "forward" else w_hh)  # (B, G*H) or (B, H)
    for p, u in itertools.product(range(plan.blocks), range(plan.units)):
        j = p * plan.units + u
        if j >= H:
            assert (A[p, u :: plan.units] == 0).all() if direction == "forward" else True
            continue
        if direction == "forward":
            for g in range(G):
                torch.testing.assert_close(D[p, g * plan.units + u], full[:, g * H + j])
        else:
            torch.testing.assert_close(D[p, u], full[:, j])


# ------------------------------------------------------------------ LSTM with projection


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_lstmp_plan_invariants(dtype, direction):
    names = set(cupy_plan.kernel_names(clusters=False))
    for (H, P), B, device in itertools.product(
        [(2, 1), (40, 17), (96, 40), (256, 128), (1024, 256), (1024, 512), (2048, 512)],
        [1, 8, 9, 64],
        [H100, A100],
    ):
        plan = plan_lstmp_launch(direction, dtype, H, P, B, **device)
        if plan is None:
            continue
        assert plan.variant == "grid" and plan.proj == P
        assert plan.shared_bytes <= device["smem_limit"]
        assert plan.units == units_per_block(direction, "lstm", plan.m_tiles)
        # every unit and every projected output has its block, all of them resident
        assert plan.blocks * plan.units >= H and plan.blocks * PROJ_OUT_ROWS >= P
        assert plan.blocks <= device["sm_count"]
        k = MMA_K[dtype]
        assert plan.K == P and plan.ldx == plan.KT * k >= P  # the units' GEMM: K = P
        out_K = H if direction == "forward" else 4 * H
        assert plan.out_ldx == plan.out_KT * k >= out_K
        assert plan.batch_rows >= B and plan.batch_rows % (8 * plan.n_tiles) == 0
        assert plan.kernel_name("lstm", dtype) in names
    # the GPU tests' real sizes run on an H100
    for d, (dt, H, P) in itertools.product(
        ["forward", "backward"],
        [(torch.bfloat16, 1024, 256), (torch.float16, 1024, 256), (torch.float32, 384, 128)],
    ):
        assert plan_lstmp_launch(d, dt, H, P, 16, **H100) is not None


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("H, P, B", [(37, 11, 3), (40, 33, 2)])
def test_lstmp_block_rows_feed_the_kernel_epilogue(direction, H, P, B):
    """The two A matrices of every block give what the kernel's two phases expect. Forward:
    units' row g*units + u of block p is gate g of unit p*units + u of W_hh h (h P wide),
    output row r is (W_hr m)[16p + r]; backward: units' row u is (W_hr^T dh)[unit], output
    row r is (W_hh^T dgates)[16p + r]."""
    plan = plan_lstmp_launch(direction, torch.float32, H, P, B, **A100)
    w_hh = torch.randn(4 * H, P, dtype=torch.float64)
    w_hr = torch.randn(P, H, dtype=torch.float64)
    units, outs = lstmp_block_rows(direction, w_hh, w_hr, plan)
    assert units.shape[0] == plan.blocks and outs.shape[:2] == (math.ceil(P / 16), 16)
    x_units = torch.randn(B, P, dtype=torch.float64)  # h_{t-1} forward, dh_t backward
    x_outs = torch.randn(B, H if direction == "forward" else 4 * H, dtype=torch.float64)
    D_units, D_outs = units @ x_units.t(), outs @ x_outs.t()
    full_units = x_units @ (w_hh.t() if direction == "forward" else w_hr)  # (B, 4H) / (B, H)
    full_outs = x_outs @ (w_hr.t() if direction == "forward" else w_hh)  # (B, P)
    for p, u in itertools.product(range(plan.blocks), range(plan.units)):
        j = p * plan.units + u
        rows = [g * plan.units + u for g in range(4)] if direction == "forward" else [u]
        cols = [g * H + j for g in range(4)] if direction == "forward" else [j]
        for row, col in zip(rows, cols):
            if j >= H:
                assert (units[p, row] == 0).all()
            else:
                torch.testing.assert_close(D_units[p, row], full_units[:, col])
    for p, r in itertools.product(range(outs.shape[0]), range(PROJ_OUT_ROWS)):
        if 16 * p + r >= P:
            assert (outs[p, r] == 0).all()
        else:
            torch.testing.assert_close(D_outs[p, r], full_outs[:, 16 * p + r])


# ------------------------------------------------------------------ GPU
#
# Quick on purpose (they run in a time-limited stage of the device check): the full matrix at
# small sizes (T=24, H=96, B=1 and B=11: one and two n-tiles, a partial cluster), both
# variants, then a few real-size cases. Each test prints one line with its time and
# largest errors, also under `pytest -q`.

# max |actual - expected| / max(1, max |expected|) per dtype
GPU_TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def assert_scaled_close(actual, expected, dtype, what, errors=None, key=None):
    actual = actual.detach().double().cpu().numpy()
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values (an unwritten output?)"
    err = np.abs(actual - expected).max(initial=0.0) / max(1.0, np.abs(expected).max(initial=0.0))
    if errors is not None:
        errors[key] = max(errors.get(key, 0.0), err)
    assert err <= GPU_TOLERANCE[dtype], f"{what}: scaled error {err:.3g} ({dtype})"


@pytest.fixture
def gpu_report(request, capsys):
    """Largest error per quantity; printed as one line per test when it ends."""
    errors: dict[str, float] = {}
    start = time.perf_counter()
    yield errors
    elapsed = time.perf_counter() - start
    worst = ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
    with capsys.disabled():
        print(f"\n[cupy gpu] {request.node.name}: {elapsed:.1f} s; max scaled error {worst}")


def _poison_allocations(monkeypatch):
    """Every torch.empty the backend makes starts as NaN, so an element a kernel forgot to
    write fails the comparison."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(cupy_backend.torch, "empty", nan_empty)


def _cupy_with_variant(monkeypatch, variant, cell, dtype, H, B, proj=0):
    """The registry's cupy backend forced to `variant`; skips where it cannot run here
    (`proj`: the LSTM-with-projection kernels for proj_size `proj`)."""
    if gpurnn.available_backends()["cupy"] is not None:
        pytest.skip(gpurnn.available_backends()["cupy"])
    monkeypatch.setenv("GPURNN_CUPY_VARIANT", variant)
    import gpurnn.backends as registry

    monkeypatch.setattr(registry, "_instances", {})
    backend = registry.get_backend("cupy")
    device = torch.device("cuda", torch.cuda.current_device())
    for direction in ("forward", "backward"):
        if backend.plan(direction, cell, dtype, H, B, device, proj=proj) is None:
            pytest.skip(f"no {variant} {direction} plan for {cell} H={H} P={proj} {dtype} "
                        "on this GPU")  # fmt: skip
    return backend


def check_against_reference(monkeypatch, gpu_report, variant, dtype, cell, B):
    """Every direction x lengths x h0 combination against the float64 reference: outputs,
    final states and every gradient."""
    T, H = 24, 96
    backend = _cupy_with_variant(monkeypatch, variant, cell, dtype, H, B)
    _poison_allocations(monkeypatch)
    G = GATES[cell]
    gen = seeded_generator(B, cell, variant, str(dtype))
    for reverse, with_lengths, with_h0 in itertools.product([False, True], repeat=3):

        def rand(*shape, scale=1.0):
            t = (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
            return t.cuda().requires_grad_(True)

        xg, w_hh = rand(T, B, G * H), rand(G * H, H, scale=H**-0.5)
        h0 = rand(B, H) if with_h0 else None
        c0 = rand(B, H) if with_h0 and cell == "lstm" else None
        b_hn = rand(H) if cell == "gru" else None
        lengths = None
        if with_lengths:
            lengths = torch.randint(0, T + 1, (B,), generator=gen)
            lengths[0] = T
        y, h_T, c_T = gpurnn.recurrence(cell, xg, w_hh, h0, c0, lengths=lengths,
                                        reverse=reverse, b_hn=b_hn, backend="cupy")  # fmt: skip
        dy = torch.randn(T, B, H, generator=gen, dtype=torch.float64).to(dtype).cuda()
        dh_T = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype).cuda()
        dc_T = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype).cuda()
        dc_T = dc_T if cell == "lstm" else None
        outs = [y, h_T] + ([c_T] if c_T is not None else [])
        torch.autograd.backward(outs, [dy, dh_T] + ([dc_T] if c_T is not None else []))

        def np_(t):
            return None if t is None else t.detach().double().cpu().numpy()

        args = (cell, np_(xg), np_(w_hh), np_(h0), np_(c0),
                None if lengths is None else lengths.numpy(), reverse, np_(b_hn), None)  # fmt: skip
        what = f"{cell} {dtype} B={B} reverse={reverse} lengths={with_lengths} h0={with_h0}"
        ry, rh, rc = reference.recurrence_forward(*args)
        assert_scaled_close(y, ry, dtype, f"y {what}", gpu_report, "y")
        assert_scaled_close(h_T, rh, dtype, f"h_T {what}", gpu_report, "h_T")
        if cell == "lstm":
            assert_scaled_close(c_T, rc, dtype, f"c_T {what}", gpu_report, "c_T")
        rg = reference.recurrence_backward(*args, np_(dy), np_(dh_T), np_(dc_T))
        inputs = {"xg": xg, "w_hh": w_hh, "h0": h0, "c0": c0, "b_hn": b_hn}
        got = {name: None if t is None else t.grad for name, t in inputs.items()}
        if cell == "rnn_relu":
            # relu's derivative jumps at 0: where a 16-bit forward and the float64 one put a
            # pre-activation on opposite sides of 0, their gradients differ by O(1) there,
            # rightly. So the backward runs on the reference's own output here (same signs).
            grads = backend.backward(
                Inputs(cell, None, w_hh.detach(), None if h0 is None else h0.detach(), None,
                       None if lengths is None else lengths.cuda(), reverse),
                torch.from_numpy(ry).to(dtype).cuda(), torch.empty(0, device="cuda"),
                dy, dh_T, None,
            )  # fmt: skip
            got.update(xg=grads.xg, w_hh=grads.w_hh, h0=grads.h0)
        for name, t in got.items():
            if t is not None:
                assert_scaled_close(t, rg[name], dtype, f"d{name} {what}", gpu_report, "d" + name)


# in the order of what a cut-short run should still have checked: the default (grid)
# variant, the real sizes, then the cluster variant


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 11])
def test_gpu_grid_matches_reference(monkeypatch, gpu_report, dtype, cell, B):
    check_against_reference(monkeypatch, gpu_report, "grid", dtype, cell, B)


@pytest.mark.gpu
@pytest.mark.parametrize("checked", [False, True], ids=["plain", "bounds-checked"])
@pytest.mark.parametrize("cell, variant, H, reverse", [
    ("lstm", "grid", 768, False),  # the shape whose backward used to read past the workspace
    ("gru", "grid", 768, True),
    ("lstm", "cluster", 256, False),
    ("rnn_tanh", "cluster", 512, True),
])  # fmt: skip
def test_gpu_long_sequence_matches_torch_backend(monkeypatch, gpu_report, cell, variant, H,
                                                 reverse, checked):  # fmt: skip
    """Real size, T=1024, B=16, bf16, uneven lengths, against the torch backend (fp32 math,
    the same inputs); once as shipped and once built with GPURNN_DEBUG_BOUNDS=1, which traps
    at the first index outside its buffer."""
    T, B, dtype = 1024, 16, torch.bfloat16
    _cupy_with_variant(monkeypatch, variant, cell, dtype, H, B)
    monkeypatch.setenv("GPURNN_DEBUG_BOUNDS", "1" if checked else "0")
    G = GATES[cell]
    gen = seeded_generator("long", cell, H)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).cuda()

    # recurrent weights at torch.nn's initial scale (~0.58 / sqrt(H)): over 1024 steps a
    # gain near 1 would let 16-bit rounding grow chaotically in either backend
    xg, w_hh, h0 = rand(T, B, G * H), rand(G * H, H, scale=0.6 * H**-0.5), rand(B, H)
    c0 = rand(B, H) if cell == "lstm" else None
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    dy, dh_T = rand(T, B, H), rand(B, H)
    dc_T = rand(B, H) if cell == "lstm" else None
    results = {}
    for backend in ("cupy", "torch"):
        inputs = [t.detach().clone().requires_grad_(True) if t is not None else None
                  for t in (xg, w_hh, h0, c0)]  # fmt: skip
        y, h_T, c_T = gpurnn.recurrence(cell, *inputs, lengths=lengths, reverse=reverse,
                                        backend=backend)  # fmt: skip
        outs, grads = [y, h_T], [dy, dh_T]
        if c_T is not None:
            outs, grads = outs + [c_T], grads + [dc_T]
        torch.autograd.backward(outs, grads)
        torch.cuda.synchronize()
        results[backend] = {"y": y, "h_T": h_T, "c_T": c_T, "dxg": inputs[0].grad,
                            "dw_hh": inputs[1].grad, "dh0": inputs[2].grad,
                            "dc0": inputs[3].grad if c0 is not None else None}  # fmt: skip
    for name, ours in results["cupy"].items():
        if ours is not None:
            expected = results["torch"][name].detach().double().cpu().numpy()
            assert_scaled_close(ours, expected, dtype, f"{name} {cell} H={H}", gpu_report, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 11])
def test_gpu_cluster_matches_reference(monkeypatch, gpu_report, dtype, cell, B):
    check_against_reference(monkeypatch, gpu_report, "cluster", dtype, cell, B)


def check_lstmp_against_reference(monkeypatch, gpu_report, dtype, T, B, H, P):
    """LSTM with projection (grid kernels), every direction x lengths x h0/c0 combination
    against the float64 reference: y, h_T, c_T and the gradients of xg, W_hh, W_hr, h0, c0."""
    _cupy_with_variant(monkeypatch, "grid", "lstm", dtype, H, B, proj=P)
    _poison_allocations(monkeypatch)
    gen = seeded_generator("lstmp", T, B, H, P, str(dtype))
    for reverse, with_lengths, with_h0 in itertools.product([False, True], repeat=3):

        def rand(*shape, scale=1.0):
            t = (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
            return t.cuda().requires_grad_(True)

        xg = rand(T, B, 4 * H)
        w_hh, w_hr = rand(4 * H, P, scale=P**-0.5), rand(P, H, scale=H**-0.5)
        h0 = rand(B, P) if with_h0 else None
        c0 = rand(B, H) if with_h0 else None
        lengths = None
        if with_lengths:
            lengths = torch.randint(0, T + 1, (B,), generator=gen)
            lengths[0] = T
        y, h_T, c_T = gpurnn.recurrence("lstm", xg, w_hh, h0, c0, lengths=lengths,
                                        reverse=reverse, w_hr=w_hr, backend="cupy")  # fmt: skip
        dy = torch.randn(T, B, P, generator=gen, dtype=torch.float64).to(dtype).cuda()
        dh_T = torch.randn(B, P, generator=gen, dtype=torch.float64).to(dtype).cuda()
        dc_T = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype).cuda()
        torch.autograd.backward([y, h_T, c_T], [dy, dh_T, dc_T])

        def np_(t):
            return None if t is None else t.detach().double().cpu().numpy()

        args = ("lstm", np_(xg), np_(w_hh), np_(h0), np_(c0),
                None if lengths is None else lengths.numpy(), reverse, None, np_(w_hr))  # fmt: skip
        what = (f"lstm H={H} P={P} {dtype} T={T} B={B} reverse={reverse} "
                f"lengths={with_lengths} h0={with_h0}")  # fmt: skip
        ry, rh, rc = reference.recurrence_forward(*args)
        assert_scaled_close(y, ry, dtype, f"y {what}", gpu_report, "y")
        assert_scaled_close(h_T, rh, dtype, f"h_T {what}", gpu_report, "h_T")
        assert_scaled_close(c_T, rc, dtype, f"c_T {what}", gpu_report, "c_T")
        rg = reference.recurrence_backward(*args, np_(dy), np_(dh_T), np_(dc_T))
        for name, t in {"xg": xg, "w_hh": w_hh, "w_hr": w_hr, "h0": h0, "c0": c0}.items():
            if t is not None:
                assert_scaled_close(t.grad, rg[name], dtype, f"d{name} {what}", gpu_report,
                                    "d" + name)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B", [1, 11])
def test_gpu_lstmp_matches_reference(monkeypatch, gpu_report, dtype, B):
    """Small odd shape: H, P not multiples of a tile, one and two n-tiles, partial groups."""
    check_lstmp_against_reference(monkeypatch, gpu_report, dtype, 24, B, 96, 40)


@pytest.mark.gpu
def test_gpu_lstmp_bounds_checked(monkeypatch, gpu_report):
    """The small odd shape once more, built with GPURNN_DEBUG_BOUNDS=1: every index of both
    phases checked against its buffer (a trap at the first one outside)."""
    monkeypatch.setenv("GPURNN_DEBUG_BOUNDS", "1")
    check_lstmp_against_reference(monkeypatch, gpu_report, torch.bfloat16, 24, 11, 96, 40)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, H, P", [
    (torch.bfloat16, 1024, 256),
    (torch.float16, 1024, 256),
    # fp32 keeps tf32 hi and lo halves: the backward's 16 x 4H W_hh columns fit a block only
    # up to H ~ 400
    (torch.float32, 384, 128),
])  # fmt: skip
def test_gpu_lstmp_real_size_matches_reference(monkeypatch, gpu_report, dtype, H, P):
    """Real sizes, B=16, T=64."""
    check_lstmp_against_reference(monkeypatch, gpu_report, dtype, 64, 16, H, P)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_lstmp_module_matches_torch_nn(monkeypatch, gpu_report, dtype):
    """A whole torch.nn.LSTM with proj_size on backend='cupy' against torch.nn itself: two
    layers, bidirectional, packed, h0/c0 given; outputs, final states and every gradient."""
    from tests.helpers import run_torch_style, uneven_lengths

    T, B, I, H, P = 32, 5, 48, 256, 64
    _cupy_with_variant(monkeypatch, "grid", "lstm", dtype, H, B, proj=P)
    gen = seeded_generator("lstmp module", str(dtype))
    ref = make_torch_module("lstm", input_size=I, hidden_size=H, num_layers=2,
                            bidirectional=True, proj_size=P, dtype=dtype).cuda()  # fmt: skip
    ours = gpurnn.convert(copy.deepcopy(ref), backend="cupy")
    x = torch.randn(T, B, I, generator=gen).to(dtype).cuda()
    h0 = torch.randn(4, B, P, generator=gen).to(dtype).cuda()
    c0 = torch.randn(4, B, H, generator=gen).to(dtype).cuda()
    lengths = uneven_lengths(B, T, gen)
    results = []
    for model in (ref, ours):
        inputs = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
        out, (h_n, c_n) = run_torch_style(model, inputs[0], tuple(inputs[1:]), lengths)
        grads = [torch.randn(t.shape, generator=seeded_generator("g", i)).to(dtype).cuda()
                 for i, t in enumerate((out, h_n, c_n))]  # fmt: skip
        torch.autograd.backward([out, h_n, c_n], grads)
        params = [p.grad for p in model.parameters()]
        results.append([out, h_n, c_n, *(t.grad for t in inputs), *params])
    names = ["output", "h_n", "c_n", "dx", "dh0", "dc0",
             *(f"d{n}" for n, _ in ref.named_parameters())]  # fmt: skip
    for name, expected, got in zip(names, *results):
        assert_scaled_close(got, expected.detach().double().cpu().numpy(), dtype, name,
                            gpu_report, name)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_matches_torch_nn(gpu_report, dtype, cell):
    """A whole gpurnn module on backend='cupy' against torch.nn (cuDNN) with the same
    weights, bidirectional and packed: outputs, final states and input gradients."""
    if gpurnn.available_backends()["cupy"] is not None:
        pytest.skip(gpurnn.available_backends()["cupy"])
    T, B, I, H = 64, 4, 96, 768
    ref = make_torch_module(cell, input_size=I, hidden_size=H, bidirectional=True, dtype=dtype)
    ref = ref.cuda()
    ours = gpurnn.convert(copy.deepcopy(ref), backend="cupy")
    x = torch.randn(T, B, I, dtype=dtype, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out_ref, hid_ref = ref(x)
    out, hid = ours(x2)
    assert_scaled_close(out, out_ref.detach().double().cpu().numpy(), dtype, f"{cell} output",
                        gpu_report, "output")  # fmt: skip
    hid, hid_ref = (hid, hid_ref) if cell != "lstm" else (hid[0], hid_ref[0])
    assert_scaled_close(hid, hid_ref.detach().double().cpu().numpy(), dtype, f"{cell} h_n",
                        gpu_report, "h_n")  # fmt: skip
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    if cell == "rnn_relu" and dtype != torch.float32:
        # relu's derivative jumps at 0, and two 16-bit forwards (cuDNN's and ours) disagree
        # on the sign of the pre-activations nearest 0: an O(1) gradient difference there,
        # rightly. test_gpu_matches_reference checks relu's backward on equal signs.
        return
    assert_scaled_close(x2.grad, x.grad.double().cpu().numpy(), dtype, f"{cell} dx",
                        gpu_report, "dx")  # fmt: skip


# ------------------------------------------------------------------ launch arguments


def _kernel_param_types(variant: str, direction: str) -> list[str]:
    """'ptr' / 'int' for each parameter of the kernel, read off the CUDA source (variant
    "lstmp": the grid kernels of the LSTM with projection)."""
    src = cupy_compile.kernel_source()

    def macro(name):
        body = re.search(rf"#define {name}(.*?)\n(#define|\n)", src, re.S).group(1)
        return body.replace("\\", " ").split(",")

    if variant == "lstmp":
        params = macro(f"GPURNN_LSTMP_{direction.upper()}_PARAMS")
        extra = macro("GPURNN_LSTMP_EXCHANGE_PARAMS")
    else:
        params = macro(f"GPURNN_{direction.upper()}_PARAMS")
        extra = {"grid": ["void* xbuf", "int ldx", "int Bpad", "u32* sync_counter"],
                 "cluster": ["int ldx"]}[variant]  # fmt: skip
    return ["ptr" if "*" in p else "int" for p in [*params, *extra]]


@pytest.mark.parametrize("variant", ["grid", "cluster"])
@pytest.mark.parametrize("cell", CELLS)
def test_launch_arguments_have_exact_c_types(monkeypatch, variant, cell):
    """Without a GPU: run the backend's glue on CPU tensors with the launch captured, and
    check every argument against the kernel's parameter list (pointers as uint64, ints as
    int32: CuPy passes numpy scalars with their own size)."""
    launches = []
    monkeypatch.setattr(cupy_backend, "launch_kernel", lambda *a: launches.append(a))
    backend = cupy_backend.CupyBackend()
    device = H100 if variant == "cluster" else A100

    def plan(direction, cell_, dtype, H, B, dev, proj=0):
        assert not proj
        return plan_launch(direction, cell_, dtype, H, B, **device, variant=variant)

    monkeypatch.setattr(backend, "plan", plan)
    T, B, H, G = 5, 3, 24, GATES[cell]
    xg, w_hh = torch.randn(T, B, G * H), torch.randn(G * H, H)
    b_hn = torch.randn(H) if cell == "gru" else None
    inputs = Inputs(cell, xg, w_hh, reverse=True, b_hn=b_hn)
    y, h_T, c_T, ws = backend.forward(inputs, True)
    assert ws.shape == backend.workspace_spec(cell, T, B, H, xg.dtype, True)[0]
    backend.backward(inputs._replace(xg=None), y.zero_(), ws,
                     torch.randn(T, B, H), torch.randn(B, H),
                     torch.randn(B, H) if cell == "lstm" else None)  # fmt: skip
    for (_, plan_, _, _, args), direction in zip(launches, ["forward", "backward"]):
        assert plan_.variant == variant and plan_.direction == direction
        kinds = _kernel_param_types(variant, direction)
        assert len(args) == len(kinds)
        for arg, kind in zip(args, kinds):
            assert type(arg) is (np.uint64 if kind == "ptr" else np.int32), (arg, kind)


def test_lstmp_launch_arguments_have_exact_c_types(monkeypatch):
    """As above for the LSTM with projection; the glue's dW_hr and dW_hh have their weights'
    shapes."""
    launches = []
    monkeypatch.setattr(cupy_backend, "launch_kernel", lambda *a: launches.append(a))
    backend = cupy_backend.CupyBackend()

    def plan(direction, cell_, dtype, H, B, dev, proj=0):
        assert proj
        return plan_lstmp_launch(direction, dtype, H, proj, B, **A100)

    monkeypatch.setattr(backend, "plan", plan)
    T, B, H, P = 5, 3, 24, 7
    xg, w_hh, w_hr = torch.randn(T, B, 4 * H), torch.randn(4 * H, P), torch.randn(P, H)
    inputs = Inputs("lstm", xg, w_hh, torch.randn(B, P), torch.randn(B, H), reverse=True,
                    w_hr=w_hr)  # fmt: skip
    y, h_T, c_T, ws = backend.forward(inputs, True)
    assert y.shape == (T, B, P) and h_T.shape == (B, P) and c_T.shape == (B, H)
    assert ws.shape == backend.workspace_spec("lstm", T, B, H, xg.dtype, True)[0]
    dy, dh_T, dc_T = torch.randn(T, B, P), torch.randn(B, P), torch.randn(B, H)
    grads = backend.backward(inputs._replace(xg=None), y.zero_(), ws.zero_(), dy, dh_T, dc_T)
    assert grads.w_hh.shape == w_hh.shape and grads.w_hr.shape == w_hr.shape
    assert grads.h0.shape == (B, P) and grads.c0.shape == (B, H) and grads.xg.shape == xg.shape
    for (_, plan_, cell, _, args), direction in zip(launches, ["forward", "backward"]):
        assert plan_.proj == P and plan_.direction == direction and cell == "lstm"
        kinds = _kernel_param_types("lstmp", direction)
        assert len(args) == len(kinds)
        for arg, kind in zip(args, kinds):
            assert type(arg) is (np.uint64 if kind == "ptr" else np.int32), (arg, kind)


def test_empty_sequence_launches_nothing(monkeypatch):
    monkeypatch.setattr(cupy_backend, "launch_kernel", lambda *a: pytest.fail("launched"))
    backend = cupy_backend.CupyBackend()
    h0 = torch.randn(2, 4)
    inputs = Inputs("lstm", torch.randn(0, 2, 16), torch.randn(16, 4), h0, torch.randn(2, 4))
    y, h_T, c_T, _ = backend.forward(inputs, False)
    assert y.shape == (0, 2, 4) and torch.equal(h_T, h0)


# ------------------------------------------------------------------ stream and debug build


class _TorchLikeStream:
    def __init__(self, handle, protocol):
        self.cuda_stream = handle
        if protocol:
            self.__cuda_stream__ = lambda: (0, handle)


@pytest.mark.parametrize("protocol", [True, False], ids=["stream-protocol", "raw-handle"])
def test_torch_stream_reaches_cupy_through_from_external(protocol):
    """torch's current stream becomes a CuPy stream with the same handle, through
    `Stream.from_external` (no GPU needed: the handle is only wrapped)."""
    cupy = pytest.importorskip("cupy")
    if not hasattr(cupy.cuda.Stream, "from_external"):
        pytest.skip("CuPy < 14 has no Stream.from_external")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # ExternalStream is deprecated
        stream = cupy_launch.cupy_stream(cupy, _TorchLikeStream(0x1234, protocol), 0)
    assert isinstance(stream, cupy.cuda.Stream) and stream.ptr == 0x1234


@pytest.mark.parametrize("value, checked", [(None, False), ("0", False), ("", False),
                                            ("1", True)])  # fmt: skip
def test_debug_bounds_switch(monkeypatch, value, checked):
    if value is None:
        monkeypatch.delenv("GPURNN_DEBUG_BOUNDS", raising=False)
    else:
        monkeypatch.setenv("GPURNN_DEBUG_BOUNDS", value)
    assert cupy_compile.debug_bounds() is checked
