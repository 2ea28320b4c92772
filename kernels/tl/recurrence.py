"""Persistent recurrence kernels: one family for LSTM, GRU, RNN-tanh and RNN-relu.

Forward and backward of the primitive (see gpurnn.recurrence / gpurnn.backends.base):
    y, h_T, c_T = recurrence(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn)
`xg` (T, B, G*H) already holds x @ W_ih^T plus every bias except GRU's b_hn.

Layout of the work (both kernels):
- Grid (n_h, n_b). Program (p, q) owns hidden units [p*BH, p*BH+BH) for batch rows
  [q*BLOCK_B, q*BLOCK_B+BLOCK_B): all G gate rows of W_hh for those units (forward, as one
  (H, GP*BH) tile with the gates side by side along N), or the matching G*H x BH column
  block (backward), loaded once before the time loop when they fit in registers (RESIDENT,
  kept as a tuple of KC-row chunks), otherwise streamed from L2 in KC chunks every step.
  `make_plan` chooses; its docstring and WEIGHT_REGS say where the switches are and why.
- h_{t-1} is exchanged through the output buffer y itself (forward) and dgates through the
  dxg output (backward), read with `.cg` so a stale L1 line is never used; c and the
  backward carries dh/dc stay in registers (they depend on the program's own units only).
- One grid-wide barrier per step (`_grid_barrier`): an atomic counter, bounded spin, error
  flag. With one program, or one step per launch (the per-step fallback), it is compiled out,
  which is what makes the kernels run under TRITON_INTERPRET=1.
- Kernels take a step range [s_begin, s_end): the persistent launch covers all steps; the
  per-step fallback launches one step at a time, carrying state between launches in the
  fp32 state buffers (`hs`, `cs`, `dhs`, `dcs`), which are also the final-state outputs.

Backward runs T+1 steps in reverse processing order: dh_t = dy_t + dgates_{t+1} @ W_hh
(the own units' columns), the gate backward for the own units from the workspace, dgates
written to dxg[t] (GRU: dn_pre*r to dhn[t] as well, the n block of d(W_hh h)). The extra
step only folds the first step's dgates into dh0. dW_hh / db_hn are GEMMs in the backend.

Workspace (what backward reads; `unpack_workspace` names the fields): (T, B, NW*H) in the
input dtype, field k of unit j at column k*H + j:
    lstm  NW=5: i, f, g, o (activations), c (cell state after the step)
    gru   NW=4: r, z, n (activations), hn = W_hn h + b_hn
    rnn   NW=1: h (the activation, before rounding to the output dtype)
Entries of (t, b) past a sequence's end are 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpurnn.cells import GATES

# compile-time cell switch
LSTM: tl.constexpr = tl.constexpr(0)
GRU: tl.constexpr = tl.constexpr(1)
RNN_TANH: tl.constexpr = tl.constexpr(2)
RNN_RELU: tl.constexpr = tl.constexpr(3)
CELL_CODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
WS_FIELDS = {
    "lstm": ("i", "f", "g", "o", "c"),
    "gru": ("r", "z", "n", "hn"),
    "rnn_tanh": ("h",),
    "rnn_relu": ("h",),
}

# Added to the barrier counter by a program whose wait timed out: every later wait in every
# program then passes at once (the kernel runs to its end with garbage) and the launcher,
# seeing counter >= this, raises. Targets stay below it (checked in `_launch_steps`).
_SYNC_ERROR = 1 << 30
SYNC_ERROR: tl.constexpr = tl.constexpr(_SYNC_ERROR)


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and converts them with
    int(array), which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted"):
    every `range(runtime_arg, ...)` in a kernel then fails. Convert through .item() instead.
    Interpreter only; nothing changes when kernels are compiled."""
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_gpurnn_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gpurnn_patched = True
    _interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_index()


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # libdevice tanh fails in the interpreter; this form works on both, saturates cleanly.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _grid_barrier(sync_ptr, target, spin_max):
    # Every thread's stores of this step are issued before thread 0 arrives (block barrier),
    # and the gpu-scope release/acquire pair publishes them to the other programs.
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    cnt = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (cnt < target) & (spins < spin_max):
        cnt = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if cnt < target:
        # timed out: a program is not co-resident (or died). Poison the counter so that
        # no program waits again; the launcher sees it and raises.
        tl.atomic_add(sync_ptr, SYNC_ERROR, sem="relaxed", scope="gpu")
    tl.debug_barrier()


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
def _split_gates(a, BLOCK_B: tl.constexpr, BH: tl.constexpr, GP: tl.constexpr):
    """(BLOCK_B, GP*BH) gate-major tile -> GP (BLOCK_B, BH) tiles (unused ones alias)."""
    if GP == 1:
        return a, a, a, a
    else:
        a = tl.permute(tl.reshape(a, (BLOCK_B, GP, BH)), (0, 2, 1))  # (BLOCK_B, BH, GP)
        if GP == 2:
            g0, g1 = tl.split(a)
            return g0, g1, g0, g0
        else:
            # gate g = 2*hi + lo; split takes the last (lo) axis first
            lo0, lo1 = tl.split(tl.reshape(a, (BLOCK_B, BH, 2, 2)))
            g0, g2 = tl.split(lo0)
            g1, g3 = tl.split(lo1)
            return g0, g1, g2, g3


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
def _load_hprev(y_ptr, h0_ptr, step_off, hrow, offs_k, mk, pvalid, mb, HAS_H0: tl.constexpr):
    """h_{t-1} columns offs_k for every batch row of the tile, in the storage dtype:
    y[t_prev] where the previous step was valid for that row, else h0 (or 0)."""
    h = tl.load(
        y_ptr + step_off + hrow[:, None] + offs_k[None, :],
        mask=pvalid[:, None] & mk[None, :],
        other=0.0,
        cache_modifier=".cg",  # written by other programs during this launch: skip L1
    )
    if HAS_H0:
        h += tl.load(
            h0_ptr + hrow[:, None] + offs_k[None, :],
            mask=(mb & ~pvalid)[:, None] & mk[None, :],
            other=0.0,
        )
    return h


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
def _time(s, T, REVERSE: tl.constexpr):
    if REVERSE:
        return T - 1 - s
    else:
        return s


