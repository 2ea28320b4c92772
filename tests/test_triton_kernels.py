"""The triton backend's kernels against the float64 NumPy reference, under the interpreter.

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1, so these run the same kernels
(one program, or many programs launched one step at a time) on CPU tensors. On a CUDA
machine this file skips; tests/test_triton_gpu.py runs the kernels there (and bf16).
Every output is allocated NaN-filled (launch.POISON), so an element a kernel forgets
to write fails the comparison. Inputs are fresh random draws, seeded per test.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from gpurnn.kernels.triton import launch  # noqa: E402
from gpurnn.kernels.triton.backward import _recurrence_bwd_kernel  # noqa: E402
from gpurnn.kernels.triton.cell_math import CELL_CODE  # noqa: E402
from gpurnn.kernels.triton.exchange import _BITS, _SENTINEL  # noqa: E402
from gpurnn.kernels.triton.forward import _recurrence_fwd_kernel  # noqa: E402
from gpurnn.kernels.triton.plan import Plan, _polls, make_plan  # noqa: E402
from gpurnn.kernels.triton.projected import _lstmp_bwd_kernel, _lstmp_fwd_kernel  # noqa: E402

from gpurnn import reference as ref  # noqa: E402
from gpurnn.backends.base import Inputs  # noqa: E402
from gpurnn.backends.triton import TritonBackend  # noqa: E402
from gpurnn.cells import GATES  # noqa: E402
from tests.conftest import seeded_generator  # noqa: E402
from tests.helpers import relu_clear_of_zero  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests (TRITON_INTERPRET=1, set by conftest.py without CUDA); "
                "tests/test_triton_gpu.py covers the GPU", allow_module_level=True)  # fmt: skip
ON_GPU = False
DEVICE = "cpu"

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# (atol, rtol) against the float64 reference
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (5e-5, 5e-5),
    torch.float16: (2e-2, 2e-2),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _gen(*key) -> torch.Generator:
    return seeded_generator(*key)


def make_case(cell, T, B, H, dtype, *, h0=True, lengths=None, b_hn=True, reverse=False, key=()):
    """Random inputs of the primitive (CPU float64 master copies cast to dtype)."""
    g = _gen(cell, T, B, H, str(dtype), h0, key)
    G = GATES[cell]
    scale = 0.5 if cell == "rnn_relu" else 1.0

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(DEVICE)

    case = dict(
        xg=rnd(T, B, G * H, s=scale),
        w_hh=rnd(G * H, H, s=scale / H**0.5),
        h0=rnd(B, H) if h0 else None,
        c0=rnd(B, H) if (h0 and cell == "lstm") else None,
        b_hn=rnd(H) if (b_hn and cell == "gru") else None,
        lengths=None if lengths is None else torch.as_tensor(lengths).to(DEVICE),
    )
    if cell == "rnn_relu" and dtype == torch.float16:
        # see relu_clear_of_zero: 16-bit rounding must not flip relu's derivative
        case["xg"] = relu_clear_of_zero(case["xg"], case["w_hh"], case["h0"], case["lengths"],
                                        reverse)  # fmt: skip
    grads_in = dict(dy=rnd(T, B, H), dh_T=rnd(B, H), dc_T=rnd(B, H) if cell == "lstm" else None)
    return case, grads_in


def _np(t):
    return None if t is None else t.detach().double().cpu().numpy()


def check(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    if expected is None:
        assert actual is None, f"{what}: expected None"
        return
    a = actual.detach().double().cpu().numpy()
    assert a.shape == expected.shape, f"{what}: shape {a.shape} != {expected.shape}"
    assert np.isfinite(a).all(), f"{what}: NaN/inf (an element was not written?)"
    np.testing.assert_allclose(a, expected, atol=atol, rtol=rtol, err_msg=what)


def run_and_compare(cell, case, gin, reverse, dtype, backend=None, plan_fwd=None, plan_bwd=None):
    """Forward and backward through the backend (or the launchers with explicit plans),
    checked against the reference."""
    c = case
    args = (c["xg"], c["w_hh"], c["h0"], c["c0"], c["lengths"], reverse, c["b_hn"])
    if plan_fwd is None:
        be = backend or TritonBackend()
        inputs = Inputs(cell, *args)
        y, h_T, c_T, ws = be.forward(inputs, True)
        grads = be.backward(inputs, y, ws, gin["dy"], gin["dh_T"], gin["dc_T"])
        got = dict(xg=grads.xg, w_hh=grads.w_hh, h0=grads.h0, c0=grads.c0, b_hn=grads.b_hn)
    else:
        y, h_T, c_T, ws = launch.forward(cell, *args, True, plan=plan_fwd, precision="ieee")
        dxg, dhn, dh0, dc0 = launch.backward(
            cell, c["w_hh"], c["h0"], c["c0"], c["lengths"], reverse, y, ws,
            gin["dy"], gin["dh_T"], gin["dc_T"], plan=plan_bwd, precision="ieee",
        )  # fmt: skip
        got = dict(xg=dxg, h0=dh0, c0=dc0 if cell == "lstm" else None)
    npa = {k: _np(v) for k, v in c.items()}
    ry, rh, rc = ref.recurrence_forward(
        cell, npa["xg"], npa["w_hh"], npa["h0"], npa["c0"], npa["lengths"], reverse, npa["b_hn"]
    )
    check(y, ry, dtype, "y")
    check(h_T, rh, dtype, "h_T")
    check(c_T, rc, dtype, "c_T")
    rg = ref.recurrence_backward(
        cell, npa["xg"], npa["w_hh"], npa["h0"], npa["c0"], npa["lengths"], reverse, npa["b_hn"],
        None, _np(gin["dy"]), _np(gin["dh_T"]), _np(gin["dc_T"]),
    )  # fmt: skip
    for k, v in got.items():
        if k in ("h0", "c0") and plan_fwd is not None:
            # launchers return dh0/dc0 whether or not h0/c0 were given (zeros count)
            exp = rg[k] if rg[k] is not None else _ref_d_init(cell, npa, reverse, gin, k)
            check(v, exp, dtype, f"d{k}")
        else:
            check(v, rg[k], dtype, f"d{k}")
    return y, ws


def _ref_d_init(cell, npa, reverse, gin, k):
    """Reference dh0/dc0 with h0/c0 given as explicit zeros."""
    B = npa["xg"].shape[1]
    H = npa["w_hh"].shape[1]
    z = np.zeros((B, H))
    h0 = npa["h0"] if npa["h0"] is not None else z
    c0 = (npa["c0"] if npa["c0"] is not None else z) if cell == "lstm" else None
    rg = ref.recurrence_backward(
        cell, npa["xg"], npa["w_hh"], h0, c0, npa["lengths"], reverse, npa["b_hn"], None,
        _np(gin["dy"]), _np(gin["dh_T"]), _np(gin["dc_T"]),
    )  # fmt: skip
    return rg[k]


# ---------------------------------------------------------------- the full matrix

DTYPES = (torch.float64, torch.float32, torch.float16)
T_, B_, H_ = 6, 3, 20  # H not a power of two, odd B


def _lengths(mode, B, T, key):
    if mode is None:
        return None
    g = _gen("len", key)
    L = torch.randint(1, T + 1, (B,), generator=g)
    L[0] = T  # the padded length is T
    if mode == "with_zero":
        L[-1] = 0
    return L


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("h0", (True, False), ids=("h0", "noh0"))
@pytest.mark.parametrize("lengths", (None, "with_zero"), ids=("full", "lengths"))
@pytest.mark.parametrize("reverse", (False, True), ids=("fwd", "rev"))
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference(cell, reverse, lengths, h0, dtype):
    key = (cell, reverse, lengths, h0, str(dtype))
    L = _lengths(lengths, B_, T_, key)
    case, gin = make_case(cell, T_, B_, H_, dtype, h0=h0, lengths=L, reverse=reverse, key=key)
    run_and_compare(cell, case, gin, reverse, dtype)


# ---------------------------------------------------------------- other layouts of the work


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("poll", (True, False), ids=("poll", "plain"))
def test_many_programs_per_step_launches(cell, poll):
    """Units and batch split over 3 x 2 programs, launched one step at a time (launch
    boundaries stand in for the grid barrier): exercises the cross-program exchange of h
    through y and of dgates through dxg, and state carried between launches. The forward
    polls its exchange rows for the sentinel (as on a GPU) or reads them plainly."""
    T, B, H = 4, 5, 20
    L = torch.tensor([4, 2, 0, 3, 1])
    case, gin = make_case(cell, T, B, H, torch.float64, lengths=L, key="many")
    plan = Plan(BH=8, BLOCK_B=4, n_h=3, n_b=2, resident=True, persistent=False, KC=16,
                poll=poll)  # fmt: skip
    run_and_compare(cell, case, gin, True, torch.float64, plan_fwd=plan, plan_bwd=plan)


@pytest.mark.parametrize("chunks_per_trip", (1, 2))
@pytest.mark.parametrize("resident", (True, False), ids=("resident", "streamed"))
@pytest.mark.parametrize("cell", CELLS)
def test_k_chunks(cell, resident, chunks_per_trip):
    """H = 40 over K chunks of 16 (the last one partial), one program exchanging h (dgates)
    through memory with itself: weights kept on chip as a tuple of chunks, or streamed every
    step; the backward's dgates loaded 1 or 2 chunks (of every gate) per round trip."""
    T, B, H = 4, 2, 40
    if chunks_per_trip > 1 and not resident:
        pytest.skip("streamed weights load one chunk at a time")
    case, gin = make_case(cell, T, B, H, torch.float64, key=("kc", resident, chunks_per_trip))
    plan = make_plan(H, B, GATES[cell], torch.float64, torch.device(DEVICE), KC=16,
                     resident=resident, on_chip=False,
                     chunks_per_trip=chunks_per_trip)  # fmt: skip
    assert plan.nprog == 1 and plan.persistent and not plan.on_chip
    if ON_GPU:
        pytest.skip("fp64 plans are interpreter-only")
    run_and_compare(cell, case, gin, False, torch.float64, plan_fwd=plan, plan_bwd=plan)


