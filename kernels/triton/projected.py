"""The LSTM-with-projection kernels, forward and backward (proj_size P: W_hh (4H, P),
W_hr (P, H), h = W_hr (o * tanh c) P wide), and the loads and dots only they use.
Device code only (@triton.jit); imports the shared rooms (cell_math, exchange, tiles), never
another kernel family. Launched by launch.forward / launch.backward when w_hr is given.

Two phases per step (gates on the own BH units, m exchanged; projection on the own BP outputs,
h exchanged; backward: dh on the own BP outputs, exchanged; dm and the gate backward on the
own units), each ended by a grid barrier (or, polled, none); the per-step fallback launches
each phase apart. The workspace is the plain LSTM's (m = o * tanh c follows from it).
Zoneout and recurrent dropout are the plain kernels' switches (ZONEOUT, RDROP), off by
default and compiled out; LayerNorm is not here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .cell_math import (
    LSTM,
    _lstm_cell,
    _lstm_gates,
    _lstm_step_backward,
    _lstm_step_backward_from,
    _split_gates,
    _tanh,
)
from .exchange import (
    _after_wait,
    _barrier_arrive,
    _barrier_wait,
    _count_failed_polls,
    _is_pending,
    _load_exchanged,
    _product_arrived,
    _store_exchange,
    _wait_clock,
    _wait_over,
)
from .norm import (
    _backward_params,
    _forward_params,
    _ln_c_backward,
    _ln_hh_backward,
    _ln_own_loads,
    _normalize_rows,
    _store_c_numbers,
    _store_normalized,
)
from .tiles import (
    _dgates_dots,
    _load_fields,
    _load_whh_cols,
    _regularizer_constants,
    _row_tile,
    _runtime_zeros,
    _time,
    _zoneout_weight,
)


@triton.jit
def _load_whr_t3(whr_ptr, c0, offs_p, mp, H: tl.constexpr, KC: tl.constexpr,
                 CPT: tl.constexpr):  # fmt: skip
    """(CPT, KC, BP): K chunks c0 .. c0+CPT-1 of W_hr^T (H, P), own output columns (rows
    past H 0)."""
    k3 = ((c0 + tl.arange(0, CPT)) * KC)[:, None, None] + tl.arange(0, KC)[None, :, None]
    return tl.load(whr_ptr + offs_p[None, None, :] * H + k3, mask=(k3 < H) & mp[None, None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def _load_rows(ptr, row_off, rows, offs_k, mrow, K: tl.constexpr, POLL: tl.constexpr):
    """(BLOCK_B, KC): columns offs_k (< K) of an exchanged (T, B, K) buffer's rows at row_off:
    polled (volatile) or `.cg`, as `_load_h`."""
    m = mrow[:, None] & (offs_k < K)[None, :]
    return _load_exchanged(ptr + row_off + rows[:, None] + offs_k[None, :], m, POLL)


@triton.jit
def _rows_pending(ptr, row_off, rows, mrow, K: tl.constexpr, KC: tl.constexpr,
                  SENTINEL: tl.constexpr):  # fmt: skip
    """1 if any element of those rows (all K columns) still holds the sentinel. A runtime loop
    over K chunks: compact code for the polls' rare path (a product came out NaN)."""
    pending = 0
    for k0 in range(0, K, KC):
        offs_k = k0 + tl.arange(0, KC)
        x = _load_rows(ptr, row_off, rows, offs_k, mrow, K, True)
        pending = pending | tl.max(_is_pending(x, SENTINEL).to(tl.int32))
    return pending


