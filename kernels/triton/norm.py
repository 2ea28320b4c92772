"""LayerNorm inside the step (gpurnn.regularized's layer_norm): a row's partial moments over
the columns a program owns, their exchange between the programs of a batch tile, and how
they combine, what the forward saves of it and the backward's loads of that. Device code only
(@triton.jit); imports the exchange protocol (exchange), the activations (cell_math) and
the tile helpers (tiles).

LN_hh normalizes each batch row of h_{t-1} W_hhᵀ over all G*H columns, LN_c (LSTM) each
row of c̃_t over H, and their backward needs two row sums of the same widths; a program owns
G*BH (BH) of those columns. So each such reduction is an exchange of two numbers per row and
program: published into one slot of a statistics buffer (slots, B padded to whole batch
tiles, NHP, 2) in the accumulation dtype (NHP: n_h's power of two; what pads stays 0), each
slot written once per launch, and gathered whole by every program of the batch tile
(`_gather_pairs`: whole rows, one wave of unmasked loads off one address): polled for the
sentinel like the h rows (POLL), after a grid barrier, or, with one program or one step
per launch, after a block barrier. Forward pairs are (mean, centred sum of squares),
reduced and combined as Chan et al. combine moments (one block reduction each, and no
cancellation of E[x²] − E[x]²); backward pairs are plain sums. On-chip plans own every
column and reduce in registers (`_row_moments` over the whole row).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .cell_math import _tanh
from .exchange import (
    _after_wait,
    _any_pending,
    _barrier_arrive,
    _barrier_wait,
    _store_exchange,
    _wait_clock,
    _wait_over,
)
from .tiles import _load_fields, _time

EPS: tl.constexpr = tl.constexpr(1e-5)  # gpurnn.cells.LAYER_NORM_EPS (checked by the tests)


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Two groups' (count, mean, centred sum of squares) as one (Chan et al.): the combine of
    one-pass reductions, so that a row's moments take one block reduction, not two."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)  # (counts are whole numbers: 0 only when both are empty)
    d = mean_b - mean_a
    return n, mean_a + d * w, m2_a + m2_b + d * d * n_a * w


@triton.jit
def _row_moments(v, m):
    """(mean, centred sum of squares) of each row of v over the columns where m."""
    _, mean, m2 = tl.reduce((m.to(v.dtype), tl.where(m, v, 0.0), tl.zeros_like(v)), 1, _chan)
    return mean, m2


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _row_sums(a, b):
    """Each row's sums of a and of b, in one block reduction."""
    return tl.reduce((a, b), 1, _add_pairs)


@triton.jit
def _rstd(m2, n):
    return 1.0 / tl.sqrt(m2 / n + EPS)


@triton.jit
def _slot_ptrs(st_ptr, slot, offs_b, offs_p, rows, NHP: tl.constexpr):
    """Where program column offs_p publishes rows offs_b of a slot: (slot, b, p, 0). A slot
    holds `rows` (B padded to whole batch tiles) rows of NHP (a compile-time power of two)
    pairs, those past the batch and the grid's programs 0, so a gather is whole rows of
    whole tiles: vector loads off one address, no mask."""
    base = st_ptr + slot.to(tl.int64) * rows * (NHP * 2)
    return base + (offs_b.to(tl.int64) * (NHP * 2) + offs_p * 2)


@triton.jit
def _publish_pair(st_ptr, slot, offs_b, mask, rows, a, b, NHP: tl.constexpr,
                  ASM: tl.constexpr):  # fmt: skip
    """This program's two row numbers (a, b: (BLOCK_B,)) into a slot (relaxed when polled)."""
    p = _slot_ptrs(st_ptr, slot, offs_b, tl.program_id(0), rows, NHP)
    _store_exchange(p, a, mask, ASM)
    _store_exchange(p + 1, b, mask, ASM)