@pytest.mark.parametrize("chunks_per_trip", (1, 2))
@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_backward_k_split(cell, chunks_per_trip):
    """The polled backward with each K chunk split in two slabs, (gate x slab) the batch of
    its 3-D dot (as 8 warps run it on a GPU): H = 40 over chunks of 32 (the last partial, its
    second slab empty), waves of 1 or 2 chunks, lengths and reverse."""
    T, B, H = 5, 3, 40
    lengths = _lengths("with_zero", B, T, ("ks", cell))
    case, gin = make_case(cell, T, B, H, torch.float64, lengths=lengths, reverse=True,
                          key=("ks", cell, chunks_per_trip))  # fmt: skip
    fwd = make_plan(H, B, GATES[cell], torch.float64, torch.device(DEVICE), on_chip=False)
    bwd = make_plan(H, B, GATES[cell], torch.float64, torch.device(DEVICE), KC=32,
                    on_chip=False, chunks_per_trip=chunks_per_trip, k_split=2)  # fmt: skip
    assert _polls(bwd) and bwd.k_split == 2 and bwd.persistent
    run_and_compare(cell, case, gin, True, torch.float64, plan_fwd=fwd, plan_bwd=bwd)


@pytest.mark.parametrize("on_chip", (True, False), ids=("on_chip", "exchange"))
@pytest.mark.parametrize("cell", CELLS)
def test_one_program_reverse_lengths(cell, on_chip):
    """One program over every unit, in reverse with lengths (a row's state must ride through
    its padded steps before its first valid one): h kept on chip, or exchanged through the
    (T+1)-row buffer with y written apart."""
    T, B, H = 6, 4, 12
    L = torch.tensor([6, 0, 3, 1])
    case, gin = make_case(cell, T, B, H, torch.float64, lengths=L, key=("one", on_chip))
    plan = make_plan(H, B, GATES[cell], torch.float64, torch.device(DEVICE),
                     on_chip=on_chip)  # fmt: skip
    assert plan.nprog == 1 and plan.on_chip == on_chip
    run_and_compare(cell, case, gin, True, torch.float64, plan_fwd=plan, plan_bwd=plan)


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32, torch.float64))
def test_h0_holding_the_sentinel_is_a_nan(dtype):
    """A caller's h0 may hold any bits, the polled exchange's sentinel among them: it is
    read as the NaN it is (torch.nn propagates it), not as data still on its way."""
    T, B, H = 3, 2, 12
    case, gin = make_case("gru", T, B, H, dtype, key=("sentinel", str(dtype)))
    h0 = case["h0"].clone()
    h0.view(_BITS[dtype])[1, 5] = _SENTINEL[dtype]
    assert torch.isnan(h0[1, 5]) and not torch.isnan(h0[0]).any()
    plan = make_plan(H, B, 3, dtype, torch.device(DEVICE), on_chip=False)
    assert _polls(plan)
    y, h_T, _, _ = launch.forward("gru", case["xg"], case["w_hh"], h0, None, None, False,
                                  case["b_hn"], False, plan=plan, precision="ieee",
                                  wait_bound=50)  # fmt: skip
    assert torch.isnan(y[:, 1]).all() and torch.isnan(h_T[1]).all()
    ry, _, _ = ref.recurrence_forward(
        "gru", _np(case["xg"])[:, :1], _np(case["w_hh"]), _np(h0)[:1], None, None, False,
        _np(case["b_hn"]),
    )  # fmt: skip
    check(y[:, :1], ry, dtype, "y of the other row")


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_polled_exchange_with_genuine_nans(cell):
    """A NaN in the inputs (xg forward, dy backward) spreads to every unit of its sequence,
    so the polled product keeps coming out NaN although everything has arrived: the kernels
    must tell that from data on its way (the element-wise check) and go on, not spin until
    the bound. NaNs land where the reference puts them; the other sequence is exact."""
    T, B, H = 5, 2, 20
    case, gin = make_case(cell, T, B, H, torch.float64, key=("nan", cell))
    case["xg"][2, 1, 3] = float("nan")
    gin["dy"][1, 1, 7] = float("nan")
    # one persistent program: a spin that runs out raises (per-step launches cannot wait)
    plan = make_plan(H, B, GATES[cell], torch.float64, torch.device(DEVICE), KC=16,
                     on_chip=False)  # fmt: skip
    assert plan.persistent and _polls(plan)
    c = case
    y, h_T, c_T, ws = launch.forward(
        cell,
        c["xg"],
        c["w_hh"],
        c["h0"],
        c["c0"],
        None,
        False,
        c["b_hn"],
        True,
        plan=plan,
        precision="ieee",
        wait_bound=20,
    )
    dxg, _, dh0, _ = launch.backward(cell, c["w_hh"], c["h0"], c["c0"], None, False, y, ws,
                                     gin["dy"], gin["dh_T"], gin["dc_T"], plan=plan,
                                     precision="ieee", wait_bound=20)  # fmt: skip
    n = {k: _np(v) for k, v in c.items()}
    ry, rh, _ = ref.recurrence_forward(cell, n["xg"], n["w_hh"], n["h0"], n["c0"], None, False,
                                       n["b_hn"])  # fmt: skip
    rg = ref.recurrence_backward(cell, n["xg"], n["w_hh"], n["h0"], n["c0"], None, False,
                                 n["b_hn"], None, _np(gin["dy"]), _np(gin["dh_T"]),
                                 _np(gin["dc_T"]))  # fmt: skip
    for got, exp, what in ((y, ry, "y"), (h_T, rh, "h_T"), (dxg, rg["xg"], "dxg"),
                           (dh0, rg["h0"], "dh0")):  # fmt: skip
        g = _np(got)
        assert (np.isnan(g) == np.isnan(exp)).all() and np.isnan(exp).any(), what
        np.testing.assert_allclose(g[:, 0] if g.ndim == 3 else g[0], exp[:, 0] if g.ndim == 3
                                   else exp[0], atol=1e-10, rtol=1e-10, err_msg=what)  # fmt: skip