@triton.jit
def _lstmp_gate_dots(hx_ptr, prev, prow, mb, w_g, whh_ptr, col_n, mn, s, BLOCK_B: tl.constexpr,
                     NG: tl.constexpr, P: tl.constexpr, KC: tl.constexpr, NKP: tl.constexpr,
                     CHUNKS_PER_TRIP: tl.constexpr, RESIDENT: tl.constexpr,
                     POLL: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The gates phase's product h_{t-1} (P wide) @ the own W_hh rows, (BLOCK_B, GP*BH):
    CHUNKS_PER_TRIP K chunks' loads issued together, then their dots (each loaded chunk is
    staged in shared memory for its dot: the trip bounds how much at once)."""
    acc = tl.zeros([BLOCK_B, NG], dtype=ACC)
    for c0 in tl.static_range(0, NKP, CHUNKS_PER_TRIP):
        hp = ()
        for ci in tl.static_range(CHUNKS_PER_TRIP):
            if c0 + ci < NKP:
                offs_k = (c0 + ci) * KC + tl.arange(0, KC)
                hp = hp + (_load_rows(hx_ptr, prev, prow, offs_k, mb, P, POLL),)
        for ci in tl.static_range(CHUNKS_PER_TRIP):
            if c0 + ci < NKP:
                if RESIDENT:
                    wk = w_g[c0 + ci]
                else:
                    offs_k = (c0 + ci) * KC + tl.arange(0, KC)
                    wk = tl.load(whh_ptr + col_n[None, :] * P + offs_k[:, None],
                                 mask=(offs_k < P)[:, None] & mn[None, :], other=0.0)  # fmt: skip
                acc += tl.dot(hp[ci], wk, _runtime_zeros(acc, s), input_precision=PREC,
                              out_dtype=ACC)  # fmt: skip
    return acc


@triton.jit
def _lstmp_proj_dots(mx_ptr, mrow, hrow, mb_p, w_r, whr_ptr, offs_p, mp, BLOCK_B: tl.constexpr,
                     BP: tl.constexpr, H: tl.constexpr, KC: tl.constexpr, NKC: tl.constexpr,
                     CHUNKS_PER_TRIP: tl.constexpr, RESIDENT: tl.constexpr,
                     POLL: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The projection phase's product m_t (H wide) @ the own W_hr rows, (BLOCK_B, BP). The K
    chunks of a trip are the batch dimension of a 3-D dot: the output is a single mma tile,
    so a 2-D dot would have every warp repeat all of K; this way each warp takes its own
    chunks, then the chunks' partial sums add up."""
    hproj = tl.zeros([BLOCK_B, BP], dtype=ACC)
    for c0 in tl.static_range(0, NKC, CHUNKS_PER_TRIP):
        k3 = ((c0 + tl.arange(0, CHUNKS_PER_TRIP)) * KC)[:, None, None] + tl.arange(
            0, KC)[None, None, :]  # fmt: skip
        mk = _load_exchanged(mx_ptr + mrow + hrow[None, :, None] + k3,
                             mb_p[None, :, None] & (k3 < H), POLL)  # fmt: skip
        if RESIDENT:
            w3 = w_r[c0 // CHUNKS_PER_TRIP]
        else:
            w3 = _load_whr_t3(whr_ptr, c0, offs_p, mp, H, KC, CHUNKS_PER_TRIP)
        hproj += tl.sum(tl.dot(mk, w3, input_precision=PREC, out_dtype=ACC), axis=0)
    return hproj


@triton.jit(do_not_specialize=["T", "B", "nrows", "s_begin", "s_end", "wait_bound"])
def _lstmp_fwd_kernel(
    xg_ptr, whh_ptr, whr_ptr, len_ptr,
    hx_ptr, y_ptr, mx_ptr, hs_ptr, cs_ptr, ws_ptr, zh_ptr, zc_ptr, rmask_ptr, rates_ptr,
    lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr, st_ptr, sync_ptr, T, B, nrows, s_begin, s_end,
    wait_bound,
    G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, NKP: tl.constexpr, BH: tl.constexpr,
    BP: tl.constexpr, BLOCK_B: tl.constexpr, CHUNKS_PER_TRIP: tl.constexpr,
    ON_CHIP: tl.constexpr, RESIDENT: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    USE_BARRIER: tl.constexpr, PHASES: tl.constexpr, POLL: tl.constexpr, ASM: tl.constexpr,
    SENTINEL: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    COUNT_POLLS: tl.constexpr = False, ZONEOUT: tl.constexpr = 0, RDROP: tl.constexpr = False,
    LN: tl.constexpr = False, LN_C: tl.constexpr = False, LN_STOP: tl.constexpr = 0,
    NHP: tl.constexpr = 1, NS: tl.constexpr = 0, LN_SENTINEL: tl.constexpr = 0,
):  # fmt: skip
    """LSTM with projection (W_hh (4H, P), W_hr (P, H)), two phases per step:
    1. gates: program p owns units [p*BH, p*BH+BH): the gate dot of h_{t-1} (B, P) from the
       exchange buffer hx (P wide, K = P) with its W_hh rows, c, and m = o * tanh(c), which
       it stores to the m exchange buffer mx (two rows, alternating with the step's parity);
    2. projection: program p owns outputs [p*BP, p*BP+BP) (programs past P idle): the dot of
       m_t (B, H) from mx (K = H) with its W_hr rows, stored to hx (y is a view of it).
    A grid barrier follows each phase, or (POLL, resident weights) none: mx then has a row
    per step, and hx and mx start as the sentinel and are polled, as in the unprojected
    kernels. PHASES selects the phases (1, 2, or 3 = both): the per-step fallback launches
    each phase on its own, which is also how the interpreter runs several programs.
    Regularized (the plain kernels' switches; off by default, and then compiled out):
    ZONEOUT blends c_t of the own units in phase 1 (packed bits zc, H wide; m comes from
    c̃_t) and h_t of the own outputs in phase 2 (zh, P wide); RDROP stores h_t times the
    recurrent-dropout mask ((B, ⌈P/8⌉) packed, rates[1]) in the exchange rows, and y apart.
    LN, LN_C, LN_STOP as in the plain forward, in phase 1 (the gates): one more barrier per
    exchange of statistics; the per-step fallback's stopping launches run phase 1."""
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    offs_j = pid_h * BH + tl.arange(0, BH)
    mj = offs_j < H
    offs_p = pid_h * BP + tl.arange(0, BP)
    mp = offs_p < P
    offs_b, mb, L = _row_tile(pid_b, nrows, T, len_ptr, BLOCK_B, HAS_LEN)
    m_own = mb[:, None] & mj[None, :]
    m_ownp = mb[:, None] & mp[None, :]
    B64 = B.to(tl.int64)
    hrow = offs_b.to(tl.int64) * H
    prow = offs_b.to(tl.int64) * P
    xrow = offs_b.to(tl.int64) * (G * H)
    WSR: tl.constexpr = NW * H + NS  # workspace row: NW fields of H units, NS row numbers
    wrow = offs_b.to(tl.int64) * WSR
    own = hrow[:, None] + offs_j[None, :]
    ownp = prow[:, None] + offs_p[None, :]
    hd = hx_ptr.dtype.element_ty
    # as in the unprojected kernel: the exchange rows are not y with recurrent dropout
    SEPARATE_Y: tl.constexpr = (HAS_LEN and REVERSE) or RDROP
    waits_ok = 1  # 0 once a wait of this program timed out
    failed_polls = 0  # COUNT_POLLS: polls that found data still on its way

    # running state: the projected h of the own outputs, c of the own units
    hs = tl.load(hs_ptr + ownp, mask=m_ownp, other=0.0).to(ACC)
    cs = tl.load(cs_ptr + own, mask=m_own, other=0.0).to(ACC)
    # what enters W_hh is h over the own outputs times the recurrent-dropout factors (P wide)
    zone_p, r_keep = _regularizer_constants(rates_ptr, rmask_ptr, offs_b, offs_p, m_ownp,
                                            ZONEOUT, RDROP, P, ACC)  # fmt: skip
    # LayerNorm (phase 1): barriers per step (its exchanges, then the two phases'), and the
    # step's slots t * NX + k - 1 of the statistics
    NX: tl.constexpr = LN + LN_C
    NBP: tl.constexpr = 2 + NX
    st_rows = (B64 + BLOCK_B - 1) // BLOCK_B * BLOCK_B

    # gates fused along N as in the unprojected kernel: column n is unit n % BH of gate n // BH
    NG: tl.constexpr = GP * BH
    offs_n = tl.arange(0, NG)
    gate_n = offs_n // BH
    unit_n = pid_h * BH + offs_n % BH
    mn = (gate_n < G) & (unit_n < H)
    col_n = gate_n * H + unit_n  # column of xg, row of W_hh
    ln_w, ln_b, counts_hh, lnc_w, lnc_b, counts_c = _forward_params(
        lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr, col_n, mn, offs_j, mj, NHP, BH, H, G, LN, LN_C, ACC
    )  # fmt: skip
    if RESIDENT:
        # W_hh^T (P, GP*BH) in NKP chunks of KC rows; W_hr^T (H, BP) in NKC chunks
        w_g = ()
        for i in tl.static_range(NKP):
            offs_k = i * KC + tl.arange(0, KC)
            w_g = w_g + (
                tl.load(whh_ptr + col_n[None, :] * P + offs_k[:, None],
                        mask=(offs_k < P)[:, None] & mn[None, :], other=0.0),
            )  # fmt: skip
        w_r = ()
        for c0 in tl.static_range(0, NKC, CHUNKS_PER_TRIP):
            w_r = w_r + (_load_whr_t3(whr_ptr, c0, offs_p, mp, H, KC, CHUNKS_PER_TRIP),)
    else:
        w_g = ()  # streamed: the products load them
        w_r = ()

    # the step's own inputs are loaded a step ahead (xg and the zoneout weights of c for
    # phase 1, those of h for phase 2): first those of the launch's first step
    t = _time(s_begin, T, REVERSE)
    xv = mb & (t < L) & (s_begin < s_end)
    if PHASES % 2 == 1:
        x = tl.load(
            xg_ptr + t.to(tl.int64) * B64 * (G * H) + xrow[:, None] + col_n[None, :],
            mask=xv[:, None] & mn[None, :], other=0.0,
        ).to(ACC)  # fmt: skip
        w_c = _zoneout_weight(zc_ptr, zone_p, t, xv, B64, offs_b, offs_j, mj, ZONEOUT, H, ACC)
    if PHASES >= 2:
        w_h = _zoneout_weight(zh_ptr, zone_p, t, xv, B64, offs_b, offs_p, mp, ZONEOUT, P, ACC)

    for s in range(s_begin, s_end):
        t = _time(s, T, REVERSE)
        valid = mb & (t < L)
        v2 = valid[:, None]
        toff = t.to(tl.int64) * B64
        # the m exchange row of this step: polled, one row per step (written once); else two
        # rows, so a phase-1 store of step s+1 never meets a phase-2 load of step s (there is
        # a barrier between them anyway)
        if POLL:
            mrow = toff * H
        else:
            mrow = (s % 2) * B64 * H
        k_bar = NBP * (s - s_begin)
        if PHASES % 2 == 1:
            # exchange row of h_{t-1}: t (forward; row 0 is h0) or t + 1 (reverse; row T)
            prev = (t + REVERSE).to(tl.int64) * B64 * P
            if POLL:
                acc = tl.zeros([BLOCK_B, NG], dtype=ACC)
                arrived = 0
                complete = 0
                clock = _wait_clock()
                over = 1 - waits_ok
                while (arrived == 0) & (over == 0):
                    acc = _lstmp_gate_dots(hx_ptr, prev, prow, mb, w_g, whh_ptr, col_n, mn, s,
                                           BLOCK_B, NG, P, KC, NKP, CHUNKS_PER_TRIP, RESIDENT,
                                           POLL, PREC, ACC)  # fmt: skip
                    arrived = _product_arrived(acc, complete)
                    if arrived == 0:
                        complete = 1 - _rows_pending(hx_ptr, prev, prow, mb, P, KC, SENTINEL)
                    if arrived == 0:
                        clock, over = _wait_over(clock, wait_bound, ASM)
                        if COUNT_POLLS:
                            failed_polls += 1
                waits_ok = _after_wait(arrived, waits_ok, sync_ptr)
            else:
                acc = _lstmp_gate_dots(hx_ptr, prev, prow, mb, w_g, whh_ptr, col_n, mn, s,
                                       BLOCK_B, NG, P, KC, NKP, CHUNKS_PER_TRIP, RESIDENT,
                                       POLL, PREC, ACC)  # fmt: skip
            if LN:
                # LN_hh over the row's 4H columns (exchange 1 of the step)
                a_hat, _, rstd_hh, waits_ok, failed_polls = _normalize_rows(
                    acc, mb[:, None] & mn[None, :], G * H, counts_hh, st_ptr, t * NX, offs_b,
                    mb, st_rows, waits_ok, failed_polls, wait_bound, sync_ptr,
                    (k_bar + 1) * nprog, LN_STOP == 0 or LN_STOP >= 1, LN_STOP == 0, False, NHP,
                    USE_BARRIER, POLL, LN_SENTINEL, ASM, COUNT_POLLS,
                )  # fmt: skip
                acc = a_hat * ln_w[None, :] + ln_b[None, :]
            a0, a1, a2, a3 = _split_gates(acc, BLOCK_B, BH, GP)
            x0, x1, x2, x3 = _split_gates(x, BLOCK_B, BH, GP)
            if LN_C:
                ig, fg, gg, og, c_new = _lstm_gates(x0, x1, x2, x3, a0, a1, a2, a3, cs)
                # LN_c over the row's H units (exchange 2)
                c_hat, mu_c, rstd_c, waits_ok, failed_polls = _normalize_rows(
                    c_new, m_own, H, counts_c, st_ptr, t * NX + 1, offs_b, mb, st_rows,
                    waits_ok, failed_polls, wait_bound, sync_ptr, (k_bar + 2) * nprog,
                    LN_STOP == 0 or LN_STOP >= 2, LN_STOP == 0, False, NHP, USE_BARRIER, POLL,
                    LN_SENTINEL, ASM, COUNT_POLLS,
                )  # fmt: skip
                m_new = og * _tanh(c_hat * lnc_w[None, :] + lnc_b[None, :])
            else:
                ig, fg, gg, og, c_new, m_new = _lstm_cell(x0, x1, x2, x3, a0, a1, a2, a3, cs)
            if ZONEOUT != 0:
                # c_t blends c̃_t (whose tanh made m_t) with c_{t-1}; the workspace keeps c_t
                c_new = w_c * cs + (1.0 - w_c) * c_new
            cs = tl.where(v2, c_new, cs)
            _store_exchange(mx_ptr + mrow + own, tl.where(v2, m_new, 0.0).to(hd), m_own,
                            ASM and POLL)  # fmt: skip
            if USE_BARRIER:
                _barrier_arrive(sync_ptr)
            elif not POLL:
                tl.debug_barrier()
            if SAVE:
                wp = ws_ptr + toff * WSR + wrow[:, None] + offs_j[None, :]
                wd = ws_ptr.dtype.element_ty
                tl.store(wp, tl.where(v2, ig, 0.0).to(wd), mask=m_own)
                tl.store(wp + H, tl.where(v2, fg, 0.0).to(wd), mask=m_own)
                tl.store(wp + 2 * H, tl.where(v2, gg, 0.0).to(wd), mask=m_own)
                tl.store(wp + 3 * H, tl.where(v2, og, 0.0).to(wd), mask=m_own)
                tl.store(wp + 4 * H, tl.where(v2, c_new, 0.0).to(wd), mask=m_own)
                if LN:
                    mr = mb & (pid_h == 0)  # (one program writes a row's numbers)
                    _store_normalized(ws_ptr, toff * WSR, wrow, col_n, mb, mn, valid, mr, a_hat,
                                      rstd_hh, G, NW, H)  # fmt: skip
                    if LN_C:
                        _store_c_numbers(ws_ptr, toff * WSR, wrow, offs_j, valid, mr, mu_c,
                                         rstd_c, NW, H)  # fmt: skip
            if USE_BARRIER:
                _barrier_wait(sync_ptr, (k_bar + NX + 1) * nprog, wait_bound, ASM)
        if PHASES >= 2:
            # a program past P loads nothing (it only keeps step with the barriers)
            mb_p = mb & (pid_h * BP < P)
            if POLL:
                hproj = tl.zeros([BLOCK_B, BP], dtype=ACC)
                arrived = 0
                complete = 0
                clock = _wait_clock()
                over = 1 - waits_ok
                while (arrived == 0) & (over == 0):
                    hproj = _lstmp_proj_dots(mx_ptr, mrow, hrow, mb_p, w_r, whr_ptr, offs_p, mp,
                                             BLOCK_B, BP, H, KC, NKC, CHUNKS_PER_TRIP,
                                             RESIDENT, POLL, PREC, ACC)  # fmt: skip
                    arrived = _product_arrived(hproj, complete)
                    if arrived == 0:
                        complete = 1 - _rows_pending(mx_ptr, mrow, hrow, mb_p, H, KC, SENTINEL)
                    if arrived == 0:
                        clock, over = _wait_over(clock, wait_bound, ASM)
                        if COUNT_POLLS:
                            failed_polls += 1
                waits_ok = _after_wait(arrived, waits_ok, sync_ptr)
            else:
                hproj = _lstmp_proj_dots(mx_ptr, mrow, hrow, mb_p, w_r, whr_ptr, offs_p, mp,
                                         BLOCK_B, BP, H, KC, NKC, CHUNKS_PER_TRIP, RESIDENT,
                                         POLL, PREC, ACC)  # fmt: skip
            if ZONEOUT != 0:
                hproj = w_h * hs + (1.0 - w_h) * hproj
            # h_t into its exchange row: t + 1 (forward) or t (reverse)
            out = (t + 1 - REVERSE).to(tl.int64) * B64 * P
            if SEPARATE_Y:
                hs = tl.where(v2, hproj.to(hd).to(ACC), hs)
                if RDROP:
                    _store_exchange(hx_ptr + out + ownp, (hs * r_keep).to(hd), m_ownp,
                                    ASM and POLL)  # fmt: skip
                else:
                    _store_exchange(hx_ptr + out + ownp, hs.to(hd), m_ownp, ASM and POLL)
            else:
                yv = tl.where(v2, hproj, 0.0).to(hd)
                _store_exchange(hx_ptr + out + ownp, yv, m_ownp, ASM and POLL)
                hs = tl.where(v2, yv.to(ACC), hs)
            if USE_BARRIER:
                if s + 1 < s_end:
                    _barrier_arrive(sync_ptr)
            elif not POLL:
                tl.debug_barrier()
            # work that needs nobody else's data, overlapping the barrier
            if SEPARATE_Y:
                tl.store(y_ptr + toff * P + ownp, tl.where(v2, hproj, 0.0).to(hd), mask=m_ownp)
        tn = _time(s + 1, T, REVERSE)
        xv = mb & (tn < L) & (s + 1 < s_end)
        if PHASES % 2 == 1:
            x = tl.load(
                xg_ptr + tn.to(tl.int64) * B64 * (G * H) + xrow[:, None] + col_n[None, :],
                mask=xv[:, None] & mn[None, :], other=0.0,
            ).to(ACC)  # fmt: skip
            w_c = _zoneout_weight(zc_ptr, zone_p, tn, xv, B64, offs_b, offs_j, mj, ZONEOUT, H,
                                  ACC)  # fmt: skip
        if PHASES >= 2:
            w_h = _zoneout_weight(zh_ptr, zone_p, tn, xv, B64, offs_b, offs_p, mp, ZONEOUT, P,
                                  ACC)  # fmt: skip
            if USE_BARRIER:
                if s + 1 < s_end:
                    _barrier_wait(sync_ptr, (k_bar + NBP) * nprog, wait_bound, ASM)

    if LN_STOP == 0:  # (a stopping launch keeps nothing but its statistics)
        tl.store(hs_ptr + ownp, hs, mask=m_ownp)
        tl.store(cs_ptr + own, cs, mask=m_own)
    if COUNT_POLLS:
        _count_failed_polls(sync_ptr, failed_polls)


@triton.jit
def _lstmp_dm_dots(dhp_ptr, toff, prow, valid, w_r, whr_ptr, offs_j, mj, s, H: tl.constexpr,
                   P: tl.constexpr, KC: tl.constexpr, NKP: tl.constexpr, BLOCK_B: tl.constexpr,
                   BH: tl.constexpr, RESIDENT: tl.constexpr, POLL: tl.constexpr,
                   PREC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The backward's second product, dm = dh_t (P wide) @ W_hr[:, own units], (BLOCK_B, BH):
    every chunk's load first, then the dots."""
    dp = ()
    for i in tl.static_range(NKP):
        offs_k = i * KC + tl.arange(0, KC)
        dp = dp + (_load_rows(dhp_ptr, toff * P, prow, offs_k, valid, P, POLL),)
    dm = tl.zeros([BLOCK_B, BH], dtype=ACC)
    for i in tl.static_range(NKP):
        if RESIDENT:
            wk = w_r[i]
        else:
            offs_k = i * KC + tl.arange(0, KC)
            wk = tl.load(whr_ptr + offs_k[:, None] * H + offs_j[None, :],
                         mask=(offs_k < P)[:, None] & mj[None, :], other=0.0)  # fmt: skip
        dm += tl.dot(dp[i], wk, _runtime_zeros(dm, s), input_precision=PREC, out_dtype=ACC)
    return dm


@triton.jit(do_not_specialize=["T", "B", "nrows", "s_begin", "s_end", "wait_bound"])
def _lstmp_bwd_kernel(
    whh_ptr, whr_ptr, c0_ptr, len_ptr, ws_ptr, dy_ptr,
    dxg_ptr, dhp_ptr, dhs_ptr, dcs_ptr, zh_ptr, zc_ptr, rmask_ptr, rates_ptr,
    lnw_ptr, lncw_ptr, lncb_ptr, drec_ptr, st_ptr, lng_ptr, sync_ptr,
    T, B, nrows, s_begin, s_end, wait_bound,
    G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, NKP: tl.constexpr, BH: tl.constexpr,
    BP: tl.constexpr, BLOCK_B: tl.constexpr, CHUNKS_PER_TRIP: tl.constexpr,
    ON_CHIP: tl.constexpr, RESIDENT: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
    USE_BARRIER: tl.constexpr,
    PHASES: tl.constexpr, POLL: tl.constexpr, ASM: tl.constexpr, SENTINEL: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, COUNT_POLLS: tl.constexpr = False,
    ZONEOUT: tl.constexpr = 0, RDROP: tl.constexpr = False, LN: tl.constexpr = False,
    LN_C: tl.constexpr = False, LN_STOP: tl.constexpr = 0, NHP: tl.constexpr = 1,
    NS: tl.constexpr = 0, LN_SENTINEL: tl.constexpr = 0,
):  # fmt: skip
    """Backward of `_lstmp_fwd_kernel`, steps s in [0, T] (step s < T handles forward step
    T-1-s; step T only folds the first step's dgates into dh0), two phases per step:
    1. program p owns outputs [p*BP, p*BP+BP): dh_t = carry + dgates_{next} @ W_hh[:, own]
       (K = 4H, dgates from dxg) + dy_t, stored to dhp[t] (the exchange buffer, and dW_hr's
       input);
    2. program p owns units [p*BH, p*BH+BH): dm = dh_t (B, P) @ W_hr[:, own] (K = P), the
       LSTM gate backward with dm for dh, dgates to dxg[t].
    A grid barrier follows each phase, or (POLL) none: dxg and dhp start as the sentinel and
    are polled (PHASES as in the forward). Regularized (the forward's ZONEOUT, RDROP): the
    recurrent product, the gradient of the masked h_t, is multiplied by the mask; zoneout
    splits dh_t between h̃_t (dhp, 1 − w) and h_{t-1} (w), and dc_t likewise in phase 2.
    LayerNorm (the forward's LN, LN_C): its backward in phase 2, as the plain backward's
    (drec is then what the next step's first phase multiplies, and is polled; lng sums
    LN_c's parameter gradients); the per-step fallback's stopping launches run phase 2."""
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    offs_j = pid_h * BH + tl.arange(0, BH)
    mj = offs_j < H
    offs_p = pid_h * BP + tl.arange(0, BP)
    mp = offs_p < P
    offs_b, mb, L = _row_tile(pid_b, nrows, T, len_ptr, BLOCK_B, HAS_LEN)
    m_own = mb[:, None] & mj[None, :]
    m_ownp = mb[:, None] & mp[None, :]
    B64 = B.to(tl.int64)
    hrow = offs_b.to(tl.int64) * H
    prow = offs_b.to(tl.int64) * P
    xrow = offs_b.to(tl.int64) * (G * H)
    WSR: tl.constexpr = NW * H + NS  # workspace row (the forward's)
    NF: tl.constexpr = NW - G if LN else NW  # the cell's own fields (LayerNorm's follow)
    wrow = offs_b.to(tl.int64) * WSR
    own = hrow[:, None] + offs_j[None, :]
    ownp = prow[:, None] + offs_p[None, :]
    xd = dxg_ptr.dtype.element_ty
    waits_ok = 1  # 0 once a wait of this program timed out
    failed_polls = 0  # COUNT_POLLS: polls that found data still on its way

    # carries: dh of the own outputs (P wide), dc of the own units
    dh_c = tl.load(dhs_ptr + ownp, mask=m_ownp, other=0.0).to(ACC)
    dc_c = tl.load(dcs_ptr + own, mask=m_own, other=0.0).to(ACC)
    zone_p, r_keep = _regularizer_constants(rates_ptr, rmask_ptr, offs_b, offs_p, m_ownp,
                                            ZONEOUT, RDROP, P, ACC)  # fmt: skip
    # LayerNorm (phase 2): barriers per step, the statistics' rows, what phase 1 reads
    NX: tl.constexpr = LN + LN_C
    NBP: tl.constexpr = 2 + NX
    st_rows = (B64 + BLOCK_B - 1) // BLOCK_B * BLOCK_B
    if LN:
        xch_ptr = drec_ptr
    else:
        xch_ptr = dxg_ptr
    lw0, lw1, lw2, lw3, lnc_w, lnc_b, g_cw, g_cb = _backward_params(
        lnw_ptr, lncw_ptr, lncb_ptr, lng_ptr, offs_j, mj, own, m_own, B64, G, H, LN, LN_C, ACC
    )  # fmt: skip
    # the zoneout weights, loaded a step ahead (h's for phase 1, c's for phase 2)
    t = _time(T - 1 - s_begin, T, REVERSE)
    zv = mb & (t < L) & (s_begin < T)
    w_h = _zoneout_weight(zh_ptr, zone_p, t, zv, B64, offs_b, offs_p, mp, ZONEOUT, P, ACC)
    w_c = _zoneout_weight(zc_ptr, zone_p, t, zv, B64, offs_b, offs_j, mj, ZONEOUT, H, ACC)
    if RESIDENT:
        # W_hh[:, own outputs] as NKC (GP, KC, BP) chunks (gates as the batch dimension of a
        # 3-D dot, as in the unprojected backward); W_hr[:, own units] as NKP (KC, BH) chunks
        w_g = ()
        for i in tl.static_range(NKC):
            offs_k = i * KC + tl.arange(0, KC)
            w_g = w_g + (_load_whh_cols(whh_ptr, offs_k, offs_p, mp, G, GP, H, P),)
        w_r = ()
        for i in tl.static_range(NKP):
            offs_k = i * KC + tl.arange(0, KC)
            w_r = w_r + (
                tl.load(whr_ptr + offs_k[:, None] * H + offs_j[None, :],
                        mask=(offs_k < P)[:, None] & mj[None, :], other=0.0),
            )  # fmt: skip
    else:
        w_g = ()  # streamed: the products load them
        w_r = ()

    for s in range(s_begin, s_end):
        t = _time(T - 1 - s, T, REVERSE)
        valid = mb & (t < L) & (s < T)
        v2 = valid[:, None]
        toff = t.to(tl.int64) * B64
        k_bar = NBP * (s - s_begin)
        slot = tl.minimum(tl.maximum(t, 0), T - 1)  # (the final step's: one that exists)
        # phase 2's grid-barrier arrivals so far in the step: the final step's phase 1 has none
        k_ln = k_bar + (s < T).to(tl.int32)
        if PHASES % 2 == 1:
            # the forward step after this one (processed by the previous backward step)
            if REVERSE:
                tn = t - 1
            else:
                tn = t + 1
            # (a program past P loads nothing: it only keeps step with the barriers)
            nvalid = mb & (s > 0) & (tn < L) & (pid_h * BP < P)
            if POLL:
                rec = tl.zeros([BLOCK_B, BP], dtype=ACC)
                arrived = 0
                complete = 0
                clock = _wait_clock()
                over = 1 - waits_ok
                while (arrived == 0) & (over == 0):
                    rec = _dgates_dots(xch_ptr, xch_ptr, tn, B64, xrow, hrow, nvalid, w_g,
                                       whh_ptr, offs_p, mp, s, LSTM, G, GP, H, P, KC, NKC,
                                       BLOCK_B, BP, CHUNKS_PER_TRIP, RESIDENT, BLOCK_B < 64,
                                       POLL, PREC, ACC)  # fmt: skip
                    arrived = _product_arrived(rec, complete)
                    if arrived == 0:
                        row_off = tn.to(tl.int64) * B64 * (G * H)
                        complete = 1 - _rows_pending(xch_ptr, row_off, xrow, nvalid, G * H, KC,
                                                     SENTINEL)  # fmt: skip
                    if arrived == 0:
                        clock, over = _wait_over(clock, wait_bound, ASM)
                        if COUNT_POLLS:
                            failed_polls += 1
                waits_ok = _after_wait(arrived, waits_ok, sync_ptr)
            else:
                rec = _dgates_dots(xch_ptr, xch_ptr, tn, B64, xrow, hrow, nvalid, w_g, whh_ptr,
                                   offs_p, mp, s, LSTM, G, GP, H, P, KC, NKC, BLOCK_B, BP,
                                   CHUNKS_PER_TRIP, RESIDENT, BLOCK_B < 64, POLL, PREC,
                                   ACC)  # fmt: skip
            if RDROP:
                rec = rec * r_keep  # it is the gradient of the masked h_t
            dh_c += rec
            dy = tl.load(dy_ptr + toff * P + ownp, mask=v2 & mp[None, :], other=0.0).to(ACC)
            dh = dh_c + dy
            kept = 0.0
            if ZONEOUT != 0:
                # of dh_t, w goes straight to h_{t-1}, (1 − w) through the projection (h̃_t)
                kept = w_h * dh
                dh = (1.0 - w_h) * dh
            # rows past a sequence's end: dhp 0, the carry rides on to the sequence's end
            _store_exchange(dhp_ptr + toff * P + ownp, tl.where(v2, dh, 0.0).to(xd),
                            m_ownp & (s < T), ASM and POLL)  # fmt: skip
            dh_c = tl.where(v2, kept, dh_c)
            if USE_BARRIER:
                if s < T:
                    _barrier_arrive(sync_ptr)
            elif not POLL:
                tl.debug_barrier()
        if PHASES >= 2:
            # the own units' saved fields and c_{t-1}, overlapping the barrier
            mv = v2 & mj[None, :]
            f0, f1, f2, f3, f4 = _load_fields(ws_ptr, toff * WSR + wrow, offs_j, mv, H, NF,
                                              ACC)  # fmt: skip
            # c_{t-1}: the saved c of the previous step, c0 at a sequence's first step
            if REVERSE:
                tp = t + 1
            else:
                tp = t - 1
            pvalid = valid & (tp >= 0) & (tp < L)
            first = valid & ~pvalid
            pv = tl.load(ws_ptr + tp.to(tl.int64) * B64 * WSR + wrow[:, None] + 4 * H
                         + offs_j[None, :], mask=pvalid[:, None] & mj[None, :],
                         other=0.0).to(ACC)  # fmt: skip
            pv += tl.load(c0_ptr + own, mask=first[:, None] & mj[None, :], other=0.0).to(ACC)
            if LN:
                n0, n1, n2, n3, rstd_hh, mu_c, rstd_c = _ln_own_loads(
                    s, T, B64, L, mb, mj, offs_j, wrow, ws_ptr, G, NW, WSR, H, LN_C, REVERSE, ACC
                )  # fmt: skip
        if PHASES % 2 == 1:
            if USE_BARRIER:
                if s < T:
                    _barrier_wait(sync_ptr, (k_bar + 1) * nprog, wait_bound, ASM)  # (phase 1's)
        if PHASES >= 2:
            if POLL:
                dm = tl.zeros([BLOCK_B, BH], dtype=ACC)
                arrived = 0
                complete = 0
                clock = _wait_clock()
                over = 1 - waits_ok
                while (arrived == 0) & (over == 0):
                    dm = _lstmp_dm_dots(dhp_ptr, toff, prow, valid, w_r, whr_ptr, offs_j, mj, s,
                                        H, P, KC, NKP, BLOCK_B, BH, RESIDENT, POLL, PREC,
                                        ACC)  # fmt: skip
                    arrived = _product_arrived(dm, complete)
                    if arrived == 0:
                        complete = 1 - _rows_pending(dhp_ptr, toff * P, prow, valid, P, KC,
                                                     SENTINEL)  # fmt: skip
                    if arrived == 0:
                        clock, over = _wait_over(clock, wait_bound, ASM)
                        if COUNT_POLLS:
                            failed_polls += 1
                waits_ok = _after_wait(arrived, waits_ok, sync_ptr)
            else:
                dm = _lstmp_dm_dots(dhp_ptr, toff, prow, valid, w_r, whr_ptr, offs_j, mj, s, H, P,
                                    KC, NKP, BLOCK_B, BH, RESIDENT, POLL, PREC, ACC)  # fmt: skip
            if LN_C:
                # m_t = o tanh(LN_c(c̃_t)): the gradient of c̃_t through LN_c (exchange 1)
                dc_ln, tc, g_cw, g_cb, waits_ok, failed_polls = _ln_c_backward(
                    dm, f0, f1, f2, f3, f4, pv, mu_c, rstd_c, lnc_w, lnc_b, g_cw, g_cb, v2,
                    m_own, H, st_ptr, slot * NX, offs_b, mb & (s < T), st_rows, waits_ok,
                    failed_polls, wait_bound, sync_ptr, (k_ln + 1) * nprog,
                    LN_STOP == 0 or LN_STOP >= 1, LN_STOP == 0, False, ZONEOUT, NHP,
                    USE_BARRIER, POLL, LN_SENTINEL, ASM, COUNT_POLLS,
                )  # fmt: skip
                d0, d1, d2, d3, dc_c = _lstm_step_backward_from(dc_ln, dm, tc, dc_c, w_c, f0, f1,
                                                                f2, f3, pv, v2,
                                                                ZONEOUT)  # fmt: skip
            else:
                d0, d1, d2, d3, dc_c = _lstm_step_backward(dm, dc_c, w_c, f0, f1, f2, f3, f4, pv,
                                                           v2, ZONEOUT)  # fmt: skip
            ms = m_own & (s < T)
            gp = dxg_ptr + toff * (G * H) + xrow[:, None] + offs_j[None, :]
            relaxed: tl.constexpr = ASM and POLL and not LN  # (with LayerNorm drec is exchanged)
            _store_exchange(gp, tl.where(v2, d0, 0.0).to(xd), ms, relaxed)
            _store_exchange(gp + H, tl.where(v2, d1, 0.0).to(xd), ms, relaxed)
            _store_exchange(gp + 2 * H, tl.where(v2, d2, 0.0).to(xd), ms, relaxed)
            _store_exchange(gp + 3 * H, tl.where(v2, d3, 0.0).to(xd), ms, relaxed)
            if LN:
                # LN_hh backward (exchange NX): what W_hh multiplies next step, into drec
                q0, q1, q2, q3, waits_ok, failed_polls = _ln_hh_backward(
                    d0, d1, d2, d3, lw0, lw1, lw2, lw3, n0, n1, n2, n3, rstd_hh, v2, m_own, G, H,
                    st_ptr, slot * NX + LN_C, offs_b, mb & (s < T), st_rows, waits_ok,
                    failed_polls, wait_bound, sync_ptr, (k_ln + NX) * nprog,
                    LN_STOP == 0 or LN_STOP >= NX, LN_STOP == 0, False, NHP, USE_BARRIER, POLL,
                    LN_SENTINEL, ASM, COUNT_POLLS,
                )  # fmt: skip
                rp = drec_ptr + toff * (G * H) + xrow[:, None] + offs_j[None, :]
                _store_exchange(rp, q0.to(xd), ms, ASM and POLL)
                _store_exchange(rp + H, q1.to(xd), ms, ASM and POLL)
                _store_exchange(rp + 2 * H, q2.to(xd), ms, ASM and POLL)
                _store_exchange(rp + 3 * H, q3.to(xd), ms, ASM and POLL)
        t_next = _time(T - 2 - s, T, REVERSE)
        zv = mb & (t_next < L) & (s + 1 < T)
        if PHASES % 2 == 1:
            w_h = _zoneout_weight(zh_ptr, zone_p, t_next, zv, B64, offs_b, offs_p, mp, ZONEOUT, P,
                                  ACC)  # fmt: skip
        if PHASES >= 2:
            w_c = _zoneout_weight(zc_ptr, zone_p, t_next, zv, B64, offs_b, offs_j, mj, ZONEOUT, H,
                                  ACC)  # fmt: skip
            if USE_BARRIER:
                if s + 1 < s_end:
                    _barrier_arrive(sync_ptr)
                    _barrier_wait(sync_ptr, (k_bar + NBP) * nprog, wait_bound, ASM)
            elif not POLL:
                tl.debug_barrier()

    if LN_STOP == 0:  # (a stopping launch keeps nothing but its sums)
        tl.store(dhs_ptr + ownp, dh_c, mask=m_ownp)
        tl.store(dcs_ptr + own, dc_c, mask=m_own)
        if LN_C:
            tl.store(lng_ptr + own, g_cw, mask=m_own)
            tl.store(lng_ptr + B64 * H + own, g_cb, mask=m_own)
    if COUNT_POLLS:
        _count_failed_polls(sync_ptr, failed_polls)
