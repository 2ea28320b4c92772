"""Planning the cupy backend's launches: which kernel variant, tile sizes, grid and shared
memory for (cell, dtype, H, B) on a device, and the list of every instantiation a plan can
pick (what the compile tests build). Pure Python, testable without a GPU.

May import the kernel names of `compile`; nothing that packs weights or launches.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from gpurnn.backends.cupy.compile import CELL_TYPES, ELEM_TYPES
from gpurnn.cells import GATES

# constants shared with rnn_persistent.cu
WARPS = 8
THREADS = 32 * WARPS
CLUSTER_SIZE = 8
# k per mma and 16-byte A-fragment words per lane per tile (fp32 keeps hi and lo tf32 halves)
MMA_K = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 8}
A_UINT4 = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2}

# m-tiles (16 rows of A each) per block the launcher may pick; each is one instantiation
FORWARD_M_TILES = (1, 2, 4)
BACKWARD_M_TILES = (1, 2)
CLUSTER_M_TILES = (1, 2, 4, 8)  # cluster_m_tiles keeps those that can fit on chip
SM90_SMEM_LIMIT = 227 * 1024  # the largest opt-in shared memory per block of sm_90 parts
N_TILES = (1, 2)  # 8 batch rows each: B <= 8 pays for one


@dataclass(frozen=True)
class Plan:
    """How one kernel launch is laid out (see rnn_persistent.cu for the terms)."""

    direction: str  # "forward" | "backward"
    variant: str  # "grid" | "cluster" | "ksplit"
    m_tiles: int
    n_tiles: int
    units: int  # hidden units per block
    blocks: int  # grid size
    K: int  # reduction length: H (forward) or G*H (backward)
    KT: int  # k-tiles of MMA_K
    ldx: int  # exchange row stride: elements (grid), floats (cluster)
    batch_rows: int  # exchange rows (grid: B padded to 8*n_tiles; cluster: 8)
    shared_bytes: int
    # LSTM with projection (rnn_lstmp.cuh): proj_size P (0: none); K, KT, ldx above are then
    # the units' GEMM (K = P), these the projected outputs' (16 per block; K = H forward,
    # 4H backward) and its exchange's row stride
    proj: int = 0
    out_KT: int = 0
    out_ldx: int = 0
    # K-split variant (rnn_ksplit.cuh, plan_ksplit.py): CTAs per cluster (which split K; units
    # is then per cluster and KT per CTA), m-tiles per warp, warps sharing an m-tile
    cluster_size: int = 0
    m_per_warp: int = 0
    k_warps: int = 0

    def kernel_name(self, cell: str, dtype: torch.dtype) -> str:
        if self.variant == "ksplit":
            args = [CELL_TYPES[cell], ELEM_TYPES[dtype], str(self.cluster_size),
                    str(self.m_per_warp), str(self.n_tiles)]  # fmt: skip
            return f"gpurnn::rnn_{self.direction}_ksplit<{', '.join(args)}>"
        if self.proj:
            args = f"{ELEM_TYPES[dtype]}, {self.m_tiles}, {self.n_tiles}"
            return f"gpurnn::rnn_lstmp_{self.direction}_grid<{args}>"
        args = [CELL_TYPES[cell], ELEM_TYPES[dtype], str(self.m_tiles)]
        if self.variant == "grid":
            args.append(str(self.n_tiles))
        return f"gpurnn::rnn_{self.direction}_{self.variant}<{', '.join(args)}>"


def units_per_block(direction: str, cell: str, m_tiles: int) -> int:
    """Forward: a block's A rows are the G gate rows of its units; backward: its units."""
    rows = 16 * m_tiles
    return rows // GATES[cell] if direction == "forward" else rows


def fragment_bytes(dtype: torch.dtype, m_tiles: int, KT: int) -> int:
    return m_tiles * KT * A_UINT4[dtype] * 32 * 16