def test_polled_exchange_that_never_arrives_raises():
    """An exchange element that never arrives (here h0's row left as the sentinel, which no
    launch ever writes) ends the bounded spin and raises instead of hanging or returning
    garbage."""
    T, B, H = 2, 2, 12
    case, _ = make_case("rnn_tanh", T, B, H, torch.float32, key="never")
    plan = make_plan(H, B, 1, torch.float32, torch.device(DEVICE), on_chip=False)
    assert plan.persistent and _polls(plan)
    hx = torch.empty(T + 1, B, H).view(torch.int32).fill_(_SENTINEL[torch.float32])
    hx = hx.view(torch.float32)
    hs = torch.zeros(B, H)
    xg = case["xg"]
    # no regularizer: its mask, rate and LayerNorm slots take placeholders
    args = (xg, case["w_hh"], xg, xg, hx, hx[1:], hs, hs, xg, xg, xg, xg, hs, *(xg,) * 5)
    kw = dict(CELL=CELL_CODE["rnn_tanh"], G=1, GP=1, NW=1, H=H, HAS_LEN=False,
              REVERSE=False, SAVE=False, PREC="ieee", ACC=launch._acc_dtype(torch.float32),
              POLL=False, ASM=False, SENTINEL=_SENTINEL[torch.float32])  # fmt: skip
    axes = (1, None, None, None, 1, 1, 0, 0, None, None, None, None, None, *(None,) * 5)
    with pytest.raises(RuntimeError, match=r"timed out in _recurrence_fwd_kernel .*Plan\(BH="):
        launch._launch_steps(_recurrence_fwd_kernel, plan, T, B, T, args, kw, 3,
                             torch.device(DEVICE), axes)  # fmt: skip


def test_poll_counter_counts_every_failed_poll(monkeypatch):
    """COUNT_POLLS: a wait that never arrives fails wait_bound + 1 polls (the interpreter's
    bound counts them) before it gives up; later waits of the program do not spin, and
    the count lands in the launch's second sync word beside the error flag."""
    T, B, H = 3, 2, 12
    case, _ = make_case("rnn_tanh", T, B, H, torch.float32, key="count")
    plan = make_plan(H, B, 1, torch.float32, torch.device(DEVICE), on_chip=False)
    hx = torch.empty(T + 1, B, H).view(torch.int32).fill_(_SENTINEL[torch.float32])
    hx = hx.view(torch.float32)
    hs = torch.zeros(B, H)
    xg = case["xg"]
    # no regularizer: its mask, rate and LayerNorm slots take placeholders
    args = (xg, case["w_hh"], xg, xg, hx, hx[1:], hs, hs, xg, xg, xg, xg, hs, *(xg,) * 5)
    kw = dict(CELL=CELL_CODE["rnn_tanh"], G=1, GP=1, NW=1, H=H, HAS_LEN=False,
              REVERSE=False, SAVE=False, PREC="ieee", ACC=launch._acc_dtype(torch.float32),
              POLL=False, ASM=False, SENTINEL=_SENTINEL[torch.float32],
              COUNT_POLLS=True)  # fmt: skip
    monkeypatch.setattr(launch, "_check_barrier", lambda *a: None)
    axes = (1, None, None, None, 1, 1, 0, 0, None, None, None, None, None, *(None,) * 5)
    sync = launch._launch_steps(_recurrence_fwd_kernel, plan, T, B, T, args, kw, 3,
                                torch.device(DEVICE), axes)  # fmt: skip
    assert int(sync[0]) >= launch._SYNC_ERROR and int(sync[1]) == 3 + 1


