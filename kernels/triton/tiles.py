"""Tile helpers that more than one kernel family uses: the batch rows and time index a program
works on, zeros the compiler cannot fold, the regularized plain kernels' constants, mask
bits and zoneout weights, the loads of the saved workspace fields and of W_hh
column blocks, and the backward's recurrent product dgates @ W_hh (`_dgates_dots`, shared by
the plain and the projected backward). Device code only (@triton.jit); imports the cell
switch (cell_math) and the exchange loads (exchange).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .cell_math import GRU, LSTM
from .exchange import _load_exchanged


@triton.jit
def _row_tile(pid_b, nrows, T, len_ptr, BLOCK_B: tl.constexpr, HAS_LEN: tl.constexpr):
    """The batch rows of program column pid_b, which of them exist (this launch covers
    nrows rows from its pointers on), and their lengths (T without lengths)."""
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = offs_b < nrows
    if HAS_LEN:
        L = tl.load(len_ptr + offs_b, mask=mb, other=0).to(tl.int32)
    else:
        L = tl.zeros([BLOCK_B], dtype=tl.int32) + T
    return offs_b, mb, L


@triton.jit
def _time(s, T, REVERSE: tl.constexpr):
    if REVERSE:
        return T - 1 - s
    else:
        return s


@triton.jit
def _runtime_zeros(like, s):
    """Zeros the compiler cannot prove zero. Triton folds `dot(a, b, 0) + c` into
    `dot(a, b, c)`, which chains per-chunk accumulators back into one accumulator: H/16
    dependent MMAs a step (about 30 cycles each on sm_90). Started from these, the chunks'
    dots stay independent chains that the tensor cores overlap, and are summed after."""
    return (tl.zeros_like(like) + s) * 0.0


@triton.jit
def _load_bits(ptr, row_off, j, mask, ACC: tl.constexpr):
    """Elements j of packed mask rows (gpurnn.masks: element j is bit j % 8 of byte j // 8)
    that start at byte offsets row_off (broadcast against j), as 0/1 in ACC; 0 where masked."""
    byte = tl.load(ptr + row_off + j // 8, mask=mask, other=0).to(tl.int32)
    return ((byte >> (j % 8)) & 1).to(ACC)


@triton.jit
def _regularizer_constants(rates_ptr, rmask_ptr, offs_b, offs_j, m_own, ZONEOUT: tl.constexpr,
                           RDROP: tl.constexpr, H: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """What a regularized launch keeps for all its steps: zoneout's eval rate (rates[0];
    ZONEOUT 2) and the own tile's recurrent-dropout factors, 0 or rates[1] = 1/(1 − p) by
    the packed (B, ⌈H/8⌉) mask (RDROP); scalars where off (unused)."""
    zone_p = 0.0
    if ZONEOUT == 2:
        zone_p = tl.load(rates_ptr).to(ACC)
    r_keep = 1.0
    if RDROP:
        row = offs_b.to(tl.int64) * ((H + 7) // 8)
        keep = _load_bits(rmask_ptr, row[:, None], offs_j[None, :], m_own, ACC)
        r_keep = keep * tl.load(rates_ptr + 1).to(ACC)
    return zone_p, r_keep


@triton.jit
def _zoneout_weight(z_ptr, p, t, valid, B64, offs_b, offs_u, mu, ZONEOUT: tl.constexpr,
                    W: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """How much of its previous value each own unit offs_u (of W) keeps at step t: the step's
    zoneout bits in training (ZONEOUT 1: a (T, B, ⌈W/8⌉) packed mask), the rate p in eval
    (2), nothing off (0: a scalar, unused). The regularized step is
    h_t = w h_{t-1} + (1 − w) h̃_t."""
    if ZONEOUT == 1:
        row = (B64 * t + offs_b) * ((W + 7) // 8)  # (t may be a Python int, interpreted)
        return _load_bits(z_ptr, row[:, None], offs_u[None, :], valid[:, None] & mu[None, :], ACC)
    else:
        return p


@triton.jit
def _zoneout_weights(zh_ptr, zc_ptr, p, t, valid, B64, offs_b, offs_j, mj, ZONEOUT: tl.constexpr,
                     CELL: tl.constexpr, H: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """`_zoneout_weight` of h and (LSTM) of c for the own units, (w_h, w_c)."""
    w_h = _zoneout_weight(zh_ptr, p, t, valid, B64, offs_b, offs_j, mj, ZONEOUT, H, ACC)
    w_c = w_h
    if CELL == LSTM:
        w_c = _zoneout_weight(zc_ptr, p, t, valid, B64, offs_b, offs_j, mj, ZONEOUT, H, ACC)
    return w_h, w_c


@triton.jit
def _load_fields(ptr, row, offs_j, mask, H: tl.constexpr, N: tl.constexpr, ACC: tl.constexpr):
    """Up to 5 (BLOCK_B, BH) column blocks k*H + j of one time step; unused ones alias the first."""
    p = ptr + row[:, None] + offs_j[None, :]
    a0 = tl.load(p, mask=mask, other=0.0).to(ACC)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    if N > 1:
        a1 = tl.load(p + H, mask=mask, other=0.0).to(ACC)
    if N > 2:
        a2 = tl.load(p + 2 * H, mask=mask, other=0.0).to(ACC)
    if N > 3:
        a3 = tl.load(p + 3 * H, mask=mask, other=0.0).to(ACC)
    if N > 4:
        a4 = tl.load(p + 4 * H, mask=mask, other=0.0).to(ACC)
    return a0, a1, a2, a3, a4


@triton.jit
def _load_whh_cols(whh_ptr, offs_k, offs_n, mn, G: tl.constexpr, GP: tl.constexpr,
                   H: tl.constexpr, W: tl.constexpr, KSPLIT: tl.constexpr = 1):  # fmt: skip
    """(GP*KSPLIT, KW, N): rows of every gate block of W_hh (G*H, W), columns offs_n (the
    own units, or the own projected outputs); padding gates and rows 0. A K chunk of
    KSPLIT*KW rows starting at offs_k[0] (offs_k: its first KW), split in KSPLIT slabs:
    batch index b holds gate b // KSPLIT, rows offs_k + (b % KSPLIT) * KW."""
    KW: tl.constexpr = offs_k.shape[0]
    b3 = tl.arange(0, GP * KSPLIT)[:, None, None]
    g3 = b3 // KSPLIT
    k3 = offs_k[None, :, None] + (b3 % KSPLIT) * KW
    m = (g3 < G) & (k3 < H) & mn[None, None, :]
    return tl.load(whh_ptr + (g3 * H + k3) * W + offs_n[None, None, :], mask=m, other=0.0)


