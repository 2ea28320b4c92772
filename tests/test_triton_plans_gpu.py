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
