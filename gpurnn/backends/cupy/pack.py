"""Packing the weights for the cupy backend's kernels: each block's rows (or columns) of
W_hh (and, with a projection, of W_hr), padded and permuted into the tensor-core fragment
order the kernels' mma instructions read them in. torch ops, on the weights' device.

May import the planner's `Plan` and constants; nothing that compiles or launches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpurnn.backends.cupy.plan import CLUSTER_SIZE, MMA_K, PROJ_OUT_ROWS, Plan
from gpurnn.cells import GATES


def _tf32_round(a: Tensor) -> Tensor:
    """fp32 -> nearest tf32 (ties away from zero), as `cvt.rna.tf32.f32` does."""
    bits = a.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def pack_fragments(a: Tensor, m_tiles: int) -> Tensor:
    """A rows of every block, (P, rows <= 16*m_tiles, K) in the kernel's element dtype ->
    the packed fragments (P, fragment_bytes / 16, 4) int32, as `block_gemm` reads them.

    16-bit, mma.m16n8k16 (.row): lane 4g+q holds 4 words, word (c, r) = A[16mt + g + 8r]
    [16kt + 2q + 8c .. +1] at index 2c + r. fp32, mma.m16n8k8.tf32: word 2c + r =
    A[16mt + g + 8r][8kt + q + 4c], once rounded to tf32 (hi) and once the rest (lo), the lo
    plane 32 lanes after the hi plane.
    """
    P, rows, K = a.shape
    dtype = a.dtype
    k = MMA_K[dtype]
    KT = math.ceil(K / k)
    full = a.new_zeros(P, 16 * m_tiles, KT * k)
    full[:, :rows, :K] = a
    if dtype == torch.float32:
        v = full.view(P, m_tiles, 2, 8, KT, 2, 4)  # p, mt, r, g, kt, c, q
        v = v.permute(0, 1, 4, 3, 6, 5, 2)  # p, mt, kt, g, q, c, r
        hi = _tf32_round(v.contiguous())
        lo = v - hi
        out = torch.stack([hi, lo], dim=3)  # p, mt, kt, hi/lo, g, q, c, r
        return out.contiguous().view(torch.int32).reshape(P, -1, 4)
    v = full.view(P, m_tiles, 2, 8, KT, 2, 4, 2)  # p, mt, r, g, kt, c, q, pair
    v = v.permute(0, 1, 4, 3, 6, 5, 2, 7)  # p, mt, kt, g, q, c, r, pair
    return v.contiguous().view(torch.int32).reshape(P, -1, 4)


def block_rows(direction: str, cell: str, w_hh: Tensor, plan: Plan) -> Tensor:
    """(P, rows, K) A matrix of every block. Forward: block p's row g*units + u is W_hh row
    g*H + p*units + u (gate-major, so a unit's G gates sit `units` rows apart); backward:
    row u is W_hh column p*units + u. Rows of units >= H are 0."""
    G, H = GATES[cell], w_hh.shape[1]
    P, U = plan.blocks if plan.variant == "grid" else CLUSTER_SIZE, plan.units
    src = w_hh if direction == "forward" else w_hh.t()
    src = torch.cat([src, src.new_zeros(1, src.shape[1])])  # row -1: zeros
    unit = torch.arange(P, device=w_hh.device)[:, None] * U + torch.arange(U, device=w_hh.device)
    unit = torch.where(unit < H, unit, -1)  # (P, U)
    if direction == "forward":
        gate = torch.arange(G, device=w_hh.device)[None, :, None] * H
        idx = torch.where(unit[:, None, :] >= 0, gate + unit[:, None, :], -1).reshape(P, G * U)
    else:
        idx = unit
    return src[idx]


def _gather_rows(src: Tensor, blocks: int, per_block: int, n: int, groups: int = 1,
                 stride: int = 0) -> Tensor:  # fmt: skip
    """(blocks, groups * per_block, K): block p's row g * per_block + u is src row
    g * stride + p * per_block + u where p * per_block + u < n, else zeros."""
    src = torch.cat([src, src.new_zeros(1, src.shape[1])])  # row -1: zeros
    dev = src.device
    unit = torch.arange(blocks, device=dev)[:, None] * per_block
    unit = unit + torch.arange(per_block, device=dev)
    group = torch.arange(groups, device=dev)[None, :, None] * stride
    idx = torch.where(unit[:, None, :] < n, group + unit[:, None, :], -1)
    return src[idx.reshape(blocks, groups * per_block)]


def lstmp_block_rows(direction: str, w_hh: Tensor, w_hr: Tensor, plan: Plan):
    """The A matrices of the projected-LSTM kernels, (units' rows, outputs' rows), each
    (blocks, rows, K). Forward: block p's units' row g*units + u is W_hh row g*H + p*units + u
    (K = P), its output row r is W_hr row 16p + r (K = H). Backward: units' row u is W_hr
    column p*units + u (K = P), output row r is W_hh column 16p + r (K = 4H)."""
    P, H = w_hr.shape
    out_blocks = math.ceil(P / PROJ_OUT_ROWS)
    if direction == "forward":
        units = _gather_rows(w_hh, plan.blocks, plan.units, H, GATES["lstm"], H)
        outs = _gather_rows(w_hr, out_blocks, PROJ_OUT_ROWS, P)
    else:
        units = _gather_rows(w_hr.t(), plan.blocks, plan.units, H)
        outs = _gather_rows(w_hh.t(), out_blocks, PROJ_OUT_ROWS, P)
    return units, outs


def ksplit_block_rows(direction: str, cell: str, w_hh: Tensor, clusters: int, units: int,
                      cluster_size: int, k_slice: int, m_tiles: int) -> Tensor:  # fmt: skip
    """The A slices of the K-split kernels (rnn_ksplit.cuh), (clusters * C, 16*m_tiles,
    k_slice): CTA q*C + r holds its cluster's rows (forward: row g*units + u is W_hh row
    g*H + q*units + u; backward: row u is W_hh column q*units + u) over reduction columns
    [r * k_slice, (r + 1) * k_slice). Rows of units >= H, rows past the cluster's and
    columns past K are 0."""
    G, H = GATES[cell], w_hh.shape[1]
    if direction == "forward":
        rows = _gather_rows(w_hh, clusters, units, H, G, H)  # (clusters, G*units, H)
    else:
        rows = _gather_rows(w_hh.t(), clusters, units, H)  # (clusters, units, G*H)
    C, K = cluster_size, rows.shape[-1]
    full = rows.new_zeros(clusters, 16 * m_tiles, C * k_slice)
    full[:, : rows.shape[1], :K] = rows
    return (
        full.view(clusters, 16 * m_tiles, C, k_slice)
        .transpose(1, 2)
        .reshape(clusters * C, 16 * m_tiles, k_slice)
    )