def test_deferred_timeout_raises_at_the_module_call():
    """A launch whose check was deferred (what the backend does on a GPU: no host sync per
    launch) is raised by the next check: gpurnn.functional checks once per module call,
    with one host sync for every pending launch; the queue is then empty."""
    from gpurnn import functional
    from gpurnn.backends import get_backend

    assert get_backend("triton") is not None
    launch._PENDING.append((torch.tensor(0), "fine"))
    launch._PENDING.append((torch.tensor(launch._SYNC_ERROR), "a wait timed out in k"))
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    h0 = torch.zeros(1, 2, 5, dtype=torch.float64)
    w = [(torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64),
          None, None, None)]  # fmt: skip
    with pytest.raises(RuntimeError, match="a wait timed out in k"):
        functional.rnn("rnn_tanh", x, h0, None, w, num_layers=1, bidirectional=False,
                       backend="numpy")  # fmt: skip
    assert not launch._PENDING
    functional.rnn("rnn_tanh", x, h0, None, w, num_layers=1, bidirectional=False,
                   backend="numpy")  # fmt: skip


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_poll_counter_on_and_off_agree(cell):
    """Counting failed polls changes no output; one persistent program never waits (it
    reads only what it wrote itself), so its count is 0, added on the device."""
    T, B, H = 4, 3, 20
    case, gin = make_case(cell, T, B, H, torch.float32, key=("count", cell))
    plan = make_plan(H, B, GATES[cell], torch.float32, torch.device(DEVICE), KC=16,
                     on_chip=False)  # fmt: skip
    assert plan.persistent and _polls(plan)
    c = case
    fargs = (cell, c["xg"], c["w_hh"], c["h0"], c["c0"], None, False, c["b_hn"], True)
    counter = torch.full((1,), 5, dtype=torch.int64)
    off = launch.forward(*fargs, plan=plan, precision="ieee")
    on = launch.forward(*fargs, plan=plan, precision="ieee", poll_counter=counter)
    for a, b in zip(off, on):
        if a is not None:
            assert torch.equal(a, b)
    bargs = (cell, c["w_hh"], c["h0"], c["c0"], None, False, off[0], off[3], gin["dy"],
             gin["dh_T"], gin["dc_T"])  # fmt: skip
    boff = launch.backward(*bargs, plan=plan, precision="ieee")
    bon = launch.backward(*bargs, plan=plan, precision="ieee", poll_counter=counter)
    for a, b in zip(boff, bon):
        if a is not None:
            assert torch.equal(a, b)
    assert counter.tolist() == [5]
    with pytest.raises(ValueError, match="poll_counter"):
        launch.forward(*fargs, plan=plan, poll_counter=torch.zeros(1))


@pytest.mark.parametrize("poll", (True, False), ids=("poll", "plain"))
@pytest.mark.parametrize("reverse", (False, True), ids=("fwd", "rev"))
@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_batch_tiles_in_turns(cell, reverse, poll):
    """Persistent launches that each take one of three batch tiles (rows 0-1, 2-3, 4), as
    when a grid does not fit the GPU at once: each launch's pointers start at its first row
    (lengths, h0, c0 and every (T, B, ...) buffer), B stays the row stride."""
    T, B, H = 5, 5, 12
    L = torch.tensor([5, 1, 0, 3, 4])
    case, gin = make_case(cell, T, B, H, torch.float64, lengths=L, reverse=reverse,
                          key=("turns", cell, reverse, poll))  # fmt: skip
    plan = make_plan(H, B, GATES[cell], torch.float64, torch.device(DEVICE), BLOCK_B=2,
                     on_chip=False, b_chunk=1, poll=poll)  # fmt: skip
    assert plan.persistent and plan.n_b == 3 and plan.nprog == 1
    run_and_compare(cell, case, gin, reverse, torch.float64, plan_fwd=plan, plan_bwd=plan)


def test_batch_tiles_in_turns_projected():
    T, B, H, P = 4, 5, 12, 6
    L = torch.tensor([4, 2, 0, 3, 1])
    case, gin = make_proj_case(T, B, H, P, torch.float64, lengths=L, key="turns")
    plan = Plan(BH=16, BLOCK_B=2, n_h=1, n_b=3, resident=True, persistent=True, KC=16,
                BP=8, b_chunk=1, poll=True)  # fmt: skip
    run_and_compare_proj(case, gin, True, torch.float64, plan_fwd=plan, plan_bwd=plan)


def test_plans_take_batch_tiles_in_turns():
    """On a GPU: all batch tiles in one launch when their programs fit, else as many tiles
    per launch as fit, else (not even one tile's programs fit) one launch per step."""
    cuda = torch.device("cuda")
    small = make_plan(768, 16, 4, torch.bfloat16, cuda, sm_count=132)
    assert small.persistent and small.b_chunk == 0 and small.nprog == 96
    big = make_plan(768, 1024, 4, torch.bfloat16, cuda, sm_count=132)
    assert big.persistent and big.n_h == 12 and big.n_b == 16 and big.b_chunk == 11
    assert big.nprog == 132
    proj = make_plan(1024, 2048, 4, torch.bfloat16, cuda, sm_count=132, proj_size=256)
    assert proj.persistent and proj.nprog <= 132 < proj.n_h * proj.n_b
    huge = make_plan(16384, 16, 4, torch.bfloat16, cuda, sm_count=132)
    assert not huge.persistent


def test_gru_without_b_hn():
    case, gin = make_case("gru", 5, 2, 12, torch.float64, b_hn=False, key="nobhn")
    run_and_compare("gru", case, gin, False, torch.float64)


def test_all_sequences_empty_and_T_zero():
    case, gin = make_case("lstm", 3, 2, 8, torch.float64, lengths=[0, 0], key="empty")
    run_and_compare("lstm", case, gin, True, torch.float64)
    be = TritonBackend()
    xg = torch.randn(0, 2, 32, dtype=torch.float64)
    w = torch.randn(32, 8, dtype=torch.float64)
    h0 = torch.randn(2, 8, dtype=torch.float64)
    y, h_T, c_T, _ = be.forward(Inputs("lstm", xg, w, h0), False)
    assert y.shape == (0, 2, 8) and torch.equal(h_T, h0) and torch.equal(c_T, torch.zeros(2, 8))


# ---------------------------------------------------------------- regularized steps

# the layouts of the work a regularized step must survive: h kept on chip; one persistent
# program exchanging h (dgates) through memory, weights resident and polled, or streamed;
# programs over the units, one launch per step
REG_PLANS = {
    "on_chip": dict(on_chip=True),
    "polled": dict(on_chip=False, KC=16),
    "streamed": dict(on_chip=False, KC=16, resident=False),
    "per_step": dict(on_chip=False, BH=8, KC=16),
}


def _regularization(cell, T, B, H, training, layer_norm, key):
    """Zoneout and recurrent dropout as gpurnn.regularized.draw makes them (masks from
    torch's generator; eval keeps zoneout's rate alone), with LayerNorm of W_hh h (and of
    c for the LSTM) under random weights and biases."""
    from gpurnn import masks
    from gpurnn.backends.base import Regularization

    g = _gen("reg", key)
    torch.manual_seed(int(g.initial_seed() % 2**31))
    ln = {}
    if layer_norm:
        G = GATES[cell]

        def affine(n):
            return (1 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
                    0.3 * torch.randn(n, generator=g, dtype=torch.float64))  # fmt: skip

        ln = dict(zip(("ln_hh_weight", "ln_hh_bias"), affine(G * H)))
        if cell == "lstm":
            ln.update(zip(("ln_c_weight", "ln_c_bias"), affine(H)))
    if not training:
        return Regularization(zoneout=0.3, **ln)
    return Regularization(
        0.3, masks.draw((T, B, H), 0.3, DEVICE),
        masks.draw((T, B, H), 0.3, DEVICE) if cell == "lstm" else None,
        0.4, masks.draw((B, H), 0.6, DEVICE), **ln,
    )  # fmt: skip


