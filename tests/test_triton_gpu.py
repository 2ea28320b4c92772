"""The triton backend on a real GPU, at real sizes, many programs with the grid barrier.

Marked `gpu`: conftest.py skips them without CUDA. Checked against the float64 NumPy
reference and against torch.nn (cuDNN) in the same dtype. Errors are measured relative to
the largest magnitude of the expected tensor (T=64 steps of bf16 rounding accumulate).

Every case compiles its own kernel variants on a cold machine (seconds each), so the
default GPU set (`-m "gpu and not slow"`, what benchmarks/device_check.sh runs first) is
one case per code path: every cell in bf16, each dtype once, each plan (resident,
streamed, several batch tiles, per-step launches, barrier timeout) once. The other
cell x dtype combinations are marked `slow`: `-m "gpu and slow"` runs them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from gpurnn.kernels.triton import launch  # noqa: E402
from gpurnn.kernels.triton.plan import make_plan  # noqa: E402

from gpurnn import reference as ref  # noqa: E402
from gpurnn.backends.base import Inputs  # noqa: E402
from gpurnn.backends.triton import TritonBackend  # noqa: E402
from gpurnn.cells import GATES  # noqa: E402
from tests.conftest import seeded_generator  # noqa: E402
from tests.helpers import relu_clear_of_zero  # noqa: E402

pytestmark = pytest.mark.gpu

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# max |actual - expected| / max(1, max |expected|), per dtype (fp32 with exact "ieee" dots)
TOL = {torch.bfloat16: 4e-2, torch.float16: 1e-2, torch.float32: 1e-4}
TOL_TF32 = 1e-2


def _fast_first(values, fast, ids=None):
    """pytest params: those in `fast` join the default GPU set, the rest are marked slow."""
    return [
        pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=() if v in fast else
                     pytest.mark.slow, id=ids(v) if ids else None)
        for v in values
    ]  # fmt: skip


def _dtype_id(dtype):
    return str(dtype).split(".")[-1]


def _cell_dtype_id(case):
    return f"{case[0]}-{_dtype_id(case[1])}"


_BF16 = torch.bfloat16
CELL_DTYPES = [(cell, dtype) for dtype in DTYPES for cell in CELLS]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _gen(*key) -> torch.Generator:
    return seeded_generator(*key)


def make_case(cell, T, B, H, dtype, lengths=None, key=(), reverse=False):
    g = _gen(cell, T, B, H, str(dtype), key)
    G = GATES[cell]
    s = 0.5 if cell == "rnn_relu" else 1.0

    def rnd(*shape, scale=1.0):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return x.to(dtype).cuda()

    case = dict(
        xg=rnd(T, B, G * H, scale=s),
        w_hh=rnd(G * H, H, scale=s / H**0.5),
        h0=rnd(B, H),
        c0=rnd(B, H) if cell == "lstm" else None,
        b_hn=rnd(H) if cell == "gru" else None,
        lengths=None if lengths is None else torch.as_tensor(lengths).cuda(),
    )
    if cell == "rnn_relu" and dtype in (torch.float16, torch.bfloat16):
        # see relu_clear_of_zero: 16-bit rounding must not flip relu's derivative
        case["xg"] = relu_clear_of_zero(case["xg"], case["w_hh"], case["h0"], case["lengths"],
                                        reverse)  # fmt: skip
    gin = dict(dy=rnd(T, B, H), dh_T=rnd(B, H), dc_T=rnd(B, H) if cell == "lstm" else None)
    return case, gin


def _np(t):
    return None if t is None else t.detach().double().cpu().numpy()


def rel_err(actual, expected):
    a = actual.detach().double().cpu().numpy() if torch.is_tensor(actual) else actual
    e = expected.detach().double().cpu().numpy() if torch.is_tensor(expected) else expected
    assert a.shape == e.shape
    assert np.isfinite(a).all(), "NaN/inf in output (an element not written?)"
    return float(np.abs(a - e).max() / max(1.0, np.abs(e).max()))


def run_vs_reference(cell, case, gin, reverse, tol, be=None, plan=None):
    be = be or TritonBackend()
    c = case
    args = (c["xg"], c["w_hh"], c["h0"], c["c0"], c["lengths"], reverse, c["b_hn"])
    if plan is None:
        inputs = Inputs(cell, *args)
        y, h_T, c_T, ws = be.forward(inputs, True)
        gr = be.backward(inputs, y, ws, gin["dy"], gin["dh_T"], gin["dc_T"])
        got = dict(xg=gr.xg, w_hh=gr.w_hh, h0=gr.h0, c0=gr.c0, b_hn=gr.b_hn)
    else:
        y, h_T, c_T, ws = launch.forward(cell, *args, True, plan=plan, precision=be.fp32_precision)
        dxg, _, dh0, dc0 = launch.backward(
            cell, c["w_hh"], c["h0"], c["c0"], c["lengths"], reverse, y, ws, gin["dy"],
            gin["dh_T"], gin["dc_T"], plan=plan, precision=be.fp32_precision,
        )  # fmt: skip
        got = dict(xg=dxg, h0=dh0, c0=dc0)
    torch.cuda.synchronize()
    n = {k: _np(v) for k, v in c.items()}
    ry, rh, rc = ref.recurrence_forward(cell, n["xg"], n["w_hh"], n["h0"], n["c0"], n["lengths"],
                                        reverse, n["b_hn"])  # fmt: skip
    errs = {"y": rel_err(y, ry), "h_T": rel_err(h_T, rh)}
    if rc is not None:
        errs["c_T"] = rel_err(c_T, rc)
    rg = ref.recurrence_backward(
        cell, n["xg"], n["w_hh"], n["h0"], n["c0"], n["lengths"], reverse, n["b_hn"], None,
        _np(gin["dy"]), _np(gin["dh_T"]), _np(gin["dc_T"]),
    )  # fmt: skip
    for k, v in got.items():
        if rg.get(k) is not None:
            errs["d" + k] = rel_err(v, rg[k])
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"errors over {tol}: {bad} (all: {errs})"
    return errs


def _exact_fp32():
    be = TritonBackend()
    be.fp32_precision = "ieee"
    return be


@pytest.mark.parametrize(
    "cell,dtype",
    _fast_first(
        CELL_DTYPES,
        {*((c, _BF16) for c in CELLS), ("lstm", torch.float16), ("lstm", torch.float32)},
        _cell_dtype_id,
    ),
)
def test_real_size_vs_reference(cell, dtype):
    """H=768, B=16, T=64: 96 programs of 8 units, persistent, one barrier per step."""
    T, B, H = 64, 16, 768
    L = torch.randint(1, T + 1, (B,), generator=_gen("L", cell))
    L[0] = T
    reverse = cell in ("gru", "rnn_relu")
    case, gin = make_case(cell, T, B, H, dtype, lengths=L, reverse=reverse)
    run_vs_reference(cell, case, gin, reverse=reverse, tol=TOL[dtype],
                     be=_exact_fp32())  # fmt: skip


@pytest.mark.parametrize("cell", _fast_first(("lstm", "gru"), {"lstm"}))
def test_tf32_default(cell):
    case, gin = make_case(cell, 32, 16, 512, torch.float32)
    run_vs_reference(cell, case, gin, False, TOL_TF32)


@pytest.mark.parametrize("cell", _fast_first(("lstm", "gru"), {"lstm"}))
def test_several_batch_tiles_and_reverse_lengths(cell):
    """B=40: three batch tiles of 16; packed lengths incl. 0 in reverse."""
    T, B, H = 24, 40, 256
    L = torch.randint(0, T + 1, (B,), generator=_gen("L40", cell))
    L[3] = T
    case, gin = make_case(cell, T, B, H, torch.float16, lengths=L)
    run_vs_reference(cell, case, gin, True, TOL[torch.float16])


@pytest.mark.parametrize("cell", _fast_first(CELLS, {"lstm"}))
def test_streamed_weights_large_H(cell):
    """H=2048: W_hh does not fit on chip; streamed from L2 each step (BH=16, persistent)."""
    T, B, H = 12, 8, 2048
    case, gin = make_case(cell, T, B, H, torch.bfloat16)
    plan = make_plan(H, B, GATES[cell], torch.bfloat16, torch.device("cuda"))
    assert not plan.resident
    run_vs_reference(cell, case, gin, False, TOL[torch.bfloat16])


@pytest.mark.parametrize("cell", _fast_first(("lstm", "rnn_tanh"), {"lstm"}))
def test_per_step_launch_fallback(cell):
    T, B, H = 16, 16, 512
    case, gin = make_case(cell, T, B, H, torch.float32)
    plan = make_plan(H, B, GATES[cell], torch.float32, torch.device("cuda"),
                     persistent=False)  # fmt: skip
    run_vs_reference(cell, case, gin, True, TOL[torch.float32], be=_exact_fp32(), plan=plan)


def test_barrier_timeout_raises():
    """wait_bound=0: a program that does not find everyone arrived at once flags the error;
    the launcher raises instead of returning garbage (and nothing hangs)."""
    case, _ = make_case("lstm", 64, 16, 768, torch.bfloat16)
    c = case
    with pytest.raises(RuntimeError, match="barrier timed out"):
        launch.forward("lstm", c["xg"], c["w_hh"], c["h0"], c["c0"], None, False, None, False,
                       wait_bound=0)  # fmt: skip
    # and the next normal call is fine
    launch.forward("lstm", c["xg"], c["w_hh"], c["h0"], c["c0"], None, False, None, False)


def test_timeout_is_bounded_in_time_and_deferred():
    """A wait bounded at 2 ms that cannot succeed (wait_bound 0 µs: the first miss gives up)
    flags the launch; deferred, the launcher returns without a host sync and
    check_pending raises, naming the kernel and the plan. The whole thing takes well under
    the default 1 s bound per wait (the bound is a time, not a count of polls)."""
    import time

    case, _ = make_case("lstm", 64, 16, 768, torch.bfloat16)
    c = case
    t0 = time.perf_counter()
    launch.forward("lstm", c["xg"], c["w_hh"], c["h0"], c["c0"], None, False, None, False,
                   wait_bound=0, defer_check=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="timed out in _recurrence_fwd_kernel.*Plan"):
        launch.check_pending()
    assert time.perf_counter() - t0 < 5.0
    launch.check_pending()  # nothing left


def test_poll_counter_on_a_gpu():
    """Counting failed polls changes no output; the count is a whole number >= 0 (how many
    attempts beyond the first a step takes, summed over programs and steps)."""
    case, gin = make_case("lstm", 64, 16, 768, torch.bfloat16)
    c = case
    args = ("lstm", c["xg"], c["w_hh"], c["h0"], c["c0"], None, False, None, True)
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    off = launch.forward(*args)
    on = launch.forward(*args, poll_counter=counter)
    for a, b in zip(off, on):
        assert torch.equal(a, b)
    bargs = ("lstm", c["w_hh"], c["h0"], c["c0"], None, False, off[0], off[3], gin["dy"],
             gin["dh_T"], gin["dc_T"])  # fmt: skip
    boff = launch.backward(*bargs)
    bon = launch.backward(*bargs, poll_counter=counter)
    for a, b in zip(boff, bon):
        if a is not None:
            assert torch.equal(a, b)
    assert int(counter.item()) >= 0


@pytest.mark.parametrize(
    "cell,dtype",
    _fast_first(CELL_DTYPES, {("lstm", _BF16), ("gru", torch.float16)}, _cell_dtype_id),
)
def test_vs_torch_nn(cell, dtype):
    """Whole layer against torch.nn (cuDNN) in the same dtype: xg from the module's W_ih and
    biases, the recurrence from the triton backend."""
    T, B, I, H = 64, 16, 128, 768
    torch.manual_seed(seeded_generator("nn", cell, str(dtype)).initial_seed())
    kw = dict(nonlinearity=cell[4:]) if cell.startswith("rnn") else {}
    mod_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(cell, torch.nn.RNN)
    m = mod_cls(I, H, **kw).cuda().to(dtype)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype)
    h0 = torch.randn(1, B, H, device="cuda", dtype=dtype)
    c0 = torch.randn(1, B, H, device="cuda", dtype=dtype) if cell == "lstm" else None
    with torch.no_grad():
        out, hid = m(x, (h0, c0) if cell == "lstm" else h0)
        b_hh = m.bias_hh_l0
        if cell == "gru":
            b_hn = b_hh[2 * H :]
            b_fold = torch.cat([b_hh[: 2 * H], torch.zeros_like(b_hn)])
        else:
            b_hn, b_fold = None, b_hh
        xg = x.float() @ m.weight_ih_l0.float().t() + m.bias_ih_l0.float() + b_fold.float()
        xg = xg.to(dtype)
        be = TritonBackend()
        inputs = Inputs(cell, xg, m.weight_hh_l0, h0[0], c0[0] if c0 is not None else None,
                        b_hn=b_hn)  # fmt: skip
        y, h_T, c_T, _ = be.forward(inputs, False)
    tol = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-2}[dtype]
    assert rel_err(y, out) <= tol
    h_ref = hid[0][0] if cell == "lstm" else hid[0]
    assert rel_err(h_T, h_ref) <= tol
    if cell == "lstm":
        assert rel_err(c_T, hid[1][0]) <= tol
