"""The triton kernels compile for sm_90 (Hopper) as `make_plan` lays them out on an H100,
with no register spills, shared memory within the device limit, and a step loop that has
the shape the design promises. Needs no GPU: `gpurnn.bench.sm90` compiles every variant for
GPUTarget("cuda", 90, 32) and counts its step loop (`gpurnn.bench.sass`); the table is
printed here (pytest -s) and by `python -m gpurnn.bench.sm90` (or this module run as a script).
"""

from __future__ import annotations

import sys

import pytest

triton = pytest.importorskip("triton")
from gpurnn.kernels.triton.plan import _polls  # noqa: E402

from gpurnn.bench import sass, sm90  # noqa: E402
from gpurnn.bench.sm90 import SMEM_LIMIT, VARIANTS, _fields, _id, plan_for  # noqa: E402
from gpurnn.cells import GATES  # noqa: E402

pytestmark = pytest.mark.skipif(
    sm90.CUOBJDUMP is None or sass.tool("nvdisasm") is None,
    reason="cuobjdump/nvdisasm not found (Triton ships them)",
)


@pytest.fixture(scope="module")
def resources() -> dict[int, dict]:
    """Every variant compiled, by one subprocess per CPU core; the table printed."""
    results = sm90.compile_all()
    print("\n" + sm90.table(results))
    return results


IDS = [_id(v) for v in VARIANTS]


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=IDS)
def test_compiles_for_sm90_without_spills(resources, index):
    r = resources[index]
    # (a small stack frame outside the loop is ptxas's business; spills inside it are ours)
    assert r["local"] == 0 and r["spills"] == 0, f"spills in the step loop: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} B > {SMEM_LIMIT} B"


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=IDS)
def test_step_loop_shape(resources, index):
    """Ceilings the step loops meet (and the first kernels did not: 12 dependent h loads and
    57 block barriers per forward step at LSTM H=768, 48 dgates round trips and W_hh loads in
    the backward's loop)."""
    cell, dt, H, B, bwd, P = _fields(VARIANTS[index])
    r = resources[index]
    plan = plan_for(VARIANTS[index])
    if P:
        # two phases (and two grid barriers) per step: the ceilings below are the
        # one-phase kernels'; the projected kernels are held to no spills only
        return
    if plan.on_chip:
        # h (dgates) never leave the program: no exchange loads at all
        assert r["loads"] == 0 and r["trips"] == 0, r
        return
    if plan.resident:
        # weights stay in shared memory: the only other global loads are the step's own
        # inputs (xg forward; dy, the saved fields and c/h_{t-1} backward)
        assert r["other_ldg"] <= (4 if not bwd else 16), r
    if not bwd and plan.resident and plan.BLOCK_B == 16:
        # every h load of the step is issued before the first is used (ptxas sometimes
        # consumes the first one early: 2 waves at most)
        assert r["trips"] <= 2, f"the forward's h loads of a step wait on each other: {r}"
        # polled exchange (no grid barrier): + the NaN check's block reduction, + the rare
        # path's element-wise check
        assert r["bar"] <= (14 if _polls(plan) else 8), r
        assert r["spin_loops"] == (0 if _polls(plan) else 1), "a grid barrier is left"
    if plan.resident and plan.BLOCK_B == 16 and r["mma"]:
        # one accumulator per K chunk: no MMA waits on more than a chunk's worth of others
        # (folded into one accumulator, the first kernels chained all H/16 of them: 48)
        assert r["mma_depth"] <= 2 * plan.KC // 16, f"one long chain of dependent MMAs: {r}"
    if bwd and plan.resident and plan.BLOCK_B == 16:
        # at most one round trip per K chunk of every gate (the first kernel: one per 64-wide
        # chunk of each gate, 48 at LSTM H=768), and no warp repeats another's MMAs: G*H/16
        # k-steps of one 8-column tile, spread over the gates' warps
        assert r["trips"] <= triton.cdiv(H, plan.KC), r
        if GATES[cell] == 4:
            assert r["mma"] <= H // 16, r


if __name__ == "__main__":
    sys.exit(sm90.main(sys.argv[1:]))
