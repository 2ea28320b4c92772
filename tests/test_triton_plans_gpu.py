"""Each kind of plan `make_plan` picks on a GPU, against the float64 reference at real sizes:
on chip (small layers, no exchange, no grid barrier), 16-row and 64-row batch tiles with
resident weights, the polled exchange and the grid barrier, several batch tiles (also in
turns),
and streamed weights with 64-row tiles. Marked `gpu`
(conftest.py skips them without CUDA); the streamed 64-row case compiles for about a minute
cold and is also marked `slow`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gpurnn.kernels.triton.plan import _polls, make_plan  # noqa: E402

from gpurnn.cells import GATES  # noqa: E402
from tests.conftest import seeded_generator  # noqa: E402
from tests.test_triton_gpu import TOL, make_case, run_vs_reference  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


def _lengths(B, T, key):
    L = torch.randint(0, T + 1, (B,), generator=seeded_generator("plans", *key))
    L[0] = T
    return L


@pytest.mark.parametrize("cell", ("lstm", "gru", "rnn_tanh", "rnn_relu"))
@pytest.mark.parametrize("H,B", ((128, 1), (64, 5)))
def test_on_chip(cell, H, B):
    """W_hh whole in one program: h and dgates never leave it."""
    T = 32
    for backward in (False, True):
        assert make_plan(H, B, GATES[cell], torch.bfloat16, DEV, backward=backward).on_chip
    case, gin = make_case(cell, T, B, H, torch.bfloat16, lengths=_lengths(B, T, (cell, H)),
                          reverse=True)  # fmt: skip
    run_vs_reference(cell, case, gin, True, TOL[torch.bfloat16])


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_batch_tile_64(cell):
    """B=64: one 64-row batch tile (wgmma), 96 programs, persistent."""
    T, B, H = 24, 64, 768
    plan = make_plan(H, B, GATES[cell], torch.bfloat16, DEV)
    assert plan.BLOCK_B == 64 and plan.persistent and not plan.on_chip
    case, gin = make_case(cell, T, B, H, torch.bfloat16, lengths=_lengths(B, T, (cell, "b64")))
    run_vs_reference(cell, case, gin, False, TOL[torch.bfloat16])


@pytest.mark.parametrize("poll", (True, False), ids=("polled", "grid-barrier"))
def test_exchange_kinds(poll, cell="lstm"):
    """H=768 B=16 over 96 programs: forward and backward poll what they exchange (h, dgates;
    the default), or wait at the grid barrier (what the streamed plans use)."""
    T, B, H = 40, 16, 768
    plan = make_plan(H, B, GATES[cell], torch.bfloat16, DEV, poll=poll)
    assert plan.persistent and plan.nprog > 1 and _polls(plan) == poll
    case, gin = make_case(cell, T, B, H, torch.bfloat16, lengths=_lengths(B, T, (cell, poll)),
                          reverse=poll)  # fmt: skip
    run_vs_reference(cell, case, gin, poll, TOL[torch.bfloat16], plan=plan)


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_batch_tiles_in_turns(cell):
    """Persistent launches over 2 of the 4 batch tiles each (what a plan does when the grid
    would not fit the GPU at once), polled exchange, with lengths."""
    T, B, H = 24, 200, 256
    plan = make_plan(H, B, GATES[cell], torch.bfloat16, DEV, b_chunk=2)
    assert plan.persistent and plan.n_b == 4 and plan.tiles_per_launch == 2
    case, gin = make_case(cell, T, B, H, torch.bfloat16, lengths=_lengths(B, T, (cell, "turns")),
                          reverse=True)  # fmt: skip
    run_vs_reference(cell, case, gin, True, TOL[torch.bfloat16], plan=plan)


def test_one_program_exchange_through_memory():
    """One program over every unit, exchanging h through the (T+1)-row buffer (polled: a
    warp reads the others' h of the step until it has arrived)."""
    T, B, H = 32, 16, 128
    plan = make_plan(H, B, 4, torch.float16, DEV, BH=128, on_chip=False)
    assert plan.nprog == 1 and not plan.on_chip
    case, gin = make_case("lstm", T, B, H, torch.float16, lengths=_lengths(B, T, ("one",)))
    run_vs_reference("lstm", case, gin, True, TOL[torch.float16], plan=plan)


@pytest.mark.slow
def test_streamed_batch_tile_64():
    """B=256, H=1024: 4 batch tiles x 32 units per program, weights streamed."""
    T, B, H = 12, 256, 1024
    plan = make_plan(H, B, 4, torch.bfloat16, DEV)
    assert not plan.resident and plan.BLOCK_B == 64
    case, gin = make_case("lstm", T, B, H, torch.bfloat16)
    run_vs_reference("lstm", case, gin, False, TOL[torch.bfloat16])


_LN_PLANS = {
    "polled": dict(H=768, B=16, kw=dict()),
    "grid-barrier": dict(H=768, B=16, kw=dict(poll=False)),
    "tiles-in-turns": dict(H=256, B=200, kw=dict(b_chunk=2)),
    "streamed": dict(H=256, B=16, kw=dict(resident=False)),
}


@pytest.mark.parametrize("layout", _LN_PLANS)
@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_layer_norm_between_programs(cell, layout):
    """LayerNorm of W_hh h (and of c) with its row statistics exchanged between the
    programs of a batch tile (polled, behind the grid barrier, with batch tiles in turns,
    weights streamed), zoneout and recurrent dropout beside it, reverse with lengths: the
    kernels against the float64 reference, every output and gradient."""
    from gpurnn.kernels.triton import launch

    from gpurnn import masks
    from gpurnn.backends.base import Inputs, Regularization
    from gpurnn.backends.common import kernel_weight_grads
    from gpurnn.backends.numpy import NumpyBackend
    from gpurnn.backends.triton import _kernel_regularizers, _layer_norm_grads

    T, H, B = 24, _LN_PLANS[layout]["H"], _LN_PLANS[layout]["B"]
    G = GATES[cell]
    plan = make_plan(H, B, G, torch.bfloat16, DEV, **_LN_PLANS[layout]["kw"])
    assert plan.persistent and plan.nprog > 1 and not plan.on_chip
    L = _lengths(B, T, (cell, "ln", layout))
    case, gin = make_case(cell, T, B, H, torch.bfloat16, lengths=L, reverse=True)
    g = seeded_generator("ln-plans", cell, layout)
    torch.manual_seed(int(g.initial_seed() % 2**31))

    def affine(n):
        return ((1 + 0.3 * torch.randn(n, generator=g)).cuda(),
                (0.3 * torch.randn(n, generator=g)).cuda())  # fmt: skip

    ln_hh, ln_c = affine(G * H), affine(H) if cell == "lstm" else (None, None)
    reg = Regularization(
        0.2, masks.draw((T, B, H), 0.2, DEV), masks.draw((T, B, H), 0.2, DEV) if cell == "lstm"
        else None, 0.25, masks.draw((B, H), 0.75, DEV), 0.0, None, *ln_hh, *ln_c,
    )  # fmt: skip
    c = case
    inputs = Inputs(cell, c["xg"], c["w_hh"], c["h0"], c["c0"], c["lengths"], True, c["b_hn"])
    kw = _kernel_regularizers(reg, torch.bfloat16)
    y, h_T, c_T, ws = launch.forward(cell, *inputs[1:8], True, plan=plan, **kw)
    bplan = make_plan(H, B, G, torch.bfloat16, DEV, backward=True, **_LN_PLANS[layout]["kw"])
    dxg, dhn, dh0, dc0, drec, dln_c = launch.backward(
        cell, c["w_hh"], c["h0"], c["c0"], c["lengths"], True, y, ws, gin["dy"], gin["dh_T"],
        gin["dc_T"], plan=bplan, **kw,
    )  # fmt: skip
    factors = masks.dropout_factors(reg.recurrent_mask, H, reg.recurrent_dropout, y.dtype)
    dw_hh, _ = kernel_weight_grads(cell, drec, None, y, c["h0"], c["lengths"], True, None,
                                   factors)  # fmt: skip
    got = dict(y=y, h_T=h_T, c_T=c_T, xg=dxg, h0=dh0, c0=dc0, w_hh=dw_hh,
               **_layer_norm_grads(cell, reg, dxg, dhn, ws, dln_c)._asdict())  # fmt: skip

    def cpu(t):  # (float64 on the CPU; masks and lengths as they are)
        if not torch.is_tensor(t):
            return t
        return t.detach().cpu().double() if t.is_floating_point() else t.cpu()

    numpy = NumpyBackend()
    ref_inputs = Inputs(*(cpu(v) for v in inputs))
    ref_reg = Regularization(*(cpu(v) for v in reg))
    ry, rh, rc, _ = numpy.regularized_forward(ref_inputs, ref_reg, False)
    grads, ln_grads = numpy.regularized_backward(ref_inputs, ref_reg, ry, None, cpu(gin["dy"]),
                                                 cpu(gin["dh_T"]), cpu(gin["dc_T"]))  # fmt: skip
    want = dict(y=ry, h_T=rh, c_T=rc, xg=grads.xg, h0=grads.h0, c0=grads.c0, w_hh=grads.w_hh,
                **ln_grads._asdict())  # fmt: skip
    torch.cuda.synchronize()
    for name, expected in want.items():
        if expected is None:
            assert got[name] is None, name
            continue
        e = torch.as_tensor(expected).double()
        err = (cpu(got[name]) - e).abs().max().item() / max(1.0, e.abs().max().item())
        assert err <= TOL[torch.bfloat16], f"{cell} {layout} {name}: {err}"
