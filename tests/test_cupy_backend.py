"""The `cupy` backend.

CPU (always): gpurnn imports and reports the backend unavailable with a clear reason when CuPy
is absent; asking for it by name raises; the glue's kernel arguments have the kernels' exact
C types. (The planners and the weight packing: tests/test_cupy_plan.py.)

GPU (@pytest.mark.gpu, skipped without CUDA): every cell x dtype x direction x lengths x h0
at real sizes against the float64 reference (outputs and every gradient) and torch.nn; the
grid kernels and the projected LSTM first, then the cluster and K-split variants.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import math
import sys
import time

import numpy as np
import pytest
import torch

import gpurnn
from gpurnn import reference
from gpurnn.backends import cupy as cupy_backend
from gpurnn.backends.base import Inputs
from gpurnn.backends.cupy import plan as cupy_plan
from gpurnn.backends.cupy.plan import (
    MMA_K,
)
from gpurnn.cells import GATES
from tests.conftest import seeded_generator
from tests.helpers import make_torch_module
from tests.test_cupy_plan import CELLS

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


ALL_COMBOS = tuple(itertools.product([False, True], repeat=3))  # reverse, lengths, h0


def check_against_reference(monkeypatch, gpu_report, variant, dtype, cell, B, T=24, H=96,
                            combos=ALL_COMBOS):  # fmt: skip
    """Every direction x lengths x h0 combination (or those of `combos`) against the
    float64 reference: outputs, final states and every gradient."""
    backend = _cupy_with_variant(monkeypatch, variant, cell, dtype, H, B)
    _poison_allocations(monkeypatch)
    G = GATES[cell]
    gen = seeded_generator(B, cell, variant, str(dtype), T, H)
    for reverse, with_lengths, with_h0 in combos:

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
# variant, the real sizes, the projected LSTM, whole modules; then the cluster variants


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 11])
def test_gpu_grid_matches_reference(monkeypatch, gpu_report, dtype, cell, B):
    check_against_reference(monkeypatch, gpu_report, "grid", dtype, cell, B)


def check_long_sequence(monkeypatch, gpu_report, cell, variant, H, reverse, checked):
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
@pytest.mark.parametrize("checked", [False, True], ids=["plain", "bounds-checked"])
@pytest.mark.parametrize("cell, H, reverse", [
    ("lstm", 768, False),  # the shape whose backward used to read past the workspace
    ("gru", 768, True),
])  # fmt: skip
def test_gpu_long_sequence_matches_torch_backend(monkeypatch, gpu_report, cell, H, reverse,
                                                 checked):  # fmt: skip
    check_long_sequence(monkeypatch, gpu_report, cell, "grid", H, reverse, checked)


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


# ------------------------------------------------------------------ GPU: cluster variants
#
# After the grid and projection kernels' tests: a run cut short has checked those first.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 11])
def test_gpu_cluster_matches_reference(monkeypatch, gpu_report, dtype, cell, B):
    check_against_reference(monkeypatch, gpu_report, "cluster", dtype, cell, B)


@pytest.mark.gpu
@pytest.mark.parametrize("checked", [False, True], ids=["plain", "bounds-checked"])
@pytest.mark.parametrize("cell, H, reverse", [("lstm", 256, False), ("rnn_tanh", 512, True)])
def test_gpu_cluster_long_sequence_matches_torch_backend(monkeypatch, gpu_report, cell, H,
                                                         reverse, checked):  # fmt: skip
    check_long_sequence(monkeypatch, gpu_report, cell, "cluster", H, reverse, checked)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 11])
def test_gpu_ksplit_matches_reference(monkeypatch, gpu_report, dtype, cell, B):
    """The K-split variant, small odd shape: H=96 (units per cluster not a multiple of the
    cluster size for some cells), one and two batch tiles, every direction x lengths x h0."""
    check_against_reference(monkeypatch, gpu_report, "ksplit", dtype, cell, B)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell, H, B", [("lstm", 768, 16), ("gru", 768, 64), ("rnn_tanh", 1024, 9)])
def test_gpu_ksplit_real_size_matches_reference(monkeypatch, gpu_report, dtype, cell, H, B):
    """Real sizes against the float64 reference (T=32; forward and reverse, with lengths)."""
    check_against_reference(monkeypatch, gpu_report, "ksplit", dtype, cell, B, T=32, H=H,
                            combos=[(False, True, True), (True, True, False)])  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("checked", [False, True], ids=["plain", "bounds-checked"])
@pytest.mark.parametrize("cell, H, reverse", [("lstm", 768, False), ("gru", 1024, True)])
def test_gpu_ksplit_long_sequence_matches_torch_backend(monkeypatch, gpu_report, cell, H,
                                                        reverse, checked):  # fmt: skip
    check_long_sequence(monkeypatch, gpu_report, cell, "ksplit", H, reverse, checked)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_ksplit_module_matches_torch_nn(monkeypatch, gpu_report, dtype, cell):
    """A whole 2-layer bidirectional torch.nn layer, packed, h0 (and c0) given, on the
    K-split variant against torch.nn itself: outputs, final states, every gradient."""
    from tests.helpers import run_torch_style, uneven_lengths

    T, B, I, H = 48, 6, 64, 512
    _cupy_with_variant(monkeypatch, "ksplit", cell, dtype, H, B)
    gen = seeded_generator("ksplit module", cell, str(dtype))
    ref = make_torch_module(cell, input_size=I, hidden_size=H, num_layers=2,
                            bidirectional=True, dtype=dtype).cuda()  # fmt: skip
    ours = gpurnn.convert(copy.deepcopy(ref), backend="cupy")
    x = torch.randn(T, B, I, generator=gen).to(dtype).cuda()
    state = [torch.randn(4, B, H, generator=gen).to(dtype).cuda()
             for _ in range(2 if cell == "lstm" else 1)]  # fmt: skip
    lengths = uneven_lengths(B, T, gen)
    results = []
    for model in (ref, ours):
        inputs = [t.clone().requires_grad_(True) for t in (x, *state)]
        hx = tuple(inputs[1:]) if cell == "lstm" else inputs[1]
        out, hid = run_torch_style(model, inputs[0], hx, lengths)
        hid = list(hid) if cell == "lstm" else [hid]
        grads = [torch.randn(t.shape, generator=seeded_generator("g", i)).to(dtype).cuda()
                 for i, t in enumerate([out, *hid])]  # fmt: skip
        torch.autograd.backward([out, *hid], grads)
        params = [p.grad for p in model.parameters()]
        results.append([out, *hid, *(t.grad for t in inputs), *params])
    names = ["output", *(f"hid{i}" for i in range(len(state))), "dx",
             *(f"dstate{i}" for i in range(len(state))),
             *(f"d{n}" for n, _ in ref.named_parameters())]  # fmt: skip
    if cell == "rnn_relu":  # relu's derivative at 0 differs between two 16-bit forwards
        names, results = names[: 1 + len(state)], [r[: 1 + len(state)] for r in results]
    for name, expected, got in zip(names, *results):
        assert_scaled_close(got, expected.detach().double().cpu().numpy(), dtype, name,
                            gpu_report, name)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_gpu_ksplit_every_layout_matches_reference(request, monkeypatch, gpu_report, direction):
    """Every instantiation's layout (cluster size, m-tiles a warp, n-tiles) and every
    warps-per-m-tile count, forced on one small LSTM bf16 shape, against the float64
    reference (one NVRTC compile each: slow, so only with -m 'gpu and slow')."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("every K-split layout: run with -m 'gpu and slow'")
    from gpurnn.backends.cupy.plan import KSPLIT_CLUSTER_SIZES, KSPLIT_M_PER_WARP
    from gpurnn.backends.cupy.plan_ksplit import K_WARPS

    real_plan = cupy_backend.CupyBackend.plan
    for c, mw, kw, n in itertools.product(KSPLIT_CLUSTER_SIZES, KSPLIT_M_PER_WARP, K_WARPS,
                                          [1, 2]):  # fmt: skip
        if _forced_ksplit_plan(direction, "lstm", torch.bfloat16, 96, 11, c, mw, kw, n) is None:
            continue

        def forced(self, d, cell, dtype, H, B, device, proj=0, layout=(c, mw, kw, n)):
            if d != direction:
                return real_plan(self, d, cell, dtype, H, B, device, proj)
            return _forced_ksplit_plan(d, cell, dtype, H, B, *layout)

        monkeypatch.setattr(cupy_backend.CupyBackend, "plan", forced)
        check_against_reference(monkeypatch, gpu_report, "ksplit", torch.bfloat16, "lstm", 11,
                                T=8, combos=[(False, True, True)])  # fmt: skip


