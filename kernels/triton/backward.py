"""The plain backward kernel (LSTM, GRU, RNN-tanh, RNN-relu) and the loads only it uses.
Device code only (@triton.jit); imports the shared rooms (cell_math, exchange, tiles), never
another kernel family. Launched by launch.backward.

Backward runs T+1 steps in reverse processing order: dh_t = dy_t + dgates_{t+1} @ W_hh
(the own units' columns, a G*H x BH column block of W_hh), the gate backward for the own units
from the workspace, dgates written to dxg[t] (GRU: dn_pre*r to dhn[t] as well, the n block of
d(W_hh h)). dgates are exchanged through dxg (and dhn), about one memory round trip per gate;
the carries dh/dc stay in registers. The extra step only folds the first step's dgates into
dh0. dW_hh / db_hn are GEMMs in the backend.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .cell_math import GRU, LSTM, RNN_TANH, _lstm_step_backward, _lstm_step_backward_from
from .exchange import (
    _after_wait,
    _any_pending,
    _barrier_arrive,
    _barrier_wait,
    _count_failed_polls,
    _store_exchange,
    _wait_clock,
    _wait_over,
)
from .norm import _backward_params, _ln_c_backward, _ln_hh_backward, _ln_own_loads
from .tiles import (
    _dgates_dots,
    _dgates_ptrs,
    _load_fields,
    _load_whh_cols,
    _regularizer_constants,
    _row_tile,
    _runtime_zeros,
    _time,
    _zoneout_weights,
)


@triton.jit
def _load_w(whh_ptr, offs_k, offs_j, mk, mj, g: tl.constexpr, H: tl.constexpr, BWD: tl.constexpr):
    """(K, BH) tile of gate g: forward W_g^T[k, j] = W_hh[gH+j, k]; backward W_hh[gH+k, j]."""
    m = mk[:, None] & mj[None, :]
    if BWD:
        p = whh_ptr + (g * H + offs_k[:, None]) * H + offs_j[None, :]
    else:
        p = whh_ptr + (g * H + offs_j[None, :]) * H + offs_k[:, None]
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _load_dgates(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, g: tl.constexpr,
                 CELL: tl.constexpr, G: tl.constexpr, H: tl.constexpr):  # fmt: skip
    """Columns offs_k of gate g of d(W_hh h) at step tn, every batch row of the tile: dxg's
    block g, except GRU's n block, which is dhn (= dn_pre * r)."""
    m = nvalid[:, None] & (offs_k < H)[None, :]
    if CELL == GRU and g == 2:
        p = dhn_ptr + tn.to(tl.int64) * B64 * H + hrow[:, None] + offs_k[None, :]
    else:
        p = dxg_ptr + tn.to(tl.int64) * B64 * (G * H) + xrow[:, None] + g * H + offs_k[None, :]
    return tl.load(p, mask=m, other=0.0, cache_modifier=".cg")