def shared_bytes(dtype, m_tiles, n_tiles, KT, cluster_ldx=0) -> int:
    """Dynamic shared memory: packed fragments | red | (cluster) two fp32 exchange planes
    of (8, cluster_ldx) and their two 8-byte mbarriers."""
    red = WARPS * n_tiles * 16 * m_tiles * 8 * 4
    cluster = 2 * 8 * cluster_ldx * 4 + 2 * 8 if cluster_ldx else 0
    return fragment_bytes(dtype, m_tiles, KT) + red + cluster


def cluster_row_stride(dtype, K_padded: int) -> int:
    """Floats per row of the cluster exchange planes: K padded to 32 banks, plus 8 (16-bit:
    each lane reads 8 bytes, so a half-warp's 4 rows x 4 pairs cover 32 banks) or 4 (fp32:
    4-byte reads, 8 rows x 4 columns) so that a fragment load has no bank conflict."""
    return math.ceil(K_padded / 32) * 32 + (4 if dtype == torch.float32 else 8)


@functools.cache
def cluster_m_tiles(direction: str, cell: str, dtype: torch.dtype) -> tuple[int, ...]:
    """The cluster variant's m-tile counts that can ever run: tile m is picked only for an H
    beyond what the previous tile's 8 blocks cover, so one whose smallest such H already
    overflows shared memory is never used (and neither built nor compiled)."""
    tiles, covered = [], 0
    for m in CLUSTER_M_TILES:
        K = (covered + 1) * (1 if direction == "forward" else GATES[cell])
        KT = math.ceil(K / MMA_K[dtype])
        ldx = cluster_row_stride(dtype, KT * MMA_K[dtype])
        if shared_bytes(dtype, m, 1, KT, ldx) <= SM90_SMEM_LIMIT:
            tiles.append(m)
        covered = CLUSTER_SIZE * units_per_block(direction, cell, m)
    return tuple(tiles)


def plan_launch(direction, cell, dtype, H, B, *, sm_count, smem_limit, has_clusters,
                variant="auto") -> Plan | None:  # fmt: skip
    """The launch for one (layer, direction) on a device with `sm_count` SMs and
    `smem_limit` bytes of opt-in shared memory per block, or None if no variant holds its
    W_hh slice on chip. `variant` forces "grid" or "cluster" (None if that one cannot);
    "auto" is "grid"."""
    G = GATES[cell]
    K = H if direction == "forward" else G * H
    KT = math.ceil(K / MMA_K[dtype])
    ldx = KT * MMA_K[dtype]
    if has_clusters and variant == "cluster":
        # smallest tile whose 8 blocks cover H; the whole W_hh then sits in the cluster
        for m in cluster_m_tiles(direction, cell, dtype):
            units = units_per_block(direction, cell, m)
            if CLUSTER_SIZE * units < H:
                continue
            cluster_ldx = cluster_row_stride(dtype, ldx)
            smem = shared_bytes(dtype, m, 1, KT, cluster_ldx)
            if smem <= smem_limit:
                return Plan(direction, "cluster", m, 1, units, CLUSTER_SIZE * math.ceil(B / 8),
                            K, KT, cluster_ldx, 8, smem)  # fmt: skip
            break
    if variant == "cluster":
        return None
    n_tiles = 1 if B <= 8 else 2
    for m in FORWARD_M_TILES if direction == "forward" else BACKWARD_M_TILES:
        units = units_per_block(direction, cell, m)
        blocks = math.ceil(H / units)
        smem = shared_bytes(dtype, m, n_tiles, KT)
        # one block per SM: every block resident (cooperative launch) with all of its smem
        if blocks <= sm_count and smem <= smem_limit:
            rows = 8 * n_tiles
            return Plan(direction, "grid", m, n_tiles, units, blocks, K, KT, ldx,
                        math.ceil(B / rows) * rows, smem)  # fmt: skip
    return None