@pytest.mark.parametrize("layer_norm", (False, True), ids=("masks", "masks-ln"))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("layout", REG_PLANS)
@pytest.mark.parametrize("cell", CELLS)
def test_regularized_step(cell, layout, training, layer_norm):
    """Zoneout (h and c) and recurrent dropout fused into the step, and LayerNorm of W_hh h
    (and of c) with its statistics exchanged between programs, reverse with lengths (a
    row's state rides through its padded steps), against the float64 reference: y, the
    final states, dxg, dh0, dc0, the weight gradients (h_{t-1} masked as it entered W_hh;
    with LayerNorm, W_hh's from the gradient before LN_hh) and LayerNorm's."""
    from gpurnn.backends.common import kernel_weight_grads
    from gpurnn.backends.numpy import NumpyBackend
    from gpurnn.backends.triton import _kernel_regularizers, _layer_norm_grads

    if layout != "polled" and not training:
        pytest.skip("eval's zoneout is one rate: the polled layout covers it")
    if layer_norm and cell == "rnn_relu" and layout != "polled":
        pytest.skip("LayerNorm's step is rnn_tanh's but for the activation: polled covers it")
    T, B, H = 5, 3, 20
    L = torch.tensor([5, 2, 0])
    case, gin = make_case(cell, T, B, H, torch.float64, lengths=L, reverse=True,
                          key=("reg", layout, training, layer_norm))  # fmt: skip
    G = GATES[cell]
    plan = make_plan(H, B, G, torch.float64, torch.device(DEVICE), **REG_PLANS[layout])
    assert plan.on_chip == (layout == "on_chip") and plan.persistent == (layout != "per_step")
    reg = _regularization(cell, T, B, H, training, layer_norm, ("reg", cell, layout))
    c = case
    inputs = Inputs(cell, c["xg"], c["w_hh"], c["h0"], c["c0"], c["lengths"], True, c["b_hn"])
    kw = _kernel_regularizers(reg, torch.float64)
    y, h_T, c_T, ws = launch.forward(cell, *inputs[1:8], True, plan=plan, precision="ieee", **kw)
    dxg, dhn, dh0, dc0, *ln_out = launch.backward(
        cell, c["w_hh"], c["h0"], c["c0"], L, True, y, ws, gin["dy"], gin["dh_T"], gin["dc_T"],
        plan=plan, precision="ieee", **kw,
    )  # fmt: skip
    assert len(ln_out) == (2 if layer_norm else 0)
    factors = None
    if reg.recurrent_mask is not None:
        from gpurnn import masks

        factors = masks.dropout_factors(reg.recurrent_mask, H, reg.recurrent_dropout, y.dtype)
    drec, dln_c = ln_out if layer_norm else (None, None)  # (W_hh multiplied drec)
    dw_hh, db_hn = kernel_weight_grads(cell, dxg, dhn, y, c["h0"], L, True, c["b_hn"], factors,
                                       drec)  # fmt: skip
    if layer_norm:
        ln_grads = _layer_norm_grads(cell, reg, dxg, dhn, ws, dln_c)

    numpy = NumpyBackend()
    ry, rh, rc, _ = numpy.regularized_forward(inputs, reg, False)
    grads, ref_ln = numpy.regularized_backward(inputs, reg, ry, None, gin["dy"], gin["dh_T"],
                                               gin["dc_T"])  # fmt: skip
    got = dict(y=y, h_T=h_T, c_T=c_T, xg=dxg, h0=dh0, c0=dc0, w_hh=dw_hh, b_hn=db_hn)
    want = dict(y=ry, h_T=rh, c_T=rc, xg=grads.xg, h0=grads.h0, c0=grads.c0, w_hh=grads.w_hh,
                b_hn=grads.b_hn)  # fmt: skip
    if layer_norm:
        got.update(ln_grads._asdict())
        want.update(ref_ln._asdict())
    for name, expected in want.items():
        check(got[name], _np(expected), torch.float64, f"{cell} {layout} {name}")


# ---------------------------------------------------------------- options and introspection


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_recompute_option(cell):
    """recompute: forward keeps no workspace, backward reruns the forward kernel; the
    gradients are the same as with a saved workspace."""
    case, gin = make_case(cell, 5, 3, 12, torch.float64, lengths=[5, 3, 1], key="recompute")
    be = TritonBackend()
    be.recompute = True
    assert be.backward_uses_xg
    assert be.workspace_spec(cell, 5, 3, 12, torch.float64, True)[0] == (0,)
    y, _, _, ws = be.forward(Inputs(cell, case["xg"], case["w_hh"], case["h0"], case["c0"],
                                    case["lengths"], False, case["b_hn"]), True)  # fmt: skip
    assert ws.numel() == 0
    run_and_compare(cell, case, gin, False, torch.float64, backend=be)


def test_save_false_writes_no_workspace():
    case, _ = make_case("gru", 4, 2, 8, torch.float64, key="nosave")
    be = TritonBackend()
    *_, ws = be.forward(Inputs("gru", case["xg"], case["w_hh"], b_hn=case["b_hn"]), False)
    assert ws.numel() == 0
    shape, dtype = be.workspace_spec("gru", 4, 2, 8, torch.float64, True)
    assert shape == (4, 2, 32) and dtype == torch.float64


def test_unpack_workspace_lstm():
    """The workspace holds every step's gates and cell state, as documented."""
    T, B, H = 4, 3, 8
    case, _ = make_case("lstm", T, B, H, torch.float64, lengths=[4, 2, 3], key="unpack")
    be = TritonBackend()
    y, h_T, c_T, ws = be.forward(Inputs("lstm", case["xg"], case["w_hh"], case["h0"],
                                        case["c0"], case["lengths"]), True)  # fmt: skip
    assert ws.shape == be.workspace_spec("lstm", T, B, H, torch.float64, True)[0]
    f = launch.unpack_workspace("lstm", ws, H)
    assert set(f) == {"i", "f", "g", "o", "c"}
    # step 0 from first principles
    pre = case["xg"][0] + case["h0"] @ case["w_hh"].T
    i, fg, g, o = pre.split(H, dim=1)
    torch.testing.assert_close(f["i"][0], torch.sigmoid(i))
    torch.testing.assert_close(f["g"][0], torch.tanh(g))
    c1 = torch.sigmoid(fg) * case["c0"] + torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(f["c"][0], c1)
    torch.testing.assert_close(y[0], torch.sigmoid(o) * torch.tanh(c1))
    # the last valid step's c is c_T; past a sequence's end everything is 0
    torch.testing.assert_close(f["c"][1, 1], c_T[1])
    assert (f["c"][2:, 1] == 0).all() and (f["o"][3:, 2] == 0).all()


