"""The plain forward kernel (LSTM, GRU, RNN-tanh, RNN-relu) and the loads and dots only it uses.
Device code only (@triton.jit); imports the shared rooms (cell_math, exchange, tiles), never
another kernel family. Launched by launch.forward.

Program (p, q) owns hidden units [p*BH, p*BH+BH) for batch rows [q*BLOCK_B, q*BLOCK_B+BLOCK_B):
all G gate rows of W_hh for those units, as one (H, GP*BH) tile with the gates side by side
along N. h_{t-1} is exchanged through a (T+1)-row buffer whose first row (in processing order)
is h0 and whose other rows are y. A step issues all its exchange loads before the first dot
(one memory round trip) and keeps one accumulator per K chunk (`_chunk_dots`), so the HMMA
chains are short. c stays in registers (it depends on the program's own units only).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .cell_math import GRU, LSTM, RNN_TANH, _lstm_cell, _lstm_gates, _sigmoid, _split_gates, _tanh
from .exchange import (
    _after_wait,
    _any_pending,
    _barrier_arrive,
    _barrier_wait,
    _count_failed_polls,
    _load_exchanged,
    _pending_tiles,
    _store_exchange,
    _wait_clock,
    _wait_over,
)
from .norm import _forward_params, _normalize_rows, _store_c_numbers, _store_normalized
from .tiles import _regularizer_constants, _row_tile, _runtime_zeros, _time, _zoneout_weights


@triton.jit
def _chunk_dots(hp, w_res, z, N: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """sum_i hp[i] @ w_res[i]: one accumulator per K chunk (N independent MMA chains, not
    one H/16 deep), all started before any is summed."""
    parts = ()
    for i in tl.static_range(N):
        parts = parts + (tl.dot(hp[i], w_res[i], z, input_precision=PREC, out_dtype=ACC),)
    acc = parts[0]
    for i in tl.static_range(1, N):
        acc = acc + parts[i]
    return acc


@triton.jit
def _load_h(hx_ptr, row_off, hrow, offs_k, mb, H: tl.constexpr, EVEN_K: tl.constexpr,
            POLL: tl.constexpr = False):  # fmt: skip
    """h_{t-1} columns offs_k of every batch row of the tile, in the storage dtype, from the
    exchange buffer row at row_off (h0 sits in its first row: no special first step)."""
    if EVEN_K:
        m = mb[:, None]
    else:
        m = mb[:, None] & (offs_k < H)[None, :]
    return _load_exchanged(hx_ptr + row_off + hrow[:, None] + offs_k[None, :], m, POLL)


@triton.jit
def _reload_h(hx_ptr, row_off, hrow, offs_k, mb, H: tl.constexpr, EVEN_K: tl.constexpr, again,
              kept):  # fmt: skip
    """`_load_h` of a polled tile again where `again` (a tile still pending), else `kept`."""
    if EVEN_K:
        m = mb[:, None] & (again != 0)
    else:
        m = mb[:, None] & (offs_k < H)[None, :] & (again != 0)
    return tl.load(hx_ptr + row_off + hrow[:, None] + offs_k[None, :], mask=m, other=kept,
                   volatile=True)  # fmt: skip


@triton.jit
def _load_xg(xg_ptr, s, s_begin, s_end, T, B64, xrow, col_n, mb, mn, L, G: tl.constexpr,
             H: tl.constexpr, REVERSE: tl.constexpr):  # fmt: skip
    """xg of step s (fused gate columns col_n), in the storage dtype; 0 past the step range
    or a sequence's end."""
    t = _time(s, T, REVERSE)
    xv = mb & (t < L) & (s < s_end) & (s >= s_begin)
    return tl.load(xg_ptr + t.to(tl.int64) * B64 * (G * H) + xrow[:, None] + col_n[None, :],
                   mask=xv[:, None] & mn[None, :], other=0.0)  # fmt: skip