LSTMP_CLUSTER_REASON = ("LSTM proj_size runs in the grid variant of the cupy kernels only, not "
                        "GPURNN_CUPY_VARIANT=cluster or ksplit (auto or grid runs it)")  # fmt: skip
PROJ_OUT_ROWS = 16  # projected outputs per block (kOutRows in rnn_lstmp.cuh): one m-tile


def plan_lstmp_launch(direction, dtype, H, P, B, *, sm_count, smem_limit,
                      has_clusters=False) -> Plan | None:  # fmt: skip
    """The grid launch of the LSTM-with-projection kernels (rnn_lstmp.cuh) for hidden size
    H and proj_size P, or None if the W_hh and W_hr slices of a block do not fit on chip
    (`has_clusters` is accepted as plan_launch takes it, and unused: no cluster variant).
    A block holds the units' GEMM rows (forward: their 4 gate rows of W_hh; backward: their
    W_hr columns; K = P both ways) and one 16-row tile of projected outputs (forward: W_hr
    rows, K = H; backward: W_hh columns, K = 4H)."""
    k = MMA_K[dtype]
    KT = math.ceil(P / k)
    out_K = H if direction == "forward" else GATES["lstm"] * H
    out_KT = math.ceil(out_K / k)
    n_tiles = 1 if B <= 8 else 2
    out_blocks = math.ceil(P / PROJ_OUT_ROWS)
    for m in FORWARD_M_TILES if direction == "forward" else BACKWARD_M_TILES:
        units = units_per_block(direction, "lstm", m)
        blocks = max(math.ceil(H / units), out_blocks)
        smem = shared_bytes(dtype, m, n_tiles, KT) + fragment_bytes(dtype, 1, out_KT)
        if blocks <= sm_count and smem <= smem_limit:
            rows = 8 * n_tiles
            return Plan(direction, "grid", m, n_tiles, units, blocks, P, KT, KT * k,
                        math.ceil(B / rows) * rows, smem, P, out_KT, out_KT * k)  # fmt: skip
    return None


# the K-split variant's instantiations (plan_ksplit.py chooses among them)
KSPLIT_CLUSTER_SIZES = (4, 8)
KSPLIT_M_PER_WARP = (1, 2)


def kernel_names(clusters: bool) -> list[str]:
    """Every instantiation `plan_launch`, `plan_lstmp_launch` and `plan_ksplit_launch` can pick
    (with `clusters`: the sm_90 cluster and K-split ones too): what the compile tests
    build."""
    names = []
    for dtype in ELEM_TYPES:
        for direction, tiles in (("forward", FORWARD_M_TILES), ("backward", BACKWARD_M_TILES)):
            for m, n in itertools.product(tiles, N_TILES):
                plan = Plan(direction, "grid", m, n, 0, 0, 0, 0, 0, 0, 0, proj=1)
                names.append(plan.kernel_name("lstm", dtype))
    for cell in CELL_TYPES:
        for dtype in ELEM_TYPES:
            for direction, tiles in (("forward", FORWARD_M_TILES), ("backward", BACKWARD_M_TILES)):
                for m in tiles:
                    for n in N_TILES:
                        plan = Plan(direction, "grid", m, n, 0, 0, 0, 0, 0, 0, 0)
                        names.append(plan.kernel_name(cell, dtype))
                if clusters:
                    for m in cluster_m_tiles(direction, cell, dtype):
                        plan = Plan(direction, "cluster", m, 1, 0, 0, 0, 0, 0, 0, 0)
                        names.append(plan.kernel_name(cell, dtype))
                    for c, mw, n in itertools.product(KSPLIT_CLUSTER_SIZES, KSPLIT_M_PER_WARP,
                                                      N_TILES):  # fmt: skip
                        plan = Plan(direction, "ksplit", 0, n, 0, 0, 0, 0, 0, 0, 0,
                                    cluster_size=c, m_per_warp=mw)  # fmt: skip
                        names.append(plan.kernel_name(cell, dtype))
    return names