def test_unsupported_reasons():
    be = TritonBackend()
    cpu = torch.device("cpu")
    assert be.unsupported_reason("lstm", cpu, torch.float32, True) is None
    assert be.unsupported_reason("lstm", cpu, torch.float32, False) is None
    assert be.unsupported_reason("gru", cpu, torch.float16, False) is None
    assert be.unsupported_reason("lstm", cpu, torch.int32, False) is not None
    assert "interpreter" in be.unsupported_reason("lstm", cpu, torch.bfloat16, False)
    assert be.unavailable_reason() is None
    with pytest.raises(RuntimeError, match="bfloat16"):
        be.forward(Inputs("lstm", torch.randn(2, 1, 16, dtype=torch.bfloat16),
                          torch.randn(16, 2, dtype=torch.bfloat16),
                          w_hr=torch.randn(2, 4, dtype=torch.bfloat16)), False)  # fmt: skip


def test_no_recompile_for_new_T_or_B():
    """T, B and the step range are not specialised (do_not_specialize), so a new sequence
    length or batch size reuses the compiled kernel; B only picks a size bucket (BLOCK_B)."""
    names = ["T", "B", "nrows", "s_begin", "s_end", "wait_bound"]
    kernels = (_recurrence_fwd_kernel, _recurrence_bwd_kernel, _lstmp_fwd_kernel,
               _lstmp_bwd_kernel)  # fmt: skip
    for k in kernels:
        if hasattr(k, "do_not_specialize"):  # compiled mode
            dns = {k.arg_names[i] if isinstance(i, int) else i for i in k.do_not_specialize}
            assert set(names) <= dns
        else:  # the interpreter's wrapper drops the decorator arguments: read the source
            src = inspect.getsource(k.fn)
            listed = ", ".join(f'"{n}"' for n in names)
            assert f"@triton.jit(do_not_specialize=[{listed}])" in src
    if not ON_GPU:
        plan = make_plan(20, 3, 4, torch.float32, torch.device("cpu"))
        assert plan.BLOCK_B == 4 and plan.nprog == 1


# ---------------------------------------------------------------- LSTM with projection


def make_proj_case(T, B, H, P, dtype, *, h0=True, lengths=None, key=()):
    """Random inputs of a projected LSTM: w_hh (4H, P), w_hr (P, H), h0 (B, P), c0 (B, H)."""
    g = _gen("proj", T, B, H, P, str(dtype), h0, key)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(DEVICE)

    case = dict(
        xg=rnd(T, B, 4 * H),
        w_hh=rnd(4 * H, P, s=P**-0.5),
        w_hr=rnd(P, H, s=H**-0.5),
        h0=rnd(B, P) if h0 else None,
        c0=rnd(B, H) if h0 else None,
        lengths=None if lengths is None else torch.as_tensor(lengths).to(DEVICE),
    )
    grads_in = dict(dy=rnd(T, B, P), dh_T=rnd(B, P), dc_T=rnd(B, H))
    return case, grads_in


def run_and_compare_proj(case, gin, reverse, dtype, backend=None, plan_fwd=None,
                         plan_bwd=None):  # fmt: skip
    """Forward and backward of a projected LSTM through the backend (or the launchers with
    explicit plans, then dW_hr from their dhp output), every output and gradient checked
    against the reference."""
    c = case
    args = (c["xg"], c["w_hh"], c["h0"], c["c0"], c["lengths"], reverse, None)
    if plan_fwd is None:
        be = backend or TritonBackend()
        inputs = Inputs("lstm", *args, c["w_hr"])
        y, h_T, c_T, ws = be.forward(inputs, True)
        g = be.backward(inputs, y, ws, gin["dy"], gin["dh_T"], gin["dc_T"])
        got = dict(xg=g.xg, w_hh=g.w_hh, h0=g.h0, c0=g.c0, w_hr=g.w_hr)
    else:
        y, h_T, c_T, ws = launch.forward("lstm", *args, True, w_hr=c["w_hr"], plan=plan_fwd,
                                         precision="ieee")  # fmt: skip
        dxg, dhp, dh0, dc0 = launch.backward(
            "lstm", c["w_hh"], c["h0"], c["c0"], c["lengths"], reverse, y, ws,
            gin["dy"], gin["dh_T"], gin["dc_T"], w_hr=c["w_hr"], plan=plan_bwd,
            precision="ieee",
        )  # fmt: skip
        assert dhp.shape == y.shape
        f = launch.unpack_workspace("lstm", ws, c["w_hr"].shape[1])
        m = f["o"] * torch.tanh(f["c"])
        dw_hr = torch.einsum("tbp,tbh->ph", dhp.double(), m.double())
        got = dict(xg=dxg, h0=dh0, c0=dc0, w_hr=dw_hr)
    npa = {k: _np(v) for k, v in c.items()}
    fwd_args = (npa["xg"], npa["w_hh"], npa["h0"], npa["c0"], npa["lengths"], reverse, None)
    ry, rh, rc = ref.recurrence_forward("lstm", *fwd_args, npa["w_hr"])
    check(y, ry, dtype, "y")
    check(h_T, rh, dtype, "h_T")
    check(c_T, rc, dtype, "c_T")
    rg = ref.recurrence_backward("lstm", *fwd_args, npa["w_hr"], _np(gin["dy"]),
                                 _np(gin["dh_T"]), _np(gin["dc_T"]))  # fmt: skip
    if plan_fwd is not None and c["h0"] is None:
        # the launchers return dh0/dc0 whether or not h0/c0 were given (zeros count)
        B, P, H = y.shape[1], y.shape[2], c["w_hr"].shape[1]
        zf = (npa["xg"], npa["w_hh"], np.zeros((B, P)), np.zeros((B, H)), npa["lengths"],
              reverse, None)  # fmt: skip
        rz = ref.recurrence_backward("lstm", *zf, npa["w_hr"], _np(gin["dy"]),
                                     _np(gin["dh_T"]), _np(gin["dc_T"]))  # fmt: skip
        rg = dict(rg, h0=rz["h0"], c0=rz["c0"])
    for k, v in got.items():
        check(v, rg[k], dtype, f"d{k}")
    return y, ws


TP_, BP_, HP_, PP_ = 5, 3, 20, 6  # P smaller than H, neither a power of two


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=("float64", "float32"))
@pytest.mark.parametrize("h0", (True, False), ids=("h0", "noh0"))
@pytest.mark.parametrize("lengths", (None, "with_zero"), ids=("full", "lengths"))
@pytest.mark.parametrize("reverse", (False, True), ids=("fwd", "rev"))
def test_proj_matches_reference(reverse, lengths, h0, dtype):
    """One program through the backend: gates, m exchanged through memory, projection."""
    key = ("proj", reverse, lengths, h0, str(dtype))
    L = _lengths(lengths, BP_, TP_, key)
    case, gin = make_proj_case(TP_, BP_, HP_, PP_, dtype, h0=h0, lengths=L, key=key)
    run_and_compare_proj(case, gin, reverse, dtype)