@triton.jit
def _dgates_polled(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, nvalid, w_res, s, clock, over,
                   failed_polls, wait_bound, CELL: tl.constexpr, G: tl.constexpr,
                   GP: tl.constexpr, H: tl.constexpr, KC: tl.constexpr, NKC: tl.constexpr,
                   BLOCK_B: tl.constexpr, BH: tl.constexpr, CHUNKS_PER_TRIP: tl.constexpr,
                   KSPLIT: tl.constexpr, SENTINEL: tl.constexpr, ASM: tl.constexpr,
                   COUNT_POLLS: tl.constexpr, PREC: tl.constexpr,
                   ACC: tl.constexpr):  # fmt: skip
    """`_dgates_dots` with resident weights, polled: each wave of loads (CHUNKS_PER_TRIP K
    chunks of every gate) is checked for the sentinel as it arrives and loaded again while
    any of it is pending (only the loads go around: nothing is multiplied twice) until
    nothing is or the wait runs out (`over`); then the wave is multiplied. Returns the product
    and the wait's state (clock, over, failed_polls). Each K chunk is split in KSPLIT slabs,
    and (gate x slab) is the batch of the 3-D dot: one batch index per warp (4 gates x 2
    slabs on 8 warps), so no warp repeats another's MMAs and each holds 1/KSPLIT of a
    chunk's loads."""
    KW: tl.constexpr = KC // KSPLIT
    acc3 = tl.zeros([GP * KSPLIT, BLOCK_B, BH], dtype=ACC)
    for c0 in tl.static_range(0, NKC, CHUNKS_PER_TRIP):
        gk = ()
        for ci in tl.static_range(CHUNKS_PER_TRIP):
            if c0 + ci < NKC:
                offs_k = (c0 + ci) * KC + tl.arange(0, KW)
                p, m = _dgates_ptrs(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, CELL,
                                    G, GP, H, KSPLIT)  # fmt: skip
                gk = gk + (tl.load(p, mask=m, other=0.0, volatile=True),)
        pending = _any_pending(gk, SENTINEL, ASM)
        while (pending != 0) & (over == 0):
            if COUNT_POLLS:
                failed_polls += 1
            again = ()
            for ci in tl.static_range(len(gk)):
                offs_k = (c0 + ci) * KC + tl.arange(0, KW)
                p, m = _dgates_ptrs(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, CELL,
                                    G, GP, H, KSPLIT)  # fmt: skip
                again = again + (tl.load(p, mask=m, other=0.0, volatile=True),)
            gk = again
            pending = _any_pending(gk, SENTINEL, ASM)
            if pending != 0:
                clock, over = _wait_over(clock, wait_bound, ASM)
        for ci in tl.static_range(len(gk)):
            acc3 += tl.dot(gk[ci], w_res[c0 + ci], _runtime_zeros(acc3, s), input_precision=PREC,
                           out_dtype=ACC)  # fmt: skip
    return tl.sum(acc3, axis=0), clock, over, failed_polls