# ----------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["T", "B", "s_begin", "s_end", "spin_max"])
def _recurrence_fwd_kernel(
    xg_ptr, whh_ptr, h0_ptr, c0_ptr, len_ptr, bhn_ptr,
    y_ptr, hs_ptr, cs_ptr, ws_ptr, sync_ptr,
    T, B, s_begin, s_end, spin_max,
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, BH: tl.constexpr, BLOCK_B: tl.constexpr,
    RESIDENT: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_BHN: tl.constexpr, REVERSE: tl.constexpr,
    SAVE: tl.constexpr, USE_BARRIER: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    offs_j = pid_h * BH + tl.arange(0, BH)
    mj = offs_j < H
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = offs_b < B
    m_own = mb[:, None] & mj[None, :]
    if HAS_LEN:
        L = tl.load(len_ptr + offs_b, mask=mb, other=0).to(tl.int32)
    else:
        L = tl.zeros([BLOCK_B], dtype=tl.int32) + T
    B64 = B.to(tl.int64)
    hrow = offs_b.to(tl.int64) * H
    xrow = offs_b.to(tl.int64) * (G * H)
    wrow = offs_b.to(tl.int64) * (NW * H)

    # running state of the own units: from h0/c0 at the first step, else from the state
    # buffers the previous launch left (per-step fallback)
    first = s_begin == 0
    hs = tl.load(hs_ptr + hrow[:, None] + offs_j[None, :], mask=m_own & (s_begin > 0), other=0.0)
    hs = hs.to(ACC)
    if HAS_H0:
        hs += tl.load(h0_ptr + hrow[:, None] + offs_j[None, :], mask=m_own & first, other=0.0).to(
            ACC
        )
    cs = hs
    if CELL == LSTM:
        own = hrow[:, None] + offs_j[None, :]
        cs = tl.load(cs_ptr + own, mask=m_own & (s_begin > 0), other=0.0).to(ACC)
        if HAS_C0:
            cs += tl.load(
                c0_ptr + hrow[:, None] + offs_j[None, :], mask=m_own & first, other=0.0
            ).to(ACC)
    if CELL == GRU:
        if HAS_BHN:
            bhn = tl.load(bhn_ptr + offs_j, mask=mj, other=0.0).to(ACC)
        else:
            bhn = tl.zeros([BH], dtype=ACC)

    # Gates fused along N: column n of the (K, GP*BH) weight tile is unit n % BH of gate
    # n // BH (GP = G padded to a power of two). With mma, a (K, N) operand costs every
    # thread K/4 elements whatever N is (N < 8*num_warps replicates it across warps), so
    # one fused tile holds all G gates for the price of one.
    NG: tl.constexpr = GP * BH
    offs_n = tl.arange(0, NG)
    gate_n = offs_n // BH
    unit_n = pid_h * BH + offs_n % BH
    mn = (gate_n < G) & (unit_n < H)
    col_n = gate_n * H + unit_n  # column of xg, row of W_hh
    # K in chunks of KC: one dot over all of K would make every warp hold the whole h tile
    # (the dot's A operand) in registers at once; per chunk it holds BLOCK_B*KC/32.
    if RESIDENT:
        w_res = ()
        for i in tl.static_range(NKC):
            offs_k = i * KC + tl.arange(0, KC)
            w_res = w_res + (
                tl.load(
                    whh_ptr + col_n[None, :] * H + offs_k[:, None],
                    mask=(offs_k < H)[:, None] & mn[None, :], other=0.0,
                ),
            )  # fmt: skip

    t = _time(s_begin, T, REVERSE)
    xv = mb & (t < L) & (s_begin < s_end)
    x = tl.load(
        xg_ptr + t.to(tl.int64) * B64 * (G * H) + xrow[:, None] + col_n[None, :],
        mask=xv[:, None] & mn[None, :], other=0.0,
    ).to(ACC)  # fmt: skip

    for s in range(s_begin, s_end):
        t = _time(s, T, REVERSE)
        valid = mb & (t < L)
        if REVERSE:
            tp = t + 1
        else:
            tp = t - 1
        pvalid = mb & (s > 0) & (tp < L)
        poff = tp.to(tl.int64) * B64 * H

        # recurrent matvec: (BLOCK_B, H) h_{t-1} times the (H, GP*BH) fused gate tile
        acc = tl.zeros([BLOCK_B, NG], dtype=ACC)
        if RESIDENT:
            for i in tl.static_range(NKC):
                offs_k = i * KC + tl.arange(0, KC)
                mk = offs_k < H
                hp = _load_hprev(y_ptr, h0_ptr, poff, hrow, offs_k, mk, pvalid, mb, HAS_H0)
                acc += tl.dot(hp, w_res[i], input_precision=PREC, out_dtype=ACC)
        else:
            for k0 in range(0, H, KC):
                offs_k = k0 + tl.arange(0, KC)
                mk = offs_k < H
                hp = _load_hprev(y_ptr, h0_ptr, poff, hrow, offs_k, mk, pvalid, mb, HAS_H0)
                wk = tl.load(
                    whh_ptr + col_n[None, :] * H + offs_k[:, None],
                    mask=mk[:, None] & mn[None, :], other=0.0,
                )  # fmt: skip
                acc += tl.dot(hp, wk, input_precision=PREC, out_dtype=ACC)
        a0, a1, a2, a3 = _split_gates(acc, BLOCK_B, BH, GP)
        x0, x1, x2, x3 = _split_gates(x, BLOCK_B, BH, GP)

        # gates (fp32, fp64 for fp64 inputs)
        if CELL == LSTM:
            ig = _sigmoid(x0 + a0)
            fg = _sigmoid(x1 + a1)
            gg = _tanh(x2 + a2)
            og = _sigmoid(x3 + a3)
            c_new = fg * cs + ig * gg
            h_new = og * _tanh(c_new)
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

        # y doubles as the exchange buffer; past a sequence's end it is 0 and state is kept
        toff = t.to(tl.int64) * B64
        yv = tl.where(valid[:, None], h_new, 0.0).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + toff * H + hrow[:, None] + offs_j[None, :], yv, mask=m_own)
        # own state as the others see it (rounded to the storage dtype)
        hs = tl.where(valid[:, None], yv.to(ACC), hs)
        if CELL == LSTM:
            cs = tl.where(valid[:, None], c_new, cs)

        if SAVE:
            wp = ws_ptr + toff * (NW * H) + wrow[:, None] + offs_j[None, :]
            wd = ws_ptr.dtype.element_ty
            v2 = valid[:, None]
            if CELL == LSTM:
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
                tl.store(wp, tl.where(v2, h_new, 0.0).to(wd), mask=m_own)

        # next step's xg does not depend on the barrier: issue its loads before waiting
        tn = _time(s + 1, T, REVERSE)
        xv = mb & (tn < L) & (s + 1 < s_end)
        x = tl.load(
            xg_ptr + tn.to(tl.int64) * B64 * (G * H) + xrow[:, None] + col_n[None, :],
            mask=xv[:, None] & mn[None, :], other=0.0,
        ).to(ACC)  # fmt: skip
        if USE_BARRIER:
            if s + 1 < s_end:
                _grid_barrier(sync_ptr, (s - s_begin + 1) * nprog, spin_max)

    tl.store(hs_ptr + hrow[:, None] + offs_j[None, :], hs, mask=m_own)
    if CELL == LSTM:
        tl.store(cs_ptr + hrow[:, None] + offs_j[None, :], cs, mask=m_own)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_own_loads(
    s, T, B64, L, mb, mj, offs_j, hrow, wrow, y_ptr, h0_ptr, c0_ptr, ws_ptr, dy_ptr,
    CELL: tl.constexpr, NW: tl.constexpr, H: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_C0: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Everything of backward step s that only this program's units need (and that no other
    program writes during the launch): dy, the saved fields, and c_{t-1} / h_{t-1}."""
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
    dy = tl.load(dy_ptr + toff * H + hrow[:, None] + offs_j[None, :], mask=mv, other=0.0).to(ACC)
    f0, f1, f2, f3, f4 = _load_fields(ws_ptr, toff * (NW * H) + wrow, offs_j, mv, H, NW, ACC)
    mp = pvalid[:, None] & mj[None, :]
    mf = first[:, None] & mj[None, :]
    if CELL == LSTM:
        pv = tl.load(
            ws_ptr + poff * (NW * H) + wrow[:, None] + 4 * H + offs_j[None, :], mask=mp, other=0.0
        ).to(ACC)
        if HAS_C0:
            pv += tl.load(c0_ptr + hrow[:, None] + offs_j[None, :], mask=mf, other=0.0).to(ACC)
    elif CELL == GRU:
        pv = tl.load(y_ptr + poff * H + hrow[:, None] + offs_j[None, :], mask=mp, other=0.0)
        pv = pv.to(ACC)
        if HAS_H0:
            pv += tl.load(h0_ptr + hrow[:, None] + offs_j[None, :], mask=mf, other=0.0).to(ACC)
    else:
        pv = dy
    return dy, f0, f1, f2, f3, f4, pv


@triton.jit(do_not_specialize=["T", "B", "s_begin", "s_end", "spin_max"])
def _recurrence_bwd_kernel(
    whh_ptr, h0_ptr, c0_ptr, len_ptr, y_ptr, ws_ptr, dy_ptr, dhT_ptr, dcT_ptr,
    dxg_ptr, dhn_ptr, dhs_ptr, dcs_ptr, sync_ptr,
    T, B, s_begin, s_end, spin_max,
    CELL: tl.constexpr, G: tl.constexpr, NW: tl.constexpr, H: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, BH: tl.constexpr, BLOCK_B: tl.constexpr,
    RESIDENT: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr,
    HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, USE_BARRIER: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Steps s in [0, T]: step s < T handles forward step T-1-s; step T only adds the last
    dgates' recurrent contribution (to dh0). dgates (= dxg, except GRU's n block, kept apart in
    dhn as dn_pre * r) are exchanged through their output buffers."""
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    offs_j = pid_h * BH + tl.arange(0, BH)
    mj = offs_j < H
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = offs_b < B
    m_own = mb[:, None] & mj[None, :]
    if HAS_LEN:
        L = tl.load(len_ptr + offs_b, mask=mb, other=0).to(tl.int32)
    else:
        L = tl.zeros([BLOCK_B], dtype=tl.int32) + T
    B64 = B.to(tl.int64)
    hrow = offs_b.to(tl.int64) * H
    xrow = offs_b.to(tl.int64) * (G * H)
    wrow = offs_b.to(tl.int64) * (NW * H)
    GH: tl.constexpr = G * H

    # carries: dh_T / dc_T at the first step, else what the previous launch left
    first = s_begin == 0
    own = hrow[:, None] + offs_j[None, :]
    dh_c = tl.load(dhs_ptr + own, mask=m_own & (s_begin > 0), other=0.0).to(ACC)
    dh_c += tl.load(dhT_ptr + own, mask=m_own & first, other=0.0).to(ACC)
    dc_c = dh_c
    if CELL == LSTM:
        dc_c = tl.load(dcs_ptr + own, mask=m_own & (s_begin > 0), other=0.0).to(ACC)
        dc_c += tl.load(dcT_ptr + own, mask=m_own & first, other=0.0).to(ACC)

    # W_hh[:, own units] as G*NKC (KC, BH) tiles, gate-major (see the forward's KC note)
    if RESIDENT:
        w_res = ()
        for g in tl.static_range(G):
            for i in tl.static_range(NKC):
                offs_k = i * KC + tl.arange(0, KC)
                w_res = w_res + (_load_w(whh_ptr, offs_k, offs_j, offs_k < H, mj, g, H, True),)

    dy, f0, f1, f2, f3, f4, pv = _bwd_own_loads(
        s_begin, T, B64, L, mb, mj, offs_j, hrow, wrow, y_ptr, h0_ptr, c0_ptr, ws_ptr, dy_ptr,
        CELL, NW, H, HAS_H0, HAS_C0, REVERSE, ACC,
    )  # fmt: skip

    for s in range(s_begin, s_end):
        t = _time(T - 1 - s, T, REVERSE)
        valid = mb & (t < L) & (s < T)
        # the forward step after this one (processed by the previous backward step)
        if REVERSE:
            tn = t - 1
        else:
            tn = t + 1
        nvalid = mb & (s > 0) & (tn < L)

        # dh_{t} += dgates_{next} @ W_hh[:, own units] (rows past a sequence's end hold 0)
        rec = tl.zeros([BLOCK_B, BH], dtype=ACC)
        if RESIDENT:
            for g in tl.static_range(G):
                for i in tl.static_range(NKC):
                    offs_k = i * KC + tl.arange(0, KC)
                    gk = _load_dgates(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, g,
                                      CELL, G, H)  # fmt: skip
                    rec += tl.dot(gk, w_res[g * NKC + i], input_precision=PREC, out_dtype=ACC)
        else:
            for k0 in range(0, H, KC):
                offs_k = k0 + tl.arange(0, KC)
                mk = offs_k < H
                for g in tl.static_range(G):
                    gk = _load_dgates(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, g,
                                      CELL, G, H)  # fmt: skip
                    wk = _load_w(whh_ptr, offs_k, offs_j, mk, mj, g, H, True)
                    rec += tl.dot(gk, wk, input_precision=PREC, out_dtype=ACC)
        dh_c += rec
        dh = dh_c + dy
        v2 = valid[:, None]

        # gate backward for the own units (fields f0.. as laid out in the module docstring)
        if CELL == LSTM:
            ig = f0
            fg = f1
            gg = f2
            og = f3
            tc = _tanh(f4)
            dc = dc_c + dh * og * (1.0 - tc * tc)
            d0 = dc * gg * ig * (1.0 - ig)
            d1 = dc * pv * fg * (1.0 - fg)
            d2 = dc * ig * (1.0 - gg * gg)
            d3 = dh * tc * og * (1.0 - og)
            dc_c = tl.where(v2, dc * fg, dc_c)
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
        dh_c = tl.where(v2, direct, dh_c)

        # dxg[t] (zeros past a sequence's end); the final step s == T writes nothing
        toff = t.to(tl.int64) * B64
        ms = m_own & (s < T)
        xd = dxg_ptr.dtype.element_ty
        gp = dxg_ptr + toff * GH + xrow[:, None] + offs_j[None, :]
        tl.store(gp, tl.where(v2, d0, 0.0).to(xd), mask=ms)
        if G > 1:
            tl.store(gp + H, tl.where(v2, d1, 0.0).to(xd), mask=ms)
            tl.store(gp + 2 * H, tl.where(v2, d2, 0.0).to(xd), mask=ms)
        if G > 3:
            tl.store(gp + 3 * H, tl.where(v2, d3, 0.0).to(xd), mask=ms)
        if CELL == GRU:
            tl.store(dhn_ptr + toff * H + own, tl.where(v2, dhn, 0.0).to(xd), mask=ms)

        dy, f0, f1, f2, f3, f4, pv = _bwd_own_loads(
            s + 1, T, B64, L, mb, mj, offs_j, hrow, wrow, y_ptr, h0_ptr, c0_ptr, ws_ptr, dy_ptr,
            CELL, NW, H, HAS_H0, HAS_C0, REVERSE, ACC,
        )  # fmt: skip
        if USE_BARRIER:
            if s + 1 < s_end:
                _grid_barrier(sync_ptr, (s - s_begin + 1) * nprog, spin_max)

    tl.store(dhs_ptr + own, dh_c, mask=m_own)
    if CELL == LSTM:
        tl.store(dcs_ptr + own, dc_c, mask=m_own)