def test_proj_float16_and_P_above_H():
    """A projection wider than the hidden state is legal in torch.nn (only P < H is
    useful); 16-bit exchange buffers."""
    case, gin = make_proj_case(4, 2, 8, 12, torch.float16, lengths=[4, 2], key="wide")
    run_and_compare_proj(case, gin, True, torch.float16)


@pytest.mark.parametrize(
    "resident,BP", ((True, 4), (False, 4), (True, 8)), ids=("resident", "streamed", "idle")
)
@pytest.mark.parametrize("reverse", (False, True), ids=("fwd", "rev"))
@pytest.mark.parametrize("poll", (True, False), ids=("poll", "plain"))
def test_proj_many_programs_per_phase_launches(poll, reverse, resident, BP):
    """Units over 3 programs (8 each, the last partial), projected outputs over 3 programs
    (BP = 4 each, the last partial; or 8 each, the third program idle in the projection),
    batch over 2 tiles, each phase of each step its own launch (launch boundaries stand in
    for the two grid barriers): the exchanges of m and h forward, of dh and dgates
    backward, across programs."""
    T, B, H, P = 4, 5, 20, 10
    L = torch.tensor([4, 2, 0, 3, 1])
    case, gin = make_proj_case(T, B, H, P, torch.float64, lengths=L, key=("many", resident, BP))
    plan = Plan(BH=8, BLOCK_B=4, n_h=3, n_b=2, resident=resident, persistent=False, KC=16,
                BP=BP, poll=poll)  # fmt: skip
    run_and_compare_proj(case, gin, reverse, torch.float64, plan_fwd=plan, plan_bwd=plan)


# one program through the backend; units and outputs over 3 programs, batch over 2 tiles,
# each phase its own launch, the exchanges polled (weights resident) or not (streamed)
PROJ_REG_PLANS = {
    "backend": None,
    "polled": Plan(BH=8, BLOCK_B=4, n_h=3, n_b=2, resident=True, persistent=False, KC=16, BP=4,
                   poll=True),
    "streamed": Plan(BH=8, BLOCK_B=4, n_h=3, n_b=2, resident=False, persistent=False, KC=16,
                     BP=4),
}  # fmt: skip


# through the backend every direction x mode, masks alone and with LayerNorm; across
# programs in training (eval's zoneout is one rate: the backend's cases cover it), the
# masks both ways, LayerNorm (whose per-phase launches run phase 1 three times a step
# under the interpreter: slow) polled in reverse and streamed forward
PROJ_REG_CASES = [
    (layout, reverse, training, ln)
    for layout in PROJ_REG_PLANS
    for reverse in (False, True)
    for training in (True, False)
    for ln in (False, True)
    if layout == "backend" or (training and (not ln or (layout == "polled") == reverse))
]


@pytest.mark.parametrize(
    "layout, reverse, training, layer_norm", PROJ_REG_CASES,
    ids=[f"{lay}-{'rev' if r else 'fwd'}-{'train' if t else 'eval'}-{'masks-ln' if n else 'masks'}"
         for lay, r, t, n in PROJ_REG_CASES],
)  # fmt: skip
def test_proj_regularized_step(layout, reverse, training, layer_norm):
    """The projected LSTM with zoneout (h P wide in the projection phase, c H wide in the
    gates phase), recurrent dropout (its mask on the P-wide h that enters W_hh),
    DropConnect (a masked W_hh) and LayerNorm of W_hh h and of c (in the gates phase, its
    statistics exchanged between the programs): every output and gradient, dW_hr too (its
    m rebuilt from c̃, and LN_c, where the saved c is blended), LayerNorm's parameters
    through the backend, against the float64 reference."""
    from gpurnn import masks
    from gpurnn.backends.base import Regularization
    from gpurnn.backends.numpy import NumpyBackend
    from gpurnn.backends.triton import _kernel_regularizers, _weights

    T, B, H, P = 4, 5, 20, 10
    L = torch.tensor([4, 2, 0, 3, 1])
    case, gin = make_proj_case(T, B, H, P, torch.float64, lengths=L,
                               key=("proj-reg", layout, reverse, training, layer_norm))  # fmt: skip
    g = _gen("proj-reg", layout, reverse, layer_norm)
    torch.manual_seed(int(g.initial_seed() % 2**31))
    ln = ()
    if layer_norm:
        ln = tuple(torch.randn(n, generator=g, dtype=torch.float64) * 0.3 + shift
                   for n, shift in ((4 * H, 1.0), (4 * H, 0.0), (H, 1.0), (H, 0.0)))  # fmt: skip
    if training:
        reg = Regularization(
            0.3, masks.draw((T, B, P), 0.3, DEVICE), masks.draw((T, B, H), 0.3, DEVICE),
            0.4, masks.draw((B, P), 0.6, DEVICE), 0.3, masks.draw((4 * H, P), 0.7, DEVICE), *ln,
        )  # fmt: skip
    else:
        reg = Regularization(0.3, None, None, 0.0, None, 0.0, None, *ln)
    c = case
    inputs = Inputs("lstm", c["xg"], c["w_hh"], c["h0"], c["c0"], L, reverse, None, c["w_hr"])
    be = TritonBackend()
    be.fp32_precision = "ieee"
    plan = PROJ_REG_PLANS[layout]
    if plan is None:
        y, h_T, c_T, ws = be.regularized_forward(inputs, reg, True)
        gr, ln_grads = be.regularized_backward(inputs, reg, y, ws, gin["dy"], gin["dh_T"],
                                               gin["dc_T"])  # fmt: skip
        got = dict(y=y, h_T=h_T, c_T=c_T, xg=gr.xg, h0=gr.h0, c0=gr.c0, w_hh=gr.w_hh,
                   w_hr=gr.w_hr, **(ln_grads._asdict() if layer_norm else {}))  # fmt: skip
    else:
        kw = _kernel_regularizers(reg, torch.float64)
        w_run = _weights(c["w_hh"], reg)
        y, h_T, c_T, ws = launch.forward("lstm", c["xg"], w_run, c["h0"], c["c0"], L, reverse,
                                         None, True, w_hr=c["w_hr"], plan=plan,
                                         precision="ieee", **kw)  # fmt: skip
        dxg, _, dh0, dc0, *_ = launch.backward(
            "lstm", w_run, c["h0"], c["c0"], L, reverse, y, ws, gin["dy"], gin["dh_T"],
            gin["dc_T"], w_hr=c["w_hr"], plan=plan, precision="ieee", **kw,
        )  # fmt: skip
        got = dict(y=y, h_T=h_T, c_T=c_T, xg=dxg, h0=dh0, c0=dc0)
    numpy = NumpyBackend()
    ry, rh, rc, _ = numpy.regularized_forward(inputs, reg, False)
    grads, ref_ln = numpy.regularized_backward(inputs, reg, ry, None, gin["dy"], gin["dh_T"],
                                               gin["dc_T"])  # fmt: skip
    want = dict(y=ry, h_T=rh, c_T=rc, xg=grads.xg, h0=grads.h0, c0=grads.c0, w_hh=grads.w_hh,
                w_hr=grads.w_hr, **ref_ln._asdict())  # fmt: skip
    for name, value in got.items():
        check(value, _np(want[name]), torch.float64, f"proj {layout} {name}")