@triton.jit
def _load_pairs(st_ptr, slot, offs_b, rows, NHP: tl.constexpr, POLL: tl.constexpr):
    """(BLOCK_B, NHP, 2): every program's pair of the rows, contiguous per row."""
    p = _slot_ptrs(st_ptr, slot, offs_b[:, None, None], tl.arange(0, NHP)[None, :, None], rows,
                   NHP)  # fmt: skip
    p = p + tl.arange(0, 2)[None, None, :]
    if POLL:
        return tl.load(p, volatile=True)
    else:
        return tl.load(p, cache_modifier=".cg")


@triton.jit
def _gather_pairs(st_ptr, slot, offs_b, rows, waits_ok, failed_polls, wait_bound, sync_ptr,
                  NHP: tl.constexpr, POLL: tl.constexpr, SENTINEL: tl.constexpr,
                  ASM: tl.constexpr, COUNT_POLLS: tl.constexpr):  # fmt: skip
    """Every program's pair of a slot (one that exists: the caller clamps it), (BLOCK_B,
    NHP) each (rows past the batch: 0). POLL: loaded again until no element is the sentinel
    or the wait runs out, as the h rows are (exchange.py). Returns (a, b, waits_ok,
    failed_polls)."""
    pairs = _load_pairs(st_ptr, slot, offs_b, rows, NHP, POLL)
    if POLL:
        # compared in plain code, not `_any_pending`'s inline PTX: that is ordered among the
        # volatile loads of one tile, and held each load back until the one before arrived
        pending = _any_pending((pairs,), SENTINEL, False)
        clock = _wait_clock()
        over = 1 - waits_ok
        while (pending != 0) & (over == 0):
            if COUNT_POLLS:
                failed_polls += 1
            pairs = _load_pairs(st_ptr, slot, offs_b, rows, NHP, POLL)
            pending = _any_pending((pairs,), SENTINEL, False)
            if pending != 0:
                clock, over = _wait_over(clock, wait_bound, ASM)
        waits_ok = _after_wait((pending == 0).to(tl.int32), waits_ok, sync_ptr)
    a, b = tl.split(pairs)
    return a, b, waits_ok, failed_polls


@triton.jit
def _combine_moments(means, m2s, counts, n):
    """Mean and 1/sqrt(var + eps) per row from every program's (mean, centred sum of
    squares) over counts[p] columns ((BLOCK_B, NHP), (NHP,); n = their total)."""
    c = tl.zeros_like(means) + counts[None, :]
    _, mean, m2 = tl.reduce((c, means, m2s), 1, _chan)
    return mean, _rstd(m2, n)


@triton.jit
def _program_counts(NHP: tl.constexpr, BH: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                    ACC: tl.constexpr):  # fmt: skip
    """Columns each program column owns of a G*H-wide row (G = 1: of an H-wide one)."""
    units = tl.minimum(tl.maximum(H - tl.arange(0, NHP) * BH, 0), BH)
    return (units * G).to(ACC)


@triton.jit
def _exchange_pair(st_ptr, slot, offs_b, mask, rows, a, b, waits_ok, failed_polls, wait_bound,
                   sync_ptr, target, PUBLISH: tl.constexpr, WAIT: tl.constexpr,
                   NHP: tl.constexpr, USE_BARRIER: tl.constexpr, POLL: tl.constexpr,
                   SENTINEL: tl.constexpr, ASM: tl.constexpr,
                   COUNT_POLLS: tl.constexpr):  # fmt: skip
    """Publish this program's pair (a, b) into a slot and gather every program's: polled
    (POLL), behind a grid barrier (USE_BARRIER: the target-th arrival of the launch), or
    after a block barrier (one program, or one step per launch). A stopping launch of the
    per-step fallback publishes only what it stops after (PUBLISH) and never polls
    (WAIT off: what it gathers after that is discarded). Returns `_gather_pairs`'s."""
    if PUBLISH:
        _publish_pair(st_ptr, slot, offs_b, mask, rows, a, b, NHP, ASM and POLL)
    if USE_BARRIER:
        _barrier_arrive(sync_ptr)
        _barrier_wait(sync_ptr, target, wait_bound, ASM)
    elif not POLL:
        tl.debug_barrier()
    return _gather_pairs(st_ptr, slot, offs_b, rows, waits_ok, failed_polls, wait_bound,
                         sync_ptr, NHP, POLL and WAIT, SENTINEL, ASM, COUNT_POLLS)  # fmt: skip