@triton.jit
def _bwd_own_loads(
    s, T, B64, L, mb, mj, offs_j, hrow, wrow, y_ptr, h0_ptr, c0_ptr, ws_ptr, dy_ptr,
    CELL: tl.constexpr, NF: tl.constexpr, WSR: tl.constexpr, H: tl.constexpr,
    REVERSE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Everything of backward step s that only this program's units need (and that no other
    program writes during the launch): dy, the saved fields (the first NF of a workspace row
    WSR wide), and c_{t-1} / h_{t-1} (c0 / h0 at a sequence's first step; the launcher
    passes zeros for a missing one)."""
    # backward step s handles forward step T-1-s
    t = _time(T - 1 - s, T, REVERSE)
    if REVERSE:
        tp = t + 1
    else:
        tp = t - 1
    valid = mb & (t < L) & (s < T)
    pvalid = valid & (tp >= 0) & (tp < L)
    first = valid & ~pvalid
    mv = valid[:, None] & mj[None, :]
    toff = t.to(tl.int64) * B64
    poff = tp.to(tl.int64) * B64
    own = hrow[:, None] + offs_j[None, :]
    dy = tl.load(dy_ptr + toff * H + own, mask=mv, other=0.0).to(ACC)
    f0, f1, f2, f3, f4 = _load_fields(ws_ptr, toff * WSR + wrow, offs_j, mv, H, NF, ACC)
    mp = pvalid[:, None] & mj[None, :]
    mf = first[:, None] & mj[None, :]
    if CELL == LSTM:
        pv = tl.load(ws_ptr + poff * WSR + wrow[:, None] + 4 * H + offs_j[None, :], mask=mp,
                     other=0.0).to(ACC)  # fmt: skip
        pv += tl.load(c0_ptr + own, mask=mf, other=0.0).to(ACC)
    elif CELL == GRU:
        pv = tl.load(y_ptr + poff * H + own, mask=mp, other=0.0).to(ACC)
        pv += tl.load(h0_ptr + own, mask=mf, other=0.0).to(ACC)
    else:
        pv = dy
    return dy, f0, f1, f2, f3, f4, pv


@triton.jit(do_not_specialize=["T", "B", "nrows", "s_begin", "s_end", "wait_bound"])
def _recurrence_bwd_kernel(
    whh_ptr, h0_ptr, c0_ptr, len_ptr, y_ptr, ws_ptr, dy_ptr,
    dxg_ptr, dhn_ptr, dhs_ptr, dcs_ptr,
    zh_ptr, zc_ptr, rmask_ptr, rates_ptr, lnw_ptr, lncw_ptr, lncb_ptr, drec_ptr, st_ptr,
    lng_ptr, sync_ptr, T, B, nrows, s_begin, s_end, wait_bound,
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, BH: tl.constexpr, BLOCK_B: tl.constexpr,
    CHUNKS_PER_TRIP: tl.constexpr, ON_CHIP: tl.constexpr, RESIDENT: tl.constexpr,
    HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, USE_BARRIER: tl.constexpr,
    POLL: tl.constexpr, ASM: tl.constexpr, SENTINEL: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, COUNT_POLLS: tl.constexpr = False,
    KSPLIT: tl.constexpr = 1, ZONEOUT: tl.constexpr = 0, RDROP: tl.constexpr = False,
    LN: tl.constexpr = False, LN_C: tl.constexpr = False, LN_STOP: tl.constexpr = 0,
    NHP: tl.constexpr = 1, NS: tl.constexpr = 0, LN_SENTINEL: tl.constexpr = 0,
):  # fmt: skip
    """Steps s in [0, T]: step s < T handles forward step T-1-s; step T only adds the last
    dgates' recurrent contribution (to dh0). dgates (= dxg, except GRU's n block, kept apart in
    dhn as dn_pre * r) are exchanged through their output buffers, or, ON_CHIP (one program
    owns every unit), kept in registers from one step to the next. POLL (resident weights):
    dxg and dhn start as the sentinel and are polled, as the forward's exchange rows.
    Regularized (the forward's ZONEOUT and RDROP): the recurrent product, the gradient of
    the masked h_t, is multiplied by the mask; zoneout splits dh_t (dc_t) between h̃_t and
    h_{t-1} by the step's weights.
    LayerNorm (the forward's LN, LN_C, LN_STOP): LN_c's backward needs two row sums over H
    and LN_hh's two over G*H (exchanged through st, as the forward's statistics); what
    enters the recurrent product is then the gradient of h_{t-1} W_hhᵀ before the
    normalization, written to drec and exchanged through it (dxg and dhn stay the gate
    gradients); LN_c's weight and bias gradients are summed over the steps per (row,
    unit) into lng (2, B, H)."""
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
    WSR: tl.constexpr = NW * H + NS  # workspace row (the forward's)
    NF: tl.constexpr = NW - G if LN else NW  # the cell's own fields (LayerNorm's follow)
    wrow = offs_b.to(tl.int64) * WSR
    GH: tl.constexpr = G * H
    own = hrow[:, None] + offs_j[None, :]
    xd = dxg_ptr.dtype.element_ty
    waits_ok = 1  # 0 once a wait of this program timed out
    failed_polls = 0  # COUNT_POLLS: polls that found data still on its way

    # carries: dh_T / dc_T (put in the state buffers by the launcher) or what the previous
    # launch left there
    dh_c = tl.load(dhs_ptr + own, mask=m_own, other=0.0).to(ACC)
    dc_c = dh_c
    if CELL == LSTM:
        dc_c = tl.load(dcs_ptr + own, mask=m_own, other=0.0).to(ACC)
    zone_p, r_keep = _regularizer_constants(rates_ptr, rmask_ptr, offs_b, offs_j, m_own,
                                            ZONEOUT, RDROP, H, ACC)  # fmt: skip
    NX: tl.constexpr = LN + LN_C  # exchanges of row sums per step (the forward's)
    NB: tl.constexpr = 1 + NX
    st_rows = (B64 + BLOCK_B - 1) // BLOCK_B * BLOCK_B  # a statistics slot's rows
    # what the recurrent product reads: with LayerNorm its own buffer, every gate alike
    if LN:
        xch_ptr = drec_ptr
        XCELL: tl.constexpr = LSTM
    else:
        xch_ptr = dxg_ptr
        XCELL: tl.constexpr = CELL
    lw0, lw1, lw2, lw3, lnc_w, lnc_b, g_cw, g_cb = _backward_params(
        lnw_ptr, lncw_ptr, lncb_ptr, lng_ptr, offs_j, mj, own, m_own, B64, G, H, LN, LN_C, ACC
    )  # fmt: skip

    # W_hh[:, own units], gate-major: ON_CHIP G (BH, BH) tiles; RESIDENT G*NKC (KC, BH) tiles
    if ON_CHIP:
        offs_k = tl.arange(0, BH)
        w0 = _load_w(whh_ptr, offs_k, offs_j, offs_k < H, mj, 0, H, True)
        w1 = w0
        w2 = w0
        w3 = w0
        if G > 1:
            w1 = _load_w(whh_ptr, offs_k, offs_j, offs_k < H, mj, 1, H, True)
            w2 = _load_w(whh_ptr, offs_k, offs_j, offs_k < H, mj, 2, H, True)
        if G > 3:
            w3 = _load_w(whh_ptr, offs_k, offs_j, offs_k < H, mj, 3, H, True)
        # the previous step's dgates of every unit (d(W_hh h) blocks), storage-rounded
        e0 = tl.zeros([BLOCK_B, BH], dtype=xd)
        e1 = e0
        e2 = e0
        e3 = e0
    elif RESIDENT:
        # NKC (GP, KC, BH) chunks, gates stacked as the batch dimension of a 3-D dot: each
        # warp then multiplies one gate, instead of every warp repeating the whole
        # (BLOCK_B, BH) tile (which is a single mma tile)
        w_res = ()
        for i in tl.static_range(NKC):
            offs_k = i * KC + tl.arange(0, KC // KSPLIT)
            w_res = w_res + (_load_whh_cols(whh_ptr, offs_k, offs_j, mj, G, GP, H, H, KSPLIT),)

    dy, f0, f1, f2, f3, f4, pv = _bwd_own_loads(
        s_begin, T, B64, L, mb, mj, offs_j, hrow, wrow, y_ptr, h0_ptr, c0_ptr, ws_ptr, dy_ptr,
        CELL, NF, WSR, H, REVERSE, ACC,
    )  # fmt: skip
    if LN:
        n0, n1, n2, n3, rstd_hh, mu_c, rstd_c = _ln_own_loads(
            s_begin, T, B64, L, mb, mj, offs_j, wrow, ws_ptr, G, NW, WSR, H, LN_C, REVERSE, ACC
        )
    t_first = _time(T - 1 - s_begin, T, REVERSE)
    w_h, w_c = _zoneout_weights(zh_ptr, zc_ptr, zone_p, t_first, mb & (t_first < L) & (s_begin < T),
                                B64, offs_b, offs_j, mj, ZONEOUT, CELL, H, ACC)  # fmt: skip

    for s in range(s_begin, s_end):
        t = _time(T - 1 - s, T, REVERSE)
        valid = mb & (t < L) & (s < T)
        # the forward step after this one (processed by the previous backward step)
        if REVERSE:
            tn = t - 1
        else:
            tn = t + 1
        nvalid = mb & (s > 0) & (tn < L)
        # LayerNorm's statistics slot: the final step (s == T, t outside [0, T)) reads one
        # that exists, and drops it
        slot = tl.minimum(tl.maximum(t, 0), T - 1)

        # dh_t += dgates_{next} @ W_hh[:, own units] (rows past a sequence's end hold 0).
        # One accumulator per gate: independent HMMA chains instead of one G*H deep.
        rec = tl.zeros([BLOCK_B, BH], dtype=ACC)
        if ON_CHIP:
            z = _runtime_zeros(rec, s)
            rec += tl.dot(e0, w0, z, input_precision=PREC, out_dtype=ACC)
            if G > 1:
                rec += tl.dot(e1, w1, z, input_precision=PREC, out_dtype=ACC)
                rec += tl.dot(e2, w2, z, input_precision=PREC, out_dtype=ACC)
            if G > 3:
                rec += tl.dot(e3, w3, z, input_precision=PREC, out_dtype=ACC)
        elif RESIDENT and POLL:
            # as the forward's poll, wave by wave: see `_dgates_polled`
            clock = _wait_clock()
            over = 1 - waits_ok
            rec, clock, over, failed_polls = _dgates_polled(
                xch_ptr, dhn_ptr, tn, B64, xrow, hrow, nvalid, w_res, s, clock, over,
                failed_polls, wait_bound, XCELL, G, GP, H, KC, NKC, BLOCK_B, BH, CHUNKS_PER_TRIP,
                KSPLIT, SENTINEL, ASM, COUNT_POLLS, PREC, ACC,
            )  # fmt: skip
            waits_ok = _after_wait(1 - over, waits_ok, sync_ptr)
        elif RESIDENT:
            rec = _dgates_dots(xch_ptr, dhn_ptr, tn, B64, xrow, hrow, nvalid, w_res, whh_ptr,
                               offs_j, mj, s, XCELL, G, GP, H, H, KC, NKC, BLOCK_B, BH,
                               CHUNKS_PER_TRIP, True, True, False, PREC, ACC)  # fmt: skip
        else:
            for k0 in range(0, H, KC):
                offs_k = k0 + tl.arange(0, KC)
                mk = offs_k < H
                for g in tl.static_range(G):
                    gk = _load_dgates(xch_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, g,
                                      XCELL, G, H)  # fmt: skip
                    wk = _load_w(whh_ptr, offs_k, offs_j, mk, mj, g, H, True)
                    rec += tl.dot(gk, wk, input_precision=PREC, out_dtype=ACC)
        if RDROP:
            rec = rec * r_keep  # it is the gradient of the masked h_t
        dh_c += rec
        dh = dh_c + dy
        v2 = valid[:, None]
        # zoneout: of dh_t, w goes straight to h_{t-1}, (1 - w) through the cell (h̃_t)
        if ZONEOUT != 0:
            kept = w_h * dh
            dh = (1.0 - w_h) * dh

        # gate backward for the own units (fields f0.. as WS_FIELDS lays them out, launch.py)
        if CELL == LSTM and LN_C:
            # h̃_t = o tanh(LN_c(c̃_t)): the gradient of c̃_t through LN_c (exchange 1)
            dc_ln, tc, g_cw, g_cb, waits_ok, failed_polls = _ln_c_backward(
                dh, f0, f1, f2, f3, f4, pv, mu_c, rstd_c, lnc_w, lnc_b, g_cw, g_cb, v2, m_own,
                H, st_ptr, slot * NX, offs_b, mb & (s < T), st_rows, waits_ok, failed_polls,
                wait_bound, sync_ptr, ((s - s_begin) * NB + 1) * nprog,
                LN_STOP == 0 or LN_STOP >= 1, LN_STOP == 0, ON_CHIP, ZONEOUT, NHP, USE_BARRIER,
                POLL, LN_SENTINEL, ASM, COUNT_POLLS,
            )  # fmt: skip
            d0, d1, d2, d3, dc_c = _lstm_step_backward_from(dc_ln, dh, tc, dc_c, w_c, f0, f1, f2,
                                                            f3, pv, v2, ZONEOUT)  # fmt: skip
            direct = tl.zeros([BLOCK_B, BH], dtype=ACC)
        elif CELL == LSTM:
            d0, d1, d2, d3, dc_c = _lstm_step_backward(dh, dc_c, w_c, f0, f1, f2, f3, f4, pv, v2,
                                                       ZONEOUT)  # fmt: skip
            direct = tl.zeros([BLOCK_B, BH], dtype=ACC)
        elif CELL == GRU:
            rg = f0
            zg = f1
            ng = f2
            d2 = dh * (1.0 - zg) * (1.0 - ng * ng)
            d1 = dh * (pv - ng) * zg * (1.0 - zg)
            d0 = d2 * f3 * rg * (1.0 - rg)
            dhn = d2 * rg
            direct = dh * zg
        elif CELL == RNN_TANH:
            d0 = dh * (1.0 - f0 * f0)
            direct = tl.zeros([BLOCK_B, BH], dtype=ACC)
        else:
            d0 = tl.where(f0 > 0.0, dh, 0.0)
            direct = tl.zeros([BLOCK_B, BH], dtype=ACC)
        if ZONEOUT != 0:
            direct += kept
        dh_c = tl.where(v2, direct, dh_c)

        # dxg[t] (zeros past a sequence's end); the final step s == T writes nothing
        toff = t.to(tl.int64) * B64
        ms = m_own & (s < T)
        gp = dxg_ptr + toff * GH + xrow[:, None] + offs_j[None, :]
        relaxed: tl.constexpr = ASM and POLL and not LN  # (with LayerNorm drec is exchanged)
        q0 = tl.where(v2, d0, 0.0).to(xd)
        _store_exchange(gp, q0, ms, relaxed)
        if G > 1:
            q1 = tl.where(v2, d1, 0.0).to(xd)
            q2 = tl.where(v2, d2, 0.0).to(xd)
            _store_exchange(gp + H, q1, ms, relaxed)
            _store_exchange(gp + 2 * H, q2, ms, relaxed)
        if G > 3:
            q3 = tl.where(v2, d3, 0.0).to(xd)
            _store_exchange(gp + 3 * H, q3, ms, relaxed)
        if CELL == GRU:
            qn = tl.where(v2, dhn, 0.0).to(xd)
            _store_exchange(dhn_ptr + toff * H + own, qn, ms, relaxed)
        if LN:
            # LN_hh backward (exchange NX): the gradient before the normalization, which is
            # what W_hh multiplies, into drec (the exchange the next step reads)
            if CELL == GRU:
                dn2 = dhn  # (the normalized n block's gradient: b_hn joins after LN_hh)
            elif G > 1:
                dn2 = d2
            else:
                dn2 = d0
            if G < 4:
                d3 = d0
            if G < 2:
                d1 = d0
            q0, q1, q2, q3, waits_ok, failed_polls = _ln_hh_backward(
                d0, d1, dn2, d3, lw0, lw1, lw2, lw3, n0, n1, n2, n3, rstd_hh, v2, m_own, G, H,
                st_ptr, slot * NX + LN_C, offs_b, mb & (s < T), st_rows, waits_ok, failed_polls,
                wait_bound, sync_ptr, ((s - s_begin) * NB + NX) * nprog,
                LN_STOP == 0 or LN_STOP >= NX, LN_STOP == 0, ON_CHIP, NHP, USE_BARRIER, POLL,
                LN_SENTINEL, ASM, COUNT_POLLS,
            )  # fmt: skip
            q0 = q0.to(xd)
            rp = drec_ptr + toff * GH + xrow[:, None] + offs_j[None, :]
            _store_exchange(rp, q0, ms, ASM and POLL)
            if G > 1:
                q1 = q1.to(xd)
                qn = q2.to(xd)
                q2 = qn
                _store_exchange(rp + H, q1, ms, ASM and POLL)
                _store_exchange(rp + 2 * H, qn, ms, ASM and POLL)
            if G > 3:
                q3 = q3.to(xd)
                _store_exchange(rp + 3 * H, q3, ms, ASM and POLL)
        if ON_CHIP:
            e0 = tl.where(m_own, q0, 0.0)
            if G > 1:
                e1 = tl.where(m_own, q1, 0.0)
                if CELL == GRU:
                    e2 = tl.where(m_own, qn, 0.0)
                else:
                    e2 = tl.where(m_own, q2, 0.0)
            if G > 3:
                e3 = tl.where(m_own, q3, 0.0)
        if USE_BARRIER:
            if s + 1 < s_end:
                _barrier_arrive(sync_ptr)
        elif not ON_CHIP and not POLL:
            tl.debug_barrier()  # see the forward: one program's warps exchange through memory

        dy, f0, f1, f2, f3, f4, pv = _bwd_own_loads(
            s + 1, T, B64, L, mb, mj, offs_j, hrow, wrow, y_ptr, h0_ptr, c0_ptr, ws_ptr, dy_ptr,
            CELL, NF, WSR, H, REVERSE, ACC,
        )  # fmt: skip
        if LN:
            n0, n1, n2, n3, rstd_hh, mu_c, rstd_c = _ln_own_loads(
                s + 1, T, B64, L, mb, mj, offs_j, wrow, ws_ptr, G, NW, WSR, H, LN_C, REVERSE,
                ACC)  # fmt: skip
        t_next = _time(T - 2 - s, T, REVERSE)
        w_h, w_c = _zoneout_weights(zh_ptr, zc_ptr, zone_p, t_next,
                                    mb & (t_next < L) & (s + 1 < T), B64, offs_b, offs_j, mj,
                                    ZONEOUT, CELL, H, ACC)  # fmt: skip
        if USE_BARRIER:
            if s + 1 < s_end:
                _barrier_wait(sync_ptr, (s - s_begin + 1) * NB * nprog, wait_bound, ASM)

    if LN_STOP == 0:  # (a stopping launch keeps nothing but its sums)
        tl.store(dhs_ptr + own, dh_c, mask=m_own)
        if CELL == LSTM:
            tl.store(dcs_ptr + own, dc_c, mask=m_own)
        if LN_C:
            tl.store(lng_ptr + own, g_cw, mask=m_own)
            tl.store(lng_ptr + B64 * H + own, g_cb, mask=m_own)
    if COUNT_POLLS:
        _count_failed_polls(sync_ptr, failed_polls)