# ----------------------------------------------------------------------------- launchers


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tests set this: every output is allocated NaN-filled, so an element a kernel forgets to
# write fails the comparison. GPURNN_DEBUG_POISON=1 does the same.
POISON = os.environ.get("GPURNN_DEBUG_POISON") == "1"

# Bounded barrier spin (iterations of one L2 atomic, ~0.5-1 us each): ~4 s at the default.
SPIN_MAX = int(os.environ.get("GPURNN_TRITON_SPIN_MAX", str(1 << 22)))

# Weights stay on chip when each thread's share of them fits WEIGHT_REGS 32-bit registers.
# With mma.sync a (K, N) dot operand costs every thread K/4 elements whatever N is, so the
# share is K/4 elements: forward K = H (one fused gate tile), backward K = G*H (W_hh's column
# block for the own units). Set from the sm_90 compile (tests/test_sm90_compile.py), which
# must show no spills for every variant make_plan can pick: 16-bit, 4 warps, BH=8: forward
# resident up to H = 1024 (fp32: 512), backward up to G*H = 1024 (LSTM H <= 256, GRU 320,
# RNN 1024; fp32 half that). num_stages=1: nothing in the time loop may be software-
# pipelined across the grid barrier, and deeper K pipelining spilled fp32 streaming.
# Above it the weights are streamed from L2 (W_hh of H=4096 bf16 is 32 MB per gate block,
# still L2-sized for a few gates) in KC chunks every step inside the same persistent kernel.
WEIGHT_REGS = 128
KC_GPU = 64  # K chunk of the dots (resident and streamed)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class Plan:
    """How one recurrence is laid out on the device (see module docstring)."""

    BH: int  # hidden units per program
    BLOCK_B: int  # batch rows per program
    n_h: int
    n_b: int
    resident: bool  # weights loaded once (True) or streamed per step in KC chunks
    persistent: bool  # one launch with a grid barrier per step (else one launch per step)
    KC: int = KC_GPU  # K chunk of the recurrent dots
    num_warps: int = 4

    @property
    def nprog(self) -> int:
        return self.n_h * self.n_b