@triton.jit(do_not_specialize=["T", "B", "nrows", "s_begin", "s_end", "wait_bound"])
def _recurrence_fwd_kernel(
    xg_ptr, whh_ptr, bhn_ptr, len_ptr,
    hx_ptr, y_ptr, hs_ptr, cs_ptr, ws_ptr,
    zh_ptr, zc_ptr, rmask_ptr, rates_ptr, lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr, st_ptr,
    sync_ptr, T, B, nrows, s_begin, s_end, wait_bound,
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, BH: tl.constexpr, BLOCK_B: tl.constexpr,
    ON_CHIP: tl.constexpr, RESIDENT: tl.constexpr, HAS_LEN: tl.constexpr,
    REVERSE: tl.constexpr, SAVE: tl.constexpr, USE_BARRIER: tl.constexpr, POLL: tl.constexpr,
    ASM: tl.constexpr, SENTINEL: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    COUNT_POLLS: tl.constexpr = False, ZONEOUT: tl.constexpr = 0, RDROP: tl.constexpr = False,
    LN: tl.constexpr = False, LN_C: tl.constexpr = False, LN_STOP: tl.constexpr = 0,
    NHP: tl.constexpr = 1, NS: tl.constexpr = 0, LN_SENTINEL: tl.constexpr = 0,
):  # fmt: skip
    """Regularized (gpurnn.regularized; all off by default, and then compiled out):
    ZONEOUT 1 blends each own unit's h (and c) with its previous value by the step's packed
    bits zh (zc), 2 by the rate rates[0] (eval); RDROP multiplies what enters W_hh by the
    recurrent-dropout mask (packed, (B, ⌈H/8⌉)) times rates[1] = 1/(1 − p): the exchange
    rows then hold that product, and y is written apart. DropConnect is the launcher's (a
    masked W_hh, once per launch).
    LN: LayerNorm of h_{t-1} W_hhᵀ over each row's G*H columns (weight and bias lnw, lnb),
    LN_C (LSTM) of c̃_t over H (lncw, lncb), the rows' statistics exchanged through st
    (norm.py; NHP = n_h padded to a power of two). The workspace then adds the normalized
    W_hh h as G more fields and NS = 1 (3) numbers per row: 1/σ_hh (and μ_c, 1/σ_c). The
    per-step fallback runs a step in 1 + LN + LN_C launches: LN_STOP k ends the launch's
    work after publishing statistics k (nothing else it writes is kept), 0 runs it whole."""
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    offs_j = pid_h * BH + tl.arange(0, BH)
    mj = offs_j < H
    offs_b, mb, L = _row_tile(pid_b, nrows, T, len_ptr, BLOCK_B, HAS_LEN)
    m_own = mb[:, None] & mj[None, :]
    B64 = B.to(tl.int64)
    hrow = offs_b.to(tl.int64) * H
    xrow = offs_b.to(tl.int64) * (G * H)
    WSR: tl.constexpr = NW * H + NS  # workspace row: NW fields of H units, NS row numbers
    wrow = offs_b.to(tl.int64) * WSR
    own = hrow[:, None] + offs_j[None, :]
    hd = hx_ptr.dtype.element_ty
    # Reverse with lengths: a row's steps past its end come first and must carry h0 through
    # to its last valid step, so the exchange holds the running state and y (zeros there)
    # is written apart. Everywhere else the exchange rows are y itself.
    # With recurrent dropout the exchange rows hold what enters W_hh (the masked h), not y.
    SEPARATE_Y: tl.constexpr = (HAS_LEN and REVERSE) or RDROP
    EVEN_K: tl.constexpr = H % KC == 0
    # POLL (resident weights): no grid barrier. The exchange rows start as SENTINEL (a
    # signalling-NaN bit pattern that no arithmetic produces) and each is written once, so a
    # program reads its step's h_{t-1} until no element is the sentinel any more: the data
    # is its own barrier (no fence, no counter; one round trip from store to load).
    waits_ok = 1  # 0 once a wait of this program timed out
    failed_polls = 0  # COUNT_POLLS: polls that found data still on its way

    # running state of the own units: h0/c0 (or zeros) put in the state buffers by the
    # launcher, or what the previous launch left there (per-step fallback)
    hs = tl.load(hs_ptr + own, mask=m_own, other=0.0).to(ACC)
    cs = hs
    if CELL == LSTM:
        cs = tl.load(cs_ptr + own, mask=m_own, other=0.0).to(ACC)
    if CELL == GRU:
        bhn = tl.load(bhn_ptr + offs_j, mask=mj, other=0.0).to(ACC)
    zone_p, r_keep = _regularizer_constants(rates_ptr, rmask_ptr, offs_b, offs_j, m_own,
                                            ZONEOUT, RDROP, H, ACC)  # fmt: skip
    # LayerNorm: barriers per step (each exchange of statistics, then h's), and where the
    # step's statistics go: slot t * NX + k - 1 for exchange k
    NX: tl.constexpr = LN + LN_C
    NB: tl.constexpr = 1 + NX
    st_rows = (B64 + BLOCK_B - 1) // BLOCK_B * BLOCK_B  # a statistics slot's rows

    # Gates fused along N: column n of the (K, GP*BH) weight tile is unit n % BH of gate
    # n // BH (GP = G padded to a power of two), so the 4 warps split one dot by gate instead
    # of each repeating a narrow one.
    NG: tl.constexpr = GP * BH
    offs_n = tl.arange(0, NG)
    gate_n = offs_n // BH
    unit_n = pid_h * BH + offs_n % BH
    mn = (gate_n < G) & (unit_n < H)
    col_n = gate_n * H + unit_n  # column of xg, row of W_hh
    ln_w, ln_b, counts_hh, lnc_w, lnc_b, counts_c = _forward_params(
        lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr, col_n, mn, offs_j, mj, NHP, BH, H, G, LN, LN_C, ACC
    )  # fmt: skip
    # Weights loaded once, before the time loop (they live in shared memory from then on).
    # ON_CHIP: this program owns every unit (BH >= H), so K = BH and h never leaves it.
    # RESIDENT: K in NKC chunks of KC. Otherwise streamed from L2 in KC chunks every step.
    if ON_CHIP:
        offs_k = tl.arange(0, BH)
        w_res = (
            tl.load(whh_ptr + col_n[None, :] * H + offs_k[:, None],
                    mask=(offs_k < H)[:, None] & mn[None, :], other=0.0),
        )  # fmt: skip
    elif RESIDENT:
        w_res = ()
        for i in tl.static_range(NKC):
            offs_k = i * KC + tl.arange(0, KC)
            w_res = w_res + (
                tl.load(
                    whh_ptr + col_n[None, :] * H + offs_k[:, None],
                    mask=(offs_k < H)[:, None] & mn[None, :], other=0.0,
                ),
            )  # fmt: skip

    # xg of the step is loaded a step ahead: after the exchange stores (the wait for the
    # others' h hides its latency), or on chip, with no wait to hide it, at the top of the
    # step before (the step's own work does)
    x = _load_xg(xg_ptr, s_begin, s_begin, s_end, T, B64, xrow, col_n, mb, mn, L, G, H,
                 REVERSE).to(ACC)  # fmt: skip
    # the zoneout weights too, a step ahead (loaded in the step that uses them, they were an
    # exposed round trip)
    w_h, w_c = _zoneout_weights(zh_ptr, zc_ptr, zone_p, _time(s_begin, T, REVERSE),
                                mb & (s_begin < s_end), B64, offs_b, offs_j, mj, ZONEOUT, CELL,
                                H, ACC)  # fmt: skip

    for s in range(s_begin, s_end):
        if ON_CHIP:
            x_next = _load_xg(xg_ptr, s + 1, s_begin, s_end, T, B64, xrow, col_n, mb, mn, L, G,
                              H, REVERSE)  # fmt: skip
        t = _time(s, T, REVERSE)
        valid = mb & (t < L)

        # recurrent matvec: (BLOCK_B, H) h_{t-1} times the (H, GP*BH) fused gate tile
        acc = tl.zeros([BLOCK_B, NG], dtype=ACC)
        if ON_CHIP:
            h_in = hs
            if RDROP:
                h_in = hs * r_keep
            acc = tl.dot(h_in.to(hd), w_res[0], acc, input_precision=PREC, out_dtype=ACC)
        else:
            # exchange row of h_{t-1}: t (forward; row 0 is h0) or t + 1 (reverse; row T)
            prev = (t + REVERSE).to(tl.int64) * B64 * H
            if RESIDENT and POLL:
                # Every h_{t-1} tile is checked for the sentinel as it arrives, before it is
                # staged or multiplied, and only the loads go around again: a tile still
                # pending is loaded again (the others are kept), until none is. Genuine NaNs
                # never look pending (arithmetic only makes quiet NaNs), so they pass.
                hp = ()
                for i in tl.static_range(NKC):
                    offs_k = i * KC + tl.arange(0, KC)
                    hp = hp + (_load_h(hx_ptr, prev, hrow, offs_k, mb, H, EVEN_K, POLL),)
                pending = _any_pending(hp, SENTINEL, ASM)
                clock = _wait_clock()
                over = 1 - waits_ok
                while (pending != 0) & (over == 0):
                    if COUNT_POLLS:
                        failed_polls += 1
                    # 64-row tiles load them all again: keeping the arrived ones beside the
                    # reloads spilled registers on sm_90
                    late = -1
                    if BLOCK_B <= 32:
                        late = _pending_tiles(hp, SENTINEL, ASM)
                    again = ()
                    for i in tl.static_range(NKC):
                        offs_k = i * KC + tl.arange(0, KC)
                        again = again + (_reload_h(hx_ptr, prev, hrow, offs_k, mb, H, EVEN_K,
                                                   (late >> i) & 1, hp[i]),)  # fmt: skip
                    hp = again
                    pending = _any_pending(hp, SENTINEL, ASM)
                    if pending != 0:
                        clock, over = _wait_over(clock, wait_bound, ASM)
                waits_ok = _after_wait((pending == 0).to(tl.int32), waits_ok, sync_ptr)
                acc = _chunk_dots(hp, w_res, _runtime_zeros(acc, s), NKC, PREC, ACC)
            elif RESIDENT:
                # every load of the step first, then the dots: one memory round trip
                hp = ()
                for i in tl.static_range(NKC):
                    offs_k = i * KC + tl.arange(0, KC)
                    hp = hp + (_load_h(hx_ptr, prev, hrow, offs_k, mb, H, EVEN_K),)
                acc = _chunk_dots(hp, w_res, _runtime_zeros(acc, s), NKC, PREC,
                                  ACC)  # fmt: skip
            else:
                for k0 in range(0, H, KC):
                    offs_k = k0 + tl.arange(0, KC)
                    mk = offs_k < H
                    hp = _load_h(hx_ptr, prev, hrow, offs_k, mb, H, False)
                    wk = tl.load(
                        whh_ptr + col_n[None, :] * H + offs_k[:, None],
                        mask=mk[:, None] & mn[None, :], other=0.0,
                    )  # fmt: skip
                    acc = tl.dot(hp, wk, acc, input_precision=PREC, out_dtype=ACC)
        if LN:
            # LN_hh over the row's G*H columns (exchange 1 of the step)
            a_hat, _, rstd_hh, waits_ok, failed_polls = _normalize_rows(
                acc, mb[:, None] & mn[None, :], G * H, counts_hh, st_ptr, t * NX, offs_b, mb,
                st_rows, waits_ok, failed_polls, wait_bound, sync_ptr,
                ((s - s_begin) * NB + 1) * nprog, LN_STOP == 0 or LN_STOP >= 1, LN_STOP == 0,
                ON_CHIP, NHP, USE_BARRIER, POLL, LN_SENTINEL, ASM, COUNT_POLLS,
            )  # fmt: skip
            acc = a_hat * ln_w[None, :] + ln_b[None, :]
        a0, a1, a2, a3 = _split_gates(acc, BLOCK_B, BH, GP)
        x0, x1, x2, x3 = _split_gates(x, BLOCK_B, BH, GP)

        # gates (fp32, fp64 for fp64 inputs)
        if CELL == LSTM and LN_C:
            ig, fg, gg, og, c_new = _lstm_gates(x0, x1, x2, x3, a0, a1, a2, a3, cs)
            if SAVE:
                # stored before LN_c's exchange, whose wait they overlap
                row = t.to(tl.int64) * B64 * WSR
                wp = ws_ptr + row + wrow[:, None] + offs_j[None, :]
                wd = ws_ptr.dtype.element_ty
                v2 = valid[:, None]
                tl.store(wp, tl.where(v2, ig, 0.0).to(wd), mask=m_own)
                tl.store(wp + H, tl.where(v2, fg, 0.0).to(wd), mask=m_own)
                tl.store(wp + 2 * H, tl.where(v2, gg, 0.0).to(wd), mask=m_own)
                tl.store(wp + 3 * H, tl.where(v2, og, 0.0).to(wd), mask=m_own)
                _store_normalized(ws_ptr, row, wrow, col_n, mb, mn, valid, mb & (pid_h == 0), a_hat,
                                  rstd_hh, G, NW, H)  # fmt: skip
            # LN_c over the row's H units (exchange 2)
            c_hat, mu_c, rstd_c, waits_ok, failed_polls = _normalize_rows(
                c_new, m_own, H, counts_c, st_ptr, t * NX + 1, offs_b, mb, st_rows, waits_ok,
                failed_polls, wait_bound, sync_ptr, ((s - s_begin) * NB + 2) * nprog,
                LN_STOP == 0 or LN_STOP >= 2, LN_STOP == 0, ON_CHIP, NHP, USE_BARRIER, POLL,
                LN_SENTINEL, ASM, COUNT_POLLS,
            )  # fmt: skip
            h_new = og * _tanh(c_hat * lnc_w[None, :] + lnc_b[None, :])
        elif CELL == LSTM:
            ig, fg, gg, og, c_new, h_new = _lstm_cell(x0, x1, x2, x3, a0, a1, a2, a3, cs)
        elif CELL == GRU:
            hn = a2 + bhn[None, :]
            rg = _sigmoid(x0 + a0)
            zg = _sigmoid(x1 + a1)
            ng = _tanh(x2 + rg * hn)
            h_new = (1.0 - zg) * ng + zg * hs
        elif CELL == RNN_TANH:
            h_new = _tanh(x0 + a0)
        else:
            h_new = tl.maximum(x0 + a0, 0.0)
        h_act = h_new  # the RNN's saved field: its activation, before zoneout
        if ZONEOUT != 0:
            # LSTM: c_t blends c̃_t (whose tanh made h̃_t) with c_{t-1}; the workspace keeps
            # the blended c_t, and the backward rebuilds c̃_t = f c_{t-1} + i g from it
            h_new = w_h * hs + (1.0 - w_h) * h_new
            if CELL == LSTM:
                c_new = w_c * cs + (1.0 - w_c) * c_new

        # h_t into its exchange row: t + 1 (forward) or t (reverse). Past a sequence's end
        # y is 0 and the state is kept. The own state is kept as the others see it (rounded).
        v2 = valid[:, None]
        out = (t + 1 - REVERSE).to(tl.int64) * B64 * H
        toff = t.to(tl.int64) * B64
        if SEPARATE_Y:
            hs = tl.where(v2, h_new.to(hd).to(ACC), hs)
            if RDROP:
                _store_exchange(hx_ptr + out + own, (hs * r_keep).to(hd), m_own, ASM and POLL)
            else:
                _store_exchange(hx_ptr + out + own, hs.to(hd), m_own, ASM and POLL)
        else:
            yv = tl.where(v2, h_new, 0.0).to(hd)
            _store_exchange(hx_ptr + out + own, yv, m_own, ASM and POLL)
            hs = tl.where(v2, yv.to(ACC), hs)
        if CELL == LSTM:
            cs = tl.where(v2, c_new, cs)
        if USE_BARRIER:
            if s + 1 < s_end:
                _barrier_arrive(sync_ptr)
        elif not ON_CHIP and not POLL:
            # one program (or one step per launch): the other warps read this step's h from
            # the exchange buffer next step; the block barrier orders those loads after it
            tl.debug_barrier()

        # work that needs nobody else's data, overlapping the barrier
        if SEPARATE_Y:
            tl.store(y_ptr + toff * H + own, tl.where(v2, h_new, 0.0).to(hd), mask=m_own)
        if SAVE:
            wp = ws_ptr + toff * WSR + wrow[:, None] + offs_j[None, :]
            wd = ws_ptr.dtype.element_ty
            if CELL == LSTM:
                if not LN_C:  # (with LN_c, stored before its exchange)
                    tl.store(wp, tl.where(v2, ig, 0.0).to(wd), mask=m_own)
                    tl.store(wp + H, tl.where(v2, fg, 0.0).to(wd), mask=m_own)
                    tl.store(wp + 2 * H, tl.where(v2, gg, 0.0).to(wd), mask=m_own)
                    tl.store(wp + 3 * H, tl.where(v2, og, 0.0).to(wd), mask=m_own)
                tl.store(wp + 4 * H, tl.where(v2, c_new, 0.0).to(wd), mask=m_own)
            elif CELL == GRU:
                tl.store(wp, tl.where(v2, rg, 0.0).to(wd), mask=m_own)
                tl.store(wp + H, tl.where(v2, zg, 0.0).to(wd), mask=m_own)
                tl.store(wp + 2 * H, tl.where(v2, ng, 0.0).to(wd), mask=m_own)
                tl.store(wp + 3 * H, tl.where(v2, hn, 0.0).to(wd), mask=m_own)
            else:
                tl.store(wp, tl.where(v2, h_act, 0.0).to(wd), mask=m_own)
            mr = mb & (pid_h == 0)  # (one program writes a row's numbers)
            if LN_C:
                _store_c_numbers(ws_ptr, toff * WSR, wrow, offs_j, valid, mr, mu_c, rstd_c, NW, H)
            elif LN:
                _store_normalized(ws_ptr, toff * WSR, wrow, col_n, mb, mn, valid, mr, a_hat,
                                  rstd_hh, G, NW, H)  # fmt: skip
        if ON_CHIP:
            x = x_next.to(ACC)
        else:
            x = _load_xg(xg_ptr, s + 1, s_begin, s_end, T, B64, xrow, col_n, mb, mn, L, G, H,
                         REVERSE).to(ACC)  # fmt: skip
        w_h, w_c = _zoneout_weights(zh_ptr, zc_ptr, zone_p, _time(s + 1, T, REVERSE),
                                    mb & (s + 1 < s_end), B64, offs_b, offs_j, mj, ZONEOUT,
                                    CELL, H, ACC)  # fmt: skip
        if USE_BARRIER:
            if s + 1 < s_end:
                _barrier_wait(sync_ptr, (s - s_begin + 1) * NB * nprog, wait_bound, ASM)

    if LN_STOP == 0:  # (a stopping launch keeps nothing but its statistics)
        tl.store(hs_ptr + own, hs, mask=m_own)
        if CELL == LSTM:
            tl.store(cs_ptr + own, cs, mask=m_own)
    if COUNT_POLLS:
        _count_failed_polls(sync_ptr, failed_polls)
