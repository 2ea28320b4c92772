"""Planning the K-split cluster variant (kernels/cuda/rnn_ksplit.cuh): the cluster size C,
m-tiles per warp, warps per m-tile and batch tile for (cell, direction, dtype, H, B) on an
sm_90 device, from shared memory, the grid that can be resident, and a per-step cost model
(L2 ingest per CTA, the mma chain, the reduction over distributed shared memory); or no
plan, with the reason, so that the backend falls back to the grid kernels.

The cost model is a prediction, not a measurement: its constants are round numbers for an
H100 (an L2 round trip ~0.7 us, ~100 B/ns of L2 bandwidth into one SM, a dependent mma
~20 ns, a DSMEM reduction ~0.25 us). It only ranks candidates; nothing here is timed.

Run `python -m gpurnn.backends.cupy.plan_ksplit lstm 768 16 bf16` for the choice and the
reasons on an H100-like device (132 SMs, 227 KiB of shared memory per block).

Pure Python; may import `plan` (the Plan record and constants) only.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass, field

import torch

from gpurnn.backends.cupy.plan import (
    KSPLIT_CLUSTER_SIZES,
    KSPLIT_M_PER_WARP,
    MMA_K,
    N_TILES,
    WARPS,
    Plan,
    fragment_bytes,
)
from gpurnn.cells import GATES

K_WARPS = (1, 2, 4, 8)  # warps sharing one m-tile's k-tiles (a run-time argument)
MBARRIER_TX_LIMIT = (1 << 20) - 1  # an mbarrier phase counts at most this many bytes
ELEM_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}

# cost model constants (ns, bytes/ns): see the module docstring
L2_ROUND_TRIP_NS = 700.0
L2_BYTES_PER_NS = 100.0
MMA_NS = {torch.float16: 20.0, torch.bfloat16: 20.0, torch.float32: 60.0}  # fp32: 3 tf32 mmas
DSMEM_REDUCE_NS = 250.0
SMEM_LOAD_NS = 2.0  # one epilogue partial-sum load, pipelined


def max_resident_clusters(sm_count: int, cluster_size: int) -> int:
    """Clusters of `cluster_size` one-CTA-per-SM blocks that can be resident at once: a
    cluster must sit within one GPC, so SMs are lost at GPC edges. 90 % of the SMs, rounded
    down, keeps below what an H100 reports (16 clusters of 8 on 132 SMs); a launch that
    nevertheless does not fit is caught by the kernels' bounded waits and raises."""
    return int(0.9 * sm_count) // cluster_size


@dataclass(frozen=True)
class Candidate:
    cluster_size: int
    m_per_warp: int
    k_warps: int
    n_tiles: int
    m_tiles: int
    units: int
    clusters: int
    KT: int
    shared_bytes: int
    fill_bytes: int
    predicted_ns: float
    breakdown: str


@dataclass
class KSplitChoice:
    """The plan (None: no K-split plan fits, fall back) and the reasons, readable."""

    plan: Plan | None
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(self.reasons)


def receive_floats(cluster_size, k_warps, rows_per_unit, units, n_tiles) -> int:
    """One fill of a rank's receive buffer: [sources][rows owned][columns] fp32 (the most
    any rank owns: rnn_index.cuh's `ksplit_unit_span`)."""
    span = math.ceil(units / cluster_size)
    return cluster_size * k_warps * rows_per_unit * span * 8 * n_tiles


def ksplit_shared_bytes(dtype, m_tiles, KT, cluster_size, k_warps, rows_per_unit, units,
                        n_tiles) -> int:  # fmt: skip
    """[A fragments | two receive fills | two 8-byte mbarriers], as KSplitSmem lays it out."""
    fill = receive_floats(cluster_size, k_warps, rows_per_unit, units, n_tiles)
    return fragment_bytes(dtype, m_tiles, KT) + 2 * fill * 4 + 16


def _predict(dtype, direction, cell, c, mw, kw, n, KT, units, B) -> tuple[float, str]:
    """Predicted ns per step (see the module docstring) and its parts."""
    cols = 8 * n
    groups = math.ceil(B / cols)
    rows_per_unit = GATES[cell] if direction == "forward" else 1
    ingest = cols * KT * MMA_K[dtype] * ELEM_BYTES[dtype] / L2_BYTES_PER_NS
    chain = math.ceil(KT / kw) * MMA_NS[dtype]  # dependent mmas of one accumulator
    span = math.ceil(units / c)
    items = span * cols
    fan_in = c * kw * rows_per_unit * math.ceil(items / (32 * WARPS)) * SMEM_LOAD_NS
    per_group = ingest + chain + DSMEM_REDUCE_NS + fan_in
    total = L2_ROUND_TRIP_NS + groups * per_group
    text = (f"{total / 1000:.2f} us/step predicted = L2 exchange {L2_ROUND_TRIP_NS / 1000:.2f} + "
            f"{groups} group(s) x (ingest {ingest:.0f} + mma chain {chain:.0f} + "
            f"DSMEM reduce {DSMEM_REDUCE_NS:.0f} + fan-in {fan_in:.0f}) ns")  # fmt: skip
    return total, text