def weight_regs(H: int, G: int, BH: int, dtype: torch.dtype, backward: bool, KC: int = KC_GPU,
                num_warps: int = 4) -> int:  # fmt: skip
    """32-bit registers per thread the resident weights take (see WEIGHT_REGS): K/4 elements
    while the dot's N fits one n8 mma tile per warp, proportionally more beyond."""
    es = torch.tensor([], dtype=dtype).element_size()
    k = triton.cdiv(H, KC) * KC * (G if backward else 1)
    n = BH if backward else _next_pow2(G) * BH
    return k // 4 * es // 4 * max(1, n // (8 * num_warps))


def make_plan(
    H: int,
    B: int,
    G: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    backward: bool = False,
    BH: int | None = None,
    BLOCK_B: int | None = None,
    KC: int | None = None,
    resident: bool | None = None,
    persistent: bool | None = None,
) -> Plan:
    """Pick tiling and mode. Keyword overrides exist for tests (e.g. many programs with
    per-step launches under the interpreter, or forced weight streaming).

    GPU: BLOCK_B = 16 batch rows per program (one m16 mma tile; a new B never recompiles;
    larger B become more batch tiles, i.e. more programs: BLOCK_B 32/64 spill on sm_90).
    BH = 8 or 16 units per program, the smallest keeping the grid within one program per SM
    (BH = 32 spilled in the streamed backward on sm_90). The persistent launch is used
    only when every program is co-resident: grid <=
    SM count with one program per SM (a program always fits an SM alone; the compile test
    checks registers and shared memory). Otherwise (B*H too large, e.g. B=256, H=1024) one
    launch per step, where launch boundaries are the barrier and nothing can deadlock."""
    if device.type != "cuda":
        # interpreter: one program covering everything unless a test asks otherwise
        bb = BLOCK_B or max(2, _next_pow2(B))
        bh = BH or max(2, _next_pow2(H))
        kc = KC or max(16, min(64, _next_pow2(H)))
        n_h, n_b = triton.cdiv(H, bh), triton.cdiv(B, bb)
        res = True if resident is None else resident
        pers = (n_h * n_b == 1) if persistent is None else persistent
        if pers and n_h * n_b > 1:
            raise ValueError("the interpreter runs programs one after another: a grid barrier "
                             "across several programs would never complete")  # fmt: skip
        return Plan(bh, bb, n_h, n_b, res, pers, kc, 4)
    bb = BLOCK_B or 16
    n_b = triton.cdiv(B, bb)
    kc = KC or KC_GPU  # resident; see stream_kc for streamed weights
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bh = BH
    if bh is None:
        bh = 8
        while triton.cdiv(H, bh) * n_b > sms and bh < 16:
            bh *= 2
    n_h = triton.cdiv(H, bh)
    fits = n_h * n_b <= sms
    if not fits and BH is None:
        bh, n_h = 8, triton.cdiv(H, 8)  # per-step launches: any grid size works
    pers = fits if persistent is None else (persistent and fits)
    if resident is None:
        resident = weight_regs(H, G, bh, dtype, backward, kc) <= WEIGHT_REGS
    if not resident and KC is None:
        kc = stream_kc(G, bh, backward, dtype)
    return Plan(bh, bb, n_h, n_b, resident, pers, kc, 4)


