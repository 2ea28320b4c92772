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
    cell, dt, H, B, bwd, P, reg = _fields(VARIANTS[index])
    r = resources[index]
    plan = plan_for(VARIANTS[index])
    # the regularized step ("masks": zoneout in training, recurrent dropout) loads one more
    # bit tile a step per zoneout mask (h; c for LSTM), issued a step ahead, and converts the
    # forward's to the gates' layout through shared memory (block barriers); no other cost
    mask_ldg = (2 if cell == "lstm" else 1) if reg == "masks" else 0
    mask_bar = 10 if reg == "masks" and not bwd else 0
    # LayerNorm ("ln") exchanges two numbers per row and program nx times a step (LN_hh's,
    # LN_c's): one more dependent wave and polling loop each, and block reductions over the
    # row (about 16 barriers an exchange, forward); its backward loads the normalized W_hh h
    # and the rows' statistics among its own inputs. (ptxas may issue a gather's last load
    # after consuming its first: one wave more, `ln_waves`.)
    nx = (2 if cell == "lstm" else 1) if reg == "ln" else 0
    ln_waves = nx + (nx > 0)
    ln_ldg = 24 if nx and bwd else 0
    ln_bar = 16 * nx if not bwd else 0
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
        assert r["other_ldg"] <= (4 if not bwd else 16) + mask_ldg + ln_ldg, r
    if not bwd and plan.resident and plan.BLOCK_B == 16:
        # every h load of the step is issued before the first is used: one round trip
        # (ptxas sometimes consumes the first one early in the grid-barrier build: 2 there)
        assert r["trips"] <= (1 if _polls(plan) else 2) + ln_waves, f"h loads wait on others: {r}"
        # polled: + the sentinel check's block reduction (a grid barrier: its spin)
        assert r["bar"] <= (10 if _polls(plan) else 8) + mask_bar + ln_bar, r
    if plan.resident and not plan.on_chip and _polls(plan):
        # no grid barrier is left, and a failed poll re-enters at the loads: the one polling
        # loop of a step (per backward wave) loads exchanged data again and multiplies
        # nothing (the product-first polls went around the whole step: no such loop)
        waves = triton.cdiv(triton.cdiv(H, plan.KC), plan.chunks_per_trip) if bwd else 1
        assert r["retry_loops"] == r["spin_loops"] == waves + nx, r
        assert r["retry"] == "loads", r
    elif not plan.on_chip:
        assert r["spin_loops"] == (1 if plan.persistent and plan.nprog > 1 else 0), r
    if plan.resident and plan.BLOCK_B == 16 and r["mma"]:
        # one accumulator per K chunk: no MMA waits on more than a chunk's worth of others
        # (folded into one accumulator, the first kernels chained all H/16 of them: 48)
        assert r["mma_depth"] <= 2 * plan.KC // 16, f"one long chain of dependent MMAs: {r}"
    if bwd and plan.resident and plan.BLOCK_B == 16:
        # at most one round trip per K chunk of every gate (the first kernel: one per 64-wide
        # chunk of each gate, 48 at LSTM H=768), and no warp repeats another's MMAs: G*H/16
        # k-steps of one 8-column tile, spread over the gates' warps
        assert r["trips"] <= triton.cdiv(H, plan.KC) + ln_waves, r
        if GATES[cell] == 4:
            assert r["mma"] <= H // 16, r
    if plan.resident and plan.BLOCK_B == 16:
        # no variant at the register ceiling (the 4-warp backward sat at 255)
        assert r["regs"] < 255, r


HEADLINE = [i for i, v in enumerate(VARIANTS) if _fields(v)[1:4] == ("bf16", 768, 16)
            and _fields(v)[0] in ("lstm", "gru", "rnn_tanh")]  # fmt: skip


@pytest.mark.parametrize("index", HEADLINE, ids=[IDS[i] for i in HEADLINE])
def test_headline_step_shape(resources, index):
    """bf16 H=768 B=16: the forward in one round trip, the backward in at most two
    dependent waves of dgates loads, any failed poll re-entering at the loads (a polling
    loop that loads again and multiplies nothing), no spills."""
    r = resources[index]
    cell, _, _, _, bwd, _, reg = _fields(VARIANTS[index])
    nx = (2 if cell == "lstm" else 1) if reg == "ln" else 0  # LayerNorm's exchanges
    assert r["spills"] == 0 and r["local"] == 0, r
    assert r["retry"] == "loads" and r["retry_loops"] >= 1, r
    # (+ 1 where ptxas issues a gather's last load late: test_step_loop_shape)
    assert r["trips"] <= (2 if bwd else 1) + nx + (nx > 0), r


MASKED = [i for i, v in enumerate(VARIANTS) if _fields(v)[6] == "masks"]


@pytest.mark.parametrize("index", MASKED, ids=[IDS[i] for i in MASKED])
def test_masks_add_no_round_trip(resources, index):
    """Zoneout and recurrent dropout fused into the step (the projected LSTM's too) cost no
    memory round trip: the same dependent exchange loads as the plain kernel's step, and no
    more exposed own loads (their bit tiles load a step ahead)."""
    fields = _fields(VARIANTS[index])
    plain = next(i for i, v in enumerate(VARIANTS) if _fields(v) == (*fields[:6], ""))
    r, base = resources[index], resources[plain]
    assert r["spills"] == 0 and r["local"] == 0, r
    assert r["trips"] == base["trips"] and r["own_trips"] <= base["own_trips"], (r, base)


# (the projected kernels' LayerNorm variants are held to no spills only, as the projected
# kernels are: their steps have two phases and other ceilings)
NORMALIZED = [i for i, v in enumerate(VARIANTS) if _fields(v)[6] == "ln" and not _fields(v)[5]]


@pytest.mark.parametrize("index", NORMALIZED, ids=[IDS[i] for i in NORMALIZED])
def test_layer_norm_adds_a_round_trip_per_exchange(resources, index):
    """LayerNorm's statistics cost what their design says: one dependent wave of exchange
    loads per exchange of two numbers per row and program (LN_hh's; LN_c's for the LSTM),
    with a little slack where ptxas issues a wave's last load after consuming its first,
    at most one exposed own load more, and no spills."""
    fields = _fields(VARIANTS[index])
    plain = next(i for i, v in enumerate(VARIANTS) if _fields(v) == (*fields[:6], ""))
    r, base = resources[index], resources[plain]
    nx = 2 if fields[0] == "lstm" else 1
    assert r["spills"] == 0 and r["local"] == 0, r
    assert base["trips"] + nx <= r["trips"] <= base["trips"] + nx + 1, (r, base)
    assert r["own_trips"] <= base["own_trips"] + 1, (r, base)


if __name__ == "__main__":
    sys.exit(sm90.main(sys.argv[1:]))