def _forced_ksplit_plan(direction, cell, dtype, H, B, c, mw, kw, n):
    """The K-split plan of one given layout, or None where it cannot hold (U < C)."""
    from gpurnn.backends.cupy.plan_ksplit import ksplit_shared_bytes

    G = GATES[cell]
    rows_per_unit = G if direction == "forward" else 1
    m_tiles = 8 // kw * mw
    units = 16 * m_tiles // rows_per_unit
    if units < c:
        return None
    K = H if direction == "forward" else G * H
    k = MMA_K[dtype]
    KT = math.ceil(math.ceil(K / k) / c)
    clusters = math.ceil(H / units)
    smem = ksplit_shared_bytes(dtype, m_tiles, KT, c, kw, rows_per_unit, units, n)
    return cupy_plan.Plan(direction, "ksplit", m_tiles, n, units, clusters * c, K, KT,
                          c * KT * k, math.ceil(B / (8 * n)) * 8 * n, smem, cluster_size=c,
                          m_per_warp=mw, k_warps=kw)  # fmt: skip


@pytest.mark.gpu
def test_gpu_ksplit_grid_too_large_raises_instead_of_hanging(monkeypatch, gpu_report):
    """A K-split grid larger than can be resident: the CTAs of the first wave wait for the
    counter of CTAs that cannot start; the bounded waits give up and the launch raises
    (within seconds) instead of hanging the device."""
    backend = _cupy_with_variant(monkeypatch, "ksplit", "rnn_tanh", torch.bfloat16, 96, 4)
    props = torch.cuda.get_device_properties(0)
    H = 16 * 2 * props.multi_processor_count  # 2 clusters' worth of units per SM
    plan = _forced_ksplit_plan("forward", "rnn_tanh", torch.bfloat16, H, 4, 8, 1, 8, 1)
    assert plan.blocks > props.multi_processor_count
    monkeypatch.setattr(backend, "plan", lambda *a, **k: plan)
    xg = torch.randn(4, 4, H, device="cuda", dtype=torch.bfloat16)
    w_hh = torch.randn(H, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
    with pytest.raises(RuntimeError, match="gave up"):
        backend.forward(Inputs("rnn_tanh", xg, w_hh), False)