def stream_kc(G: int, BH: int, backward: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    """K chunk when weights are streamed: each thread holds a (KC, N) weight chunk and its
    pointers, KC*N/128 of each; wider N needs shorter chunks to stay spill-free on sm_90
    (values found with tests/test_sm90_compile.py; ptxas is not monotonic in KC here)."""
    if backward:
        es = torch.tensor([], dtype=dtype).element_size()
        return 64 if (BH <= 8 or es <= 2) else 16
    return max(16, min(64, 2048 // (_next_pow2(G) * BH)))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype: torch.dtype, precision: str) -> str:
    # input_precision only means something for fp32 inputs (tf32 by default, "ieee" exact)
    return precision if dtype == torch.float32 else "ieee"


def _alloc(shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def workspace_shape(cell: str, T: int, B: int, H: int) -> tuple[int, int, int]:
    return (T, B, len(WS_FIELDS[cell]) * H)


def unpack_workspace(cell: str, workspace: torch.Tensor, H: int) -> dict[str, torch.Tensor]:
    """Every step's gate activations and cell states from a saved workspace (T, B, NW*H),
    as (T, B, H) views, named as in WS_FIELDS: lstm i, f, g, o, c (c after the step);
    gru r, z, n, hn (= W_hn h + b_hn); rnn h. Entries past a sequence's end are 0."""
    names = WS_FIELDS[cell]
    T, B, _ = workspace.shape
    w = workspace.view(T, B, len(names), H)
    return {n: w[:, :, k] for k, n in enumerate(names)}


def _launch_steps(kernel, grid, plan: Plan, T: int, B: int, n_steps: int, args, kw, spin_max: int,
                  device):  # fmt: skip
    """Run steps [0, n_steps): one persistent launch with a grid barrier per step, or one
    launch per step. Raises if the barrier timed out."""
    if plan.persistent:
        if n_steps * plan.nprog >= _SYNC_ERROR:
            raise ValueError("sequence too long for one persistent launch")
        use_barrier = plan.nprog > 1
        sync = torch.zeros(2, dtype=torch.int32, device=device)
        kernel[grid](*args, sync, T, B, 0, n_steps, spin_max,
                     USE_BARRIER=use_barrier, num_warps=plan.num_warps, num_stages=1,
                     **kw)  # fmt: skip
        if use_barrier and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if int(sync[0].item()) >= _SYNC_ERROR:
                raise RuntimeError(
                    f"gpurnn triton: grid barrier timed out ({plan.nprog} programs did not all "
                    "run concurrently: is another kernel holding SMs, or MPS/green contexts "
                    "limiting them?). Results are invalid. Set make_plan(persistent=False) "
                    "or raise GPURNN_TRITON_SPIN_MAX."
                )
    else:
        sync = torch.zeros(2, dtype=torch.int32, device=device)
        for s in range(n_steps):
            kernel[grid](*args, sync, T, B, s, s + 1, spin_max,
                         USE_BARRIER=False, num_warps=plan.num_warps, num_stages=1,
                         **kw)  # fmt: skip


def forward(
    cell: str,
    xg: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
    b_hn: torch.Tensor | None,
    save: bool,
    *,
    plan: Plan | None = None,
    precision: str = "tf32",
    spin_max: int | None = None,
):
    """Returns y (T, B, H), h_T (B, H), c_T (B, H) or None, workspace ((0,) unless save),
    all in xg.dtype. Inputs must be contiguous (the backend makes them so)."""
    T, B, GH = xg.shape
    H = w_hh.shape[1]
    G = GATES[cell]
    assert GH == G * H and w_hh.shape[0] == G * H, (xg.shape, w_hh.shape)
    dev, dt = xg.device, xg.dtype
    plan = plan or make_plan(H, B, G, dt, dev)
    NW = len(WS_FIELDS[cell])
    acc_t = torch.float64 if dt == torch.float64 else torch.float32
    y = _alloc((T, B, H), dt, dev)
    hs = _alloc((B, H), acc_t, dev)  # running state, also the final state (cast below)
    cs = _alloc((B, H), acc_t, dev) if cell == "lstm" else hs
    ws = _alloc(workspace_shape(cell, T, B, H), dt, dev) if save else y.new_empty((0,))
    if T == 0:
        hT = h0.to(acc_t) if h0 is not None else torch.zeros_like(hs)
        cT = c0.to(acc_t) if c0 is not None else torch.zeros_like(hs)
        return y, hT.to(dt), (cT.to(dt) if cell == "lstm" else None), ws
    dummy = xg
    args = (
        xg, w_hh,
        h0 if h0 is not None else dummy, c0 if c0 is not None else dummy,
        lengths if lengths is not None else dummy, b_hn if b_hn is not None else dummy,
        y, hs, cs, ws if save else dummy,
    )  # fmt: skip
    kw = dict(
        CELL=CELL_CODE[cell], G=G, GP=_next_pow2(G), NW=NW, H=H, KC=plan.KC,
        NKC=triton.cdiv(H, plan.KC), BH=plan.BH,
        BLOCK_B=plan.BLOCK_B, RESIDENT=plan.resident,
        HAS_H0=h0 is not None, HAS_C0=c0 is not None, HAS_LEN=lengths is not None,
        HAS_BHN=b_hn is not None, REVERSE=bool(reverse), SAVE=bool(save),
        PREC=_prec(dt, precision), ACC=_acc_dtype(dt),
    )  # fmt: skip
    grid = (plan.n_h, plan.n_b)
    _launch_steps(_recurrence_fwd_kernel, grid, plan, T, B, T, args, kw,
                  SPIN_MAX if spin_max is None else spin_max, dev)  # fmt: skip
    return y, hs.to(dt), (cs.to(dt) if cell == "lstm" else None), ws


def backward(
    cell: str,
    w_hh: torch.Tensor,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
    y: torch.Tensor,
    workspace: torch.Tensor,
    dy: torch.Tensor,
    dh_T: torch.Tensor,
    dc_T: torch.Tensor | None,
    *,
    plan: Plan | None = None,
    precision: str = "tf32",
    spin_max: int | None = None,
):
    """Recurrent part of backward-through-time. Returns
      dxg (T, B, G*H)  gradient of the pre-activations = of xg (0 past a sequence's end),
      dhn (T, B, H) or None  GRU only: dn_pre * r, the n block of d(W_hh h) (for dW_hh, db_hn),
      dh0 (B, H), dc0 (B, H) or None   (fp32 / fp64).
    d(W_hh h)[t] is dxg[t] with (GRU) its n block replaced by dhn[t]; weight gradients are
    GEMMs of it against h_{t-1} (done by the caller)."""
    T, B, H = y.shape
    G = GATES[cell]
    dev, dt = y.device, y.dtype
    plan = plan or make_plan(H, B, G, dt, dev, backward=True)
    NW = len(WS_FIELDS[cell])
    acc_t = torch.float64 if dt == torch.float64 else torch.float32
    dxg = _alloc((T, B, G * H), dt, dev)
    dhn = _alloc((T, B, H), dt, dev) if cell == "gru" else None
    dhs = _alloc((B, H), acc_t, dev)
    dcs = _alloc((B, H), acc_t, dev) if cell == "lstm" else dhs
    if T == 0:
        return dxg, dhn, dh_T.to(acc_t), (dc_T.to(acc_t) if cell == "lstm" else None)
    dummy = y
    args = (
        w_hh, h0 if h0 is not None else dummy, c0 if c0 is not None else dummy,
        lengths if lengths is not None else dummy, y, workspace, dy, dh_T,
        dc_T if dc_T is not None else dummy, dxg, dhn if dhn is not None else dummy, dhs, dcs,
    )  # fmt: skip
    kw = dict(
        CELL=CELL_CODE[cell], G=G, NW=NW, H=H, KC=plan.KC, NKC=triton.cdiv(H, plan.KC), BH=plan.BH,
        BLOCK_B=plan.BLOCK_B, RESIDENT=plan.resident,
        HAS_H0=h0 is not None, HAS_C0=c0 is not None, HAS_LEN=lengths is not None,
        REVERSE=bool(reverse), PREC=_prec(dt, precision), ACC=_acc_dtype(dt),
    )  # fmt: skip
    grid = (plan.n_h, plan.n_b)
    # T + 1 steps: the last one only folds the first step's dgates into dh0
    _launch_steps(_recurrence_bwd_kernel, grid, plan, T, B, T + 1, args, kw,
                  SPIN_MAX if spin_max is None else spin_max, dev)  # fmt: skip
    return dxg, dhn, dhs, (dcs if cell == "lstm" else None)