@triton.jit
def _normalize_rows(v, m, n, counts, st_ptr, slot, offs_b, mb, st_rows, waits_ok, failed_polls,
                    wait_bound, sync_ptr, target, PUBLISH: tl.constexpr, WAIT: tl.constexpr,
                    ON_CHIP: tl.constexpr, NHP: tl.constexpr, USE_BARRIER: tl.constexpr,
                    POLL: tl.constexpr, SENTINEL: tl.constexpr, ASM: tl.constexpr,
                    COUNT_POLLS: tl.constexpr):  # fmt: skip
    """Each row of v normalized over all n columns of the batch tile's programs (the own
    ones where m; counts[p] each, from `_program_counts`): on chip in registers, else its
    moments exchanged through a slot (`_exchange_pair`). Returns (v̂, mean, 1/σ, waits_ok,
    failed_polls)."""
    mean, m2 = _row_moments(v, m)
    if ON_CHIP:
        rstd = _rstd(m2, n)
    else:
        a, b, waits_ok, failed_polls = _exchange_pair(
            st_ptr, slot, offs_b, mb, st_rows, mean, m2, waits_ok, failed_polls, wait_bound,
            sync_ptr, target, PUBLISH, WAIT, NHP, USE_BARRIER, POLL, SENTINEL, ASM, COUNT_POLLS,
        )  # fmt: skip
        mean, rstd = _combine_moments(a, b, counts, n)
    return (v - mean[:, None]) * rstd[:, None], mean, rstd, waits_ok, failed_polls


@triton.jit
def _exchanged_row_sums(a, b, st_ptr, slot, offs_b, mb, st_rows, waits_ok, failed_polls,
                        wait_bound, sync_ptr, target, PUBLISH: tl.constexpr,
                        WAIT: tl.constexpr, ON_CHIP: tl.constexpr, NHP: tl.constexpr,
                        USE_BARRIER: tl.constexpr, POLL: tl.constexpr, SENTINEL: tl.constexpr,
                        ASM: tl.constexpr, COUNT_POLLS: tl.constexpr):  # fmt: skip
    """Each row's sums of a and of b over all columns of the batch tile's programs (the
    backward's two sums per normalization): on chip in registers, else exchanged through a
    slot. Returns (Σ a, Σ b, waits_ok, failed_polls)."""
    s1, s2 = _row_sums(a, b)
    if not ON_CHIP:
        a_p, b_p, waits_ok, failed_polls = _exchange_pair(
            st_ptr, slot, offs_b, mb, st_rows, s1, s2, waits_ok, failed_polls, wait_bound,
            sync_ptr, target, PUBLISH, WAIT, NHP, USE_BARRIER, POLL, SENTINEL, ASM, COUNT_POLLS,
        )  # fmt: skip
        s1, s2 = _row_sums(a_p, b_p)
    return s1, s2, waits_ok, failed_polls