@triton.jit
def _dgates_ptrs(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, CELL: tl.constexpr,
                 G: tl.constexpr, GP: tl.constexpr, H: tl.constexpr,
                 KSPLIT: tl.constexpr = 1):  # fmt: skip
    """Pointers and mask of a (GP*KSPLIT, BLOCK_B, KW) tile of d(W_hh h) at step tn, split as
    `_load_whh_cols` splits its K chunk: batch index b holds gate b // KSPLIT, columns
    offs_k + (b % KSPLIT) * KW (gate-major, GRU's n block from dhn, padding gates 0)."""
    KW: tl.constexpr = offs_k.shape[0]
    b3 = tl.arange(0, GP * KSPLIT)[:, None, None]
    g3 = b3 // KSPLIT
    k3 = offs_k[None, None, :] + (b3 % KSPLIT) * KW
    m = (g3 < G) & nvalid[None, :, None] & (k3 < H)
    p = dxg_ptr + tn.to(tl.int64) * B64 * (G * H) + xrow[None, :, None] + g3 * H + k3
    if CELL == GRU:
        pn = dhn_ptr + tn.to(tl.int64) * B64 * H + hrow[None, :, None] + k3
        p = tl.where(g3 == 2, pn, p)
    return p, m


@triton.jit
def _load_dgates_all(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, CELL: tl.constexpr,
                     G: tl.constexpr, GP: tl.constexpr, H: tl.constexpr,
                     POLL: tl.constexpr = False):  # fmt: skip
    """(GP, BLOCK_B, KC): columns offs_k of every gate of d(W_hh h) at step tn (gate-major,
    GRU's n block from dhn, padding gates 0); polled (volatile) or `.cg`, as `_load_h`."""
    p, m = _dgates_ptrs(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, CELL, G, GP, H)
    return _load_exchanged(p, m, POLL)


@triton.jit
def _dgates_dots(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, nvalid, w_res, whh_ptr, offs_n, mn, s,
                 CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, H: tl.constexpr,
                 W: tl.constexpr, KC: tl.constexpr, NKC: tl.constexpr,
                 BLOCK_B: tl.constexpr, BN: tl.constexpr, CHUNKS_PER_TRIP: tl.constexpr,
                 RESIDENT: tl.constexpr, SPLIT_ACC: tl.constexpr, POLL: tl.constexpr,
                 PREC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """dgates_{tn} @ W_hh[:, columns offs_n], (BLOCK_B, BN): the backward's recurrent
    product (the own units; projected LSTM: the own outputs, W = P). The gates are the
    batch dimension of a 3-D dot, so each warp multiplies one gate instead of every warp
    repeating the whole (BLOCK_B, BN) tile, a single mma tile. CHUNKS_PER_TRIP K chunks'
    loads (every gate) are issued together, as many as registers hold, then their dots,
    each from its own accumulator (SPLIT_ACC; at 64 rows a warp has 4 row tiles to overlap
    already and separate accumulators spilled), summed over the gates at the end. Weights
    resident (w_res: NKC (GP, KC, BN) chunks) or streamed."""
    acc3 = tl.zeros([GP, BLOCK_B, BN], dtype=ACC)
    for c0 in tl.static_range(0, NKC, CHUNKS_PER_TRIP):
        gk = ()
        for ci in tl.static_range(CHUNKS_PER_TRIP):
            if c0 + ci < NKC:
                offs_k = (c0 + ci) * KC + tl.arange(0, KC)
                gk = gk + (_load_dgates_all(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k,
                                            nvalid, CELL, G, GP, H, POLL),)  # fmt: skip
        for ci in tl.static_range(CHUNKS_PER_TRIP):
            if c0 + ci < NKC:
                if RESIDENT:
                    wk = w_res[c0 + ci]
                else:
                    offs_k = (c0 + ci) * KC + tl.arange(0, KC)
                    wk = _load_whh_cols(whh_ptr, offs_k, offs_n, mn, G, GP, H, W)
                if SPLIT_ACC:
                    acc3 += tl.dot(gk[ci], wk, _runtime_zeros(acc3, s), input_precision=PREC,
                                   out_dtype=ACC)  # fmt: skip
                else:
                    acc3 += tl.dot(gk[ci], wk, input_precision=PREC, out_dtype=ACC)
    return tl.sum(acc3, axis=0)