def plan_ksplit_launch(direction, cell, dtype, H, B, *, sm_count, smem_limit,
                has_clusters) -> KSplitChoice:  # fmt: skip
    """The K-split launch for one (layer, direction), or none with the reasons."""
    what = f"K-split {direction} {cell} H={H} B={B} {str(dtype).replace('torch.', '')}"
    if not has_clusters:
        return KSplitChoice(None, [f"{what}: no thread-block clusters (needs sm_90)"])
    if dtype not in MMA_K:
        return KSplitChoice(None, [f"{what}: dtype not supported"])
    G = GATES[cell]
    rows_per_unit = G if direction == "forward" else 1
    K = H if direction == "forward" else G * H
    k = MMA_K[dtype]
    n_options = (1,) if B <= 8 else N_TILES
    rejected: dict[str, int] = {}
    candidates = []
    for c, mw, kw, n in itertools.product(KSPLIT_CLUSTER_SIZES, KSPLIT_M_PER_WARP, K_WARPS,
                                          n_options):  # fmt: skip
        m_tiles = WARPS // kw * mw
        units = 16 * m_tiles // rows_per_unit
        clusters = math.ceil(H / units)
        KT = math.ceil(math.ceil(K / k) / c)
        smem = ksplit_shared_bytes(dtype, m_tiles, KT, c, kw, rows_per_unit, units, n)
        fill = 4 * receive_floats(c, kw, rows_per_unit, units, n)
        if units < c:
            reason = "fewer units per cluster than CTAs (every rank must own one)"
        elif clusters > max_resident_clusters(sm_count, c):
            reason = f"more clusters of {c} than can be resident on {sm_count} SMs"
        elif smem > smem_limit:
            reason = f"shared memory over {smem_limit // 1024} KiB"
        elif fill > MBARRIER_TX_LIMIT:
            reason = "a fill larger than an mbarrier phase counts"
        else:
            ns, text = _predict(dtype, direction, cell, c, mw, kw, n, KT, units, B)
            candidates.append(Candidate(c, mw, kw, n, m_tiles, units, clusters, KT, smem, fill,
                                        ns, text))  # fmt: skip
            continue
        rejected[reason] = rejected.get(reason, 0) + 1
    reasons = [f"{what}: {len(candidates)} candidate layouts fit"]
    reasons += [f"  {count} rejected: {reason}" for reason, count in sorted(rejected.items())]
    if not candidates:
        reasons.append("  -> no K-split plan: the grid kernels run it")
        return KSplitChoice(None, reasons)
    # fastest predicted; then fewer CTAs (fewer SMs held), then fewer partials to sum
    best = min(candidates, key=lambda c: (round(c.predicted_ns), c.clusters * c.cluster_size,
                                          c.cluster_size * c.k_warps))  # fmt: skip
    cols = 8 * best.n_tiles
    plan = Plan(direction, "ksplit", best.m_tiles, best.n_tiles, best.units,
                best.clusters * best.cluster_size, K, best.KT, best.cluster_size * best.KT * k,
                math.ceil(B / cols) * cols, best.shared_bytes,
                cluster_size=best.cluster_size, m_per_warp=best.m_per_warp,
                k_warps=best.k_warps)  # fmt: skip
    per_cta = cols * best.KT * k * ELEM_BYTES[dtype]
    reasons.append(
        f"  -> {best.clusters} clusters x {best.cluster_size} CTAs, {best.units} units per "
        f"cluster, K slice {best.KT * k} of {K} per CTA ({per_cta} B of the exchange per "
        f"CTA per batch group, 1/{best.cluster_size} of a grid block's), {best.m_tiles} "
        f"m-tiles ({best.m_per_warp} per warp, {best.k_warps} warp(s) on each), "
        f"{best.shared_bytes} B shared memory; {best.breakdown}"
    )
    return KSplitChoice(plan, reasons)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpurnn.backends.cupy.plan_ksplit",
        description="The K-split cluster plan and its reasons, forward and backward.",
    )
    parser.add_argument("cell", choices=sorted(GATES))
    parser.add_argument("hidden_size", type=int)
    parser.add_argument("batch_size", type=int)
    parser.add_argument("dtype", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--sm-count", type=int, default=132, help="default: %(default)s (H100)")
    parser.add_argument("--smem-kib", type=int, default=227, help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.hidden_size < 1 or args.batch_size < 1:
        parser.error("hidden_size and batch_size must be positive")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    for direction in ("forward", "backward"):
        choice = plan_ksplit_launch(direction, args.cell, dtype, args.hidden_size, args.batch_size,
                             sm_count=args.sm_count, smem_limit=args.smem_kib * 1024,
                             has_clusters=True)  # fmt: skip
        print(choice.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