@pytest.mark.parametrize("chunks_per_trip", (1, 2))
def test_proj_k_chunks(chunks_per_trip):
    """H = 40 and P = 20 over K chunks of 16 (the last ones partial), one program, no
    h0/c0: the dots over P (gates forward, dm backward), over H (projection forward) and
    over the gates' 4H (backward) all chunked; the backward's dgates loaded 1 or 2 chunks
    per round trip."""
    T, B, H, P = 4, 2, 40, 20
    case, gin = make_proj_case(T, B, H, P, torch.float64, h0=False, key=("kc", chunks_per_trip))
    plan = make_plan(H, B, 4, torch.float64, torch.device(DEVICE), KC=16, proj_size=P,
                     chunks_per_trip=chunks_per_trip)  # fmt: skip
    assert plan.nprog == 1 and plan.persistent and plan.BP == 32
    run_and_compare_proj(case, gin, False, torch.float64, plan_fwd=plan, plan_bwd=plan)


def test_proj_polled_exchange_with_genuine_nans():
    """As `test_polled_exchange_with_genuine_nans`, for both phases of the projected kernels:
    a NaN in xg (forward) and in dy (backward) reaches every product of its sequence; the
    polls must tell it from data on its way and go on (a tiny spin bound raises otherwise)."""
    T, B, H, P = 5, 2, 12, 6
    case, gin = make_proj_case(T, B, H, P, torch.float64, key="nan")
    case["xg"][2, 1, 3] = float("nan")
    gin["dy"][1, 1, 4] = float("nan")
    plan = make_plan(H, B, 4, torch.float64, torch.device(DEVICE), KC=16, proj_size=P)
    assert plan.persistent and _polls(plan)
    c = case
    y, h_T, c_T, ws = launch.forward("lstm", c["xg"], c["w_hh"], c["h0"], c["c0"], None, False,
                                     None, True, w_hr=c["w_hr"], plan=plan, precision="ieee",
                                     wait_bound=20)  # fmt: skip
    dxg, _, dh0, _ = launch.backward("lstm", c["w_hh"], c["h0"], c["c0"], None, False, y, ws,
                                     gin["dy"], gin["dh_T"], gin["dc_T"], w_hr=c["w_hr"],
                                     plan=plan, precision="ieee", wait_bound=20)  # fmt: skip
    n = {k: _np(v) for k, v in c.items()}
    fwd_args = (n["xg"], n["w_hh"], n["h0"], n["c0"], None, False, None)
    ry, rh, _ = ref.recurrence_forward("lstm", *fwd_args, n["w_hr"])
    rg = ref.recurrence_backward("lstm", *fwd_args, n["w_hr"], _np(gin["dy"]), _np(gin["dh_T"]),
                                 _np(gin["dc_T"]))  # fmt: skip
    for got, exp, what in ((y, ry, "y"), (h_T, rh, "h_T"), (dxg, rg["xg"], "dxg"),
                           (dh0, rg["h0"], "dh0")):  # fmt: skip
        g = _np(got)
        assert (np.isnan(g) == np.isnan(exp)).all() and np.isnan(exp).any(), what
        other = (slice(None), 0) if g.ndim == 3 else (0,)
        np.testing.assert_allclose(g[other], exp[other], atol=1e-10, rtol=1e-10, err_msg=what)


def test_proj_recompute_and_empty():
    """recompute rebuilds the workspace (and m from it); T = 0 returns the initial states."""
    case, gin = make_proj_case(4, 3, 12, 5, torch.float64, lengths=[4, 0, 2], key="recompute")
    be = TritonBackend()
    be.recompute = True
    run_and_compare_proj(case, gin, True, torch.float64, backend=be)
    y, h_T, c_T, _ = be.forward(Inputs("lstm", case["xg"][:0], case["w_hh"], case["h0"],
                                       case["c0"], w_hr=case["w_hr"]), False)  # fmt: skip
    assert y.shape == (0, 3, 5) and torch.equal(h_T, case["h0"]) and torch.equal(c_T, case["c0"])


def test_proj_workspace_spec():
    """The workspace of a projected LSTM is the unprojected one's (i, f, g, o, c; H wide)."""
    T, B, H, P = 3, 2, 8, 4
    case, _ = make_proj_case(T, B, H, P, torch.float64, key="spec")
    be = TritonBackend()
    inputs = Inputs("lstm", case["xg"], case["w_hh"], case["h0"], case["c0"], w_hr=case["w_hr"])
    *_, ws = be.forward(inputs, True)
    assert ws.shape == be.workspace_spec("lstm", T, B, H, torch.float64, True)[0] == (T, B, 5 * H)


@pytest.mark.parametrize("packed", (False, True), ids=("padded", "packed"))
def test_proj_module_matches_torch_nn(packed):
    """gpurnn.LSTM(proj_size=...) on the triton backend against torch.nn.LSTM in float64:
    two bidirectional layers (the second takes 2P inputs), outputs, states and every
    parameter's gradient (weight_hr included)."""
    import gpurnn
    from tests.helpers import uneven_lengths
    from tests.test_modules import compare_forward_backward, random_hx

    g = _gen("proj-module", packed)
    T, B, F, H, P = 5, 3, 4, 10, 4
    ref_m = torch.nn.LSTM(F, H, num_layers=2, bidirectional=True, proj_size=P,
                          dtype=torch.float64)  # fmt: skip
    ours = gpurnn.LSTM(F, H, num_layers=2, bidirectional=True, proj_size=P, dtype=torch.float64,
                       backend="triton")  # fmt: skip
    ours.load_state_dict(ref_m.state_dict())
    x = torch.randn(T, B, F, generator=g, dtype=torch.float64)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    hx = random_hx("lstm", 2, 2, B, H, P)
    lengths = uneven_lengths(B, T, g) if packed else None
    compare_forward_backward("lstm", ref_m, ours, x, hx, lengths, False)


def test_layer_norm_eps_is_the_modules():
    """The kernels' LayerNorm epsilon is the one the modules and the reference use."""
    from gpurnn.kernels.triton import norm

    from gpurnn.cells import LAYER_NORM_EPS

    assert norm.EPS.value == LAYER_NORM_EPS