@triton.jit
def _ln_own_loads(s, T, B64, L, mb, mj, offs_j, wrow, ws_ptr, G: tl.constexpr,
                  NW: tl.constexpr, WSR: tl.constexpr, H: tl.constexpr, LN_C: tl.constexpr,
                  REVERSE: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """LayerNorm's saved values of backward step s (as the kernels' own loads): the
    normalized W_hh h of the own units (fields NW - G ..), 1/σ_hh and LN_c's μ_c, 1/σ_c of
    each row."""
    t = _time(T - 1 - s, T, REVERSE)
    valid = mb & (t < L) & (s < T)
    row = t.to(tl.int64) * B64 * WSR + wrow
    n0, n1, n2, n3, _ = _load_fields(ws_ptr, row + (NW - G) * H, offs_j,
                                     valid[:, None] & mj[None, :], H, G, ACC)  # fmt: skip
    rstd_hh = tl.load(ws_ptr + row + NW * H, mask=valid, other=0.0).to(ACC)
    mu_c = rstd_hh
    rstd_c = rstd_hh
    if LN_C:
        mu_c = tl.load(ws_ptr + row + NW * H + 1, mask=valid, other=0.0).to(ACC)
        rstd_c = tl.load(ws_ptr + row + NW * H + 2, mask=valid, other=0.0).to(ACC)
    return n0, n1, n2, n3, rstd_hh, mu_c, rstd_c


@triton.jit
def _ln_c_backward(dh, ig, fg, gg, og, c, c_prev, mu_c, rstd_c, w, b, g_w, g_b, valid2, m_own,
                   H: tl.constexpr, st_ptr, slot, offs_b, mb, st_rows, waits_ok, failed_polls,
                   wait_bound, sync_ptr, target, PUBLISH: tl.constexpr, WAIT: tl.constexpr,
                   ON_CHIP: tl.constexpr, ZONEOUT: tl.constexpr, NHP: tl.constexpr,
                   USE_BARRIER: tl.constexpr, POLL: tl.constexpr, SENTINEL: tl.constexpr,
                   ASM: tl.constexpr, COUNT_POLLS: tl.constexpr):  # fmt: skip
    """The LSTM's h̃_t = o tanh(w ĉ + b), ĉ = LN_c(c̃_t), backwards into c̃_t, for the own
    units: c̃_t is the saved c (with zoneout the blended c_t, so rebuilt as f c_{t-1} + i g),
    ĉ from the saved row statistics; the two row sums (Σ dĉ, Σ dĉ ĉ) over all H units are
    exchanged. Adds LN_c's weight and bias gradients of the step to g_w, g_b. Returns (the
    gradient of c̃_t through h̃_t, the tanh, g_w, g_b, waits_ok, failed_polls)."""
    if ZONEOUT != 0:
        c = fg * c_prev + ig * gg
    c_hat = (c - mu_c[:, None]) * rstd_c[:, None]
    tc = _tanh(c_hat * w[None, :] + b[None, :])
    d_norm = tl.where(valid2, dh * og * (1.0 - tc * tc), 0.0)  # of LN_c(c̃_t)
    g_w += d_norm * c_hat
    g_b += d_norm
    d_hat = d_norm * w[None, :]
    s1, s2, waits_ok, failed_polls = _exchanged_row_sums(
        tl.where(m_own, d_hat, 0.0), tl.where(m_own, d_hat * c_hat, 0.0), st_ptr, slot, offs_b,
        mb, st_rows, waits_ok, failed_polls, wait_bound, sync_ptr, target, PUBLISH, WAIT,
        ON_CHIP, NHP, USE_BARRIER, POLL, SENTINEL, ASM, COUNT_POLLS,
    )  # fmt: skip
    dc = rstd_c[:, None] * (d_hat - s1[:, None] / H - c_hat * (s2[:, None] / H))
    return dc, tc, g_w, g_b, waits_ok, failed_polls


@triton.jit
def _ln_hh_backward(d0, d1, d2, d3, w0, w1, w2, w3, n0, n1, n2, n3, rstd, valid2, m_own,
                    G: tl.constexpr, H: tl.constexpr, st_ptr, slot, offs_b, mb, st_rows,
                    waits_ok, failed_polls, wait_bound, sync_ptr, target,
                    PUBLISH: tl.constexpr, WAIT: tl.constexpr, ON_CHIP: tl.constexpr,
                    NHP: tl.constexpr, USE_BARRIER: tl.constexpr, POLL: tl.constexpr,
                    SENTINEL: tl.constexpr, ASM: tl.constexpr,
                    COUNT_POLLS: tl.constexpr):  # fmt: skip
    """LN_hh backwards for the own units: from the gradients of the normalized W_hh h, gate
    by gate (d0.. of the first G; w0.. LN_hh's weight there, n0.. the saved normalized
    values), the gradient before the normalization, rstd (x̂'s d − mean(d) − x̂ mean(d x̂)),
    the row means over all G*H columns exchanged. Returns (q0, q1, q2, q3, waits_ok,
    failed_polls), 0 where not valid2 (unused gates alias q0)."""
    mv = m_own & valid2
    r0 = tl.where(mv, d0 * w0[None, :], 0.0)
    r1 = r0
    r2 = r0
    r3 = r0
    r_sum = r0
    rn_sum = r0 * n0
    if G > 1:
        r1 = tl.where(mv, d1 * w1[None, :], 0.0)
        r2 = tl.where(mv, d2 * w2[None, :], 0.0)
        r_sum += r1 + r2
        rn_sum += r1 * n1 + r2 * n2
    if G > 3:
        r3 = tl.where(mv, d3 * w3[None, :], 0.0)
        r_sum += r3
        rn_sum += r3 * n3
    s1, s2, waits_ok, failed_polls = _exchanged_row_sums(
        r_sum, rn_sum, st_ptr, slot, offs_b, mb, st_rows, waits_ok, failed_polls, wait_bound,
        sync_ptr, target, PUBLISH, WAIT, ON_CHIP, NHP, USE_BARRIER, POLL, SENTINEL, ASM,
        COUNT_POLLS,
    )  # fmt: skip
    m1 = (s1 / (G * H))[:, None]
    m2 = (s2 / (G * H))[:, None]
    rs = rstd[:, None]
    q0 = tl.where(valid2, rs * (r0 - m1 - n0 * m2), 0.0)
    q1 = q0
    q2 = q0
    q3 = q0
    if G > 1:
        q1 = tl.where(valid2, rs * (r1 - m1 - n1 * m2), 0.0)
        q2 = tl.where(valid2, rs * (r2 - m1 - n2 * m2), 0.0)
    if G > 3:
        q3 = tl.where(valid2, rs * (r3 - m1 - n3 * m2), 0.0)
    return q0, q1, q2, q3, waits_ok, failed_polls


@triton.jit
def _store_row_number(ptr, value, valid, first, mask):
    """A per-row number (BLOCK_B,) of a tile's layout stored from the tile itself: by its
    `first` column (a (1, N) mask) of every row, all columns pointing at the row's entry;
    so it needs no layout conversion (a block barrier or two each)."""
    v = tl.where(valid, value, 0.0)[:, None] + tl.zeros_like(first.to(value.dtype))
    tl.store(ptr[:, None] + tl.zeros_like(first.to(tl.int32)), v.to(ptr.dtype.element_ty),
             mask=mask[:, None] & first)  # fmt: skip


@triton.jit
def _store_normalized(ws_ptr, row, wrow, col_n, mb, mn, valid, mr, a_hat, rstd_hh,
                      G: tl.constexpr, NW: tl.constexpr, H: tl.constexpr):  # fmt: skip
    """LayerNorm's workspace entries of a step (rows from `row` on): the normalized W_hh h
    of the own units (fields NW - G ..: column n of the fused tile is field NW - G + gate,
    unit j, so it is stored as it is, with no split) and, from one program per row (mr),
    1/σ_hh after the fields."""
    wd = ws_ptr.dtype.element_ty
    wn = ws_ptr + row + wrow[:, None] + (NW - G) * H + col_n[None, :]
    tl.store(wn, tl.where(valid[:, None], a_hat, 0.0).to(wd), mask=mb[:, None] & mn[None, :])
    _store_row_number(ws_ptr + row + wrow + NW * H, rstd_hh, valid, (col_n == 0)[None, :], mr)


@triton.jit
def _forward_params(lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr, col_n, mn, offs_j, mj,
                    NHP: tl.constexpr, BH: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                    LN: tl.constexpr, LN_C: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """What a forward launch keeps of LayerNorm for all its steps: LN_hh's weight and bias
    at the fused gate columns col_n and the program columns' counts of them, LN_c's at the
    own units and their counts (scalars where off: unused)."""
    ln_w = 0.0
    ln_b = 0.0
    counts_hh = 0.0
    lnc_w = 0.0
    lnc_b = 0.0
    counts_c = 0.0
    if LN:
        ln_w = tl.load(lnw_ptr + col_n, mask=mn, other=0.0).to(ACC)
        ln_b = tl.load(lnb_ptr + col_n, mask=mn, other=0.0).to(ACC)
        counts_hh = _program_counts(NHP, BH, H, G, ACC)
    if LN_C:
        lnc_w = tl.load(lncw_ptr + offs_j, mask=mj, other=0.0).to(ACC)
        lnc_b = tl.load(lncb_ptr + offs_j, mask=mj, other=0.0).to(ACC)
        counts_c = _program_counts(NHP, BH, H, 1, ACC)
    return ln_w, ln_b, counts_hh, lnc_w, lnc_b, counts_c


@triton.jit
def _backward_params(lnw_ptr, lncw_ptr, lncb_ptr, lng_ptr, offs_j, mj, own, m_own, B64,
                     G: tl.constexpr, H: tl.constexpr, LN: tl.constexpr, LN_C: tl.constexpr,
                     ACC: tl.constexpr):  # fmt: skip
    """What a backward launch keeps of LayerNorm: LN_hh's weight at the own units, gate by
    gate (unused gates alias the first), LN_c's weight and bias, and LN_c's parameter
    gradients so far per (row, unit) (lng, (2, B, H); scalars where off: unused)."""
    lw0 = 0.0
    lw1 = 0.0
    lw2 = 0.0
    lw3 = 0.0
    lnc_w = 0.0
    lnc_b = 0.0
    g_cw = 0.0
    g_cb = 0.0
    if LN:
        lw0 = tl.load(lnw_ptr + offs_j, mask=mj, other=0.0).to(ACC)
        lw1 = lw0
        lw2 = lw0
        lw3 = lw0
        if G > 1:
            lw1 = tl.load(lnw_ptr + H + offs_j, mask=mj, other=0.0).to(ACC)
            lw2 = tl.load(lnw_ptr + 2 * H + offs_j, mask=mj, other=0.0).to(ACC)
        if G > 3:
            lw3 = tl.load(lnw_ptr + 3 * H + offs_j, mask=mj, other=0.0).to(ACC)
    if LN_C:
        lnc_w = tl.load(lncw_ptr + offs_j, mask=mj, other=0.0).to(ACC)
        lnc_b = tl.load(lncb_ptr + offs_j, mask=mj, other=0.0).to(ACC)
        g_cw = tl.load(lng_ptr + own, mask=m_own, other=0.0).to(ACC)
        g_cb = tl.load(lng_ptr + B64 * H + own, mask=m_own, other=0.0).to(ACC)
    return lw0, lw1, lw2, lw3, lnc_w, lnc_b, g_cw, g_cb


@triton.jit
def _store_c_numbers(ws_ptr, row, wrow, offs_j, valid, mr, mu_c, rstd_c, NW: tl.constexpr,
                     H: tl.constexpr):  # fmt: skip
    """LN_c's row numbers of a step (rows from `row` on), μ_c and 1/σ_c after 1/σ_hh, from
    the program of the first units (mr)."""
    wr = ws_ptr + row + wrow + NW * H
    first = (offs_j == 0)[None, :]
    _store_row_number(wr + 1, mu_c, valid, first, mr)
    _store_row_number(wr + 2, rstd_c, valid, first, mr)
