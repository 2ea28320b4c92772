"""Persistent recurrence kernels: one family for LSTM, GRU, RNN-tanh and RNN-relu.

Forward and backward of the primitive (see gpurnn.recurrence / gpurnn.backends.base):
    y, h_T, c_T = recurrence(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn)
`xg` (T, B, G*H) already holds x @ W_ih^T plus every bias except GRU's b_hn.

Layout of the work (both kernels), chosen by `make_plan` and checked by `_fit` against the
compiled kernel's real shared memory, registers and spills:
- Grid (n_h, n_b). Program (p, q) owns hidden units [p*BH, p*BH+BH) for batch rows
  [q*BLOCK_B, q*BLOCK_B+BLOCK_B) (16, 32 or 64 rows: one mma tile up to a wgmma tile): all G
  gate rows of W_hh for those units (forward, as one (H, GP*BH) tile with the gates side by
  side along N), or the matching G*H x BH column block (backward). RESIDENT: loaded once
  before the time loop (Triton keeps them in shared memory), as a tuple of KC-row chunks;
  else streamed from L2 in KC chunks every step.
- ON_CHIP (small layers: W_hh whole fits one program): one program per batch tile owns every
  unit, so h_{t-1} (backward: the dgates) never leaves its registers: no exchange buffer, no
  grid barrier. Batch tiles are independent.
- Otherwise h_{t-1} is exchanged through a (T+1)-row buffer whose first row (in processing
  order) is h0 and whose other rows are y, and dgates through the dxg output (backward); both
  are read with `.cg` so a stale L1 line is never used. A step issues all its exchange loads
  before the first dot (one memory round trip forward; about one per gate backward) and
  keeps one accumulator per K chunk (per gate backward), so the HMMA chains are short. c and
  the backward carries dh/dc stay in registers (they depend on the program's own units only).
- With resident weights (POLL) there is no grid barrier: what is exchanged (h forward,
  dgates backward) starts as a sentinel bit pattern, is written once, and a program reads
  its step's inputs until nothing it read is the sentinel (see POLL in the kernels).
- Elsewhere one grid-wide barrier per step, split in two (`_barrier_arrive` right after the
  exchange stores, `_barrier_wait` after the work that needs nobody else's data: workspace
  stores, the next step's own loads): an atomic counter, relaxed polls, one acquire, bounded
  spin, error flag. With one program, or one step per launch (the per-step fallback), it is
  compiled out, which is what makes the kernels run under TRITON_INTERPRET=1.
- Batch tiles never exchange anything, so when a grid would not fit the GPU at once the
  launcher runs persistent launches over a few batch tiles each (`b_chunk`): a launch's
  pointers start at its first batch row, B stays the row stride and `nrows` says how many
  rows the launch covers.
- Kernels take a step range [s_begin, s_end): the persistent launch covers all steps; the
  per-step fallback launches one step at a time, carrying state between launches in the
  fp32 state buffers (`hs`, `cs`, `dhs`, `dcs`), which the launcher fills with h0/c0
  (dh_T/dc_T) first and which end as the final-state outputs.

Backward runs T+1 steps in reverse processing order: dh_t = dy_t + dgates_{t+1} @ W_hh
(the own units' columns), the gate backward for the own units from the workspace, dgates
written to dxg[t] (GRU: dn_pre*r to dhn[t] as well, the n block of d(W_hh h)). The extra
step only folds the first step's dgates into dh0. dW_hh / db_hn are GEMMs in the backend.

LSTM with projection (proj_size P: W_hh (4H, P), W_hr (P, H), h = W_hr (o * tanh c) P
wide) runs in its own pair of kernels, `_lstmp_fwd_kernel` / `_lstmp_bwd_kernel`: two
phases per step (gates on the own BH units, m exchanged; projection on the own BP outputs,
h exchanged; backward: dh on the own BP outputs, exchanged; dm and the gate backward on the
own units), each ended by a grid barrier; the per-step fallback launches each phase apart.
The workspace is the plain LSTM's (m = o * tanh c follows from it).

Workspace (what backward reads): (T, B, NW*H) in the input dtype, field k of unit j at
column k*H + j, the fields as gpurnn.cells lists them (WS_FIELDS; `unpack_workspace` names
them): lstm NW=5 i, f, g, o, c; gru NW=4 r, z, n, hn; rnn NW=1 h (the activation, before
rounding to the output dtype). Entries of (t, b) past a sequence's end are 0.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpurnn import cells
from gpurnn.cells import GATES

# compile-time cell switch
LSTM: tl.constexpr = tl.constexpr(0)
GRU: tl.constexpr = tl.constexpr(1)
RNN_TANH: tl.constexpr = tl.constexpr(2)
RNN_RELU: tl.constexpr = tl.constexpr(3)
CELL_CODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
# the workspace fields per cell, all of them (the plain RNN's h too): gpurnn.cells' table
WS_FIELDS = {cell: cells.saved_fields(cell) for cell in cells.CELLS}

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
def _lstm_cell(x0, x1, x2, x3, a0, a1, a2, a3, c_prev):
    """One LSTM step of the own units from the pre-activations x + W_hh h (PyTorch's gate
    order i, f, g, o): the gates, c_t and o * tanh(c_t) (h_t, or m_t before a projection)."""
    ig = _sigmoid(x0 + a0)
    fg = _sigmoid(x1 + a1)
    gg = _tanh(x2 + a2)
    og = _sigmoid(x3 + a3)
    c_new = fg * c_prev + ig * gg
    return ig, fg, gg, og, c_new, og * _tanh(c_new)


@triton.jit
def _lstm_cell_backward(dh, dc_next, ig, fg, gg, og, c, c_prev):
    """The LSTM step backwards: from the saved gates and cell states and the gradients of
    o * tanh(c_t) (dh) and of c_t from the step after (dc_next), the gradients of the four
    pre-activations and dc_t (dc_{t-1} = dc_t * f)."""
    tc = _tanh(c)
    dc = dc_next + dh * og * (1.0 - tc * tc)
    d0 = dc * gg * ig * (1.0 - ig)
    d1 = dc * c_prev * fg * (1.0 - fg)
    d2 = dc * ig * (1.0 - gg * gg)
    d3 = dh * tc * og * (1.0 - og)
    return d0, d1, d2, d3, dc


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
def _barrier_arrive(sync_ptr):
    # Every thread's exchange stores of this step are issued before thread 0 arrives (block
    # barrier); the gpu-scope release publishes them, cumulatively, to the other programs.
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _barrier_wait(sync_ptr, target, spin_max):
    # Split from the arrive so that work that needs nobody else's data (workspace stores, the
    # next step's own loads) overlaps the wait. Every thread polls for itself with relaxed
    # (volatile) loads: no block barrier to broadcast a result, no L1 invalidation per spin;
    # then one gpu-scope acquire orders its next exchange loads after the others' released
    # stores. (One polling thread per program and a block barrier after it measured slower on
    # an H100: 5.9 against 4.1 us per LSTM H=768 B=16 forward step.)
    cnt = target - 1  # every poll inside the loop (targets are >= 1)
    spins = 0
    while (cnt < target) & (spins <= spin_max):
        cnt = tl.load(sync_ptr, volatile=True)
        spins += 1
    if cnt < target:
        # timed out: a program is not co-resident (or died). Raise the counter past every
        # target so that no program waits again; the launcher sees it and raises.
        tl.atomic_max(sync_ptr, SYNC_ERROR, sem="relaxed", scope="gpu")
    tl.inline_asm_elementwise(
        "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [sync_ptr + tl.zeros([1], tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _is_pending(x, SENTINEL: tl.constexpr):
    """Whether elements of a loaded exchange tile still hold the sentinel (see POLL)."""
    if x.dtype.primitive_bitwidth == 16:
        bits = x.to(tl.int16, bitcast=True)
    elif x.dtype.primitive_bitwidth == 32:
        bits = x.to(tl.int32, bitcast=True)
    else:
        bits = x.to(tl.int64, bitcast=True)
    return bits == SENTINEL


@triton.jit
def _all_arrived(hp, N: tl.constexpr, SENTINEL: tl.constexpr):
    pending = _is_pending(hp[0], SENTINEL)
    for i in tl.static_range(1, N):
        pending = pending | _is_pending(hp[i], SENTINEL)
    return 1 - tl.max(pending.to(tl.int32))  # 1 when every element has arrived


@triton.jit
def _spin_budget(arrived, budget, sync_ptr):
    """What is left of the polls' spin budget after a wait: nothing once one timed out (a
    program is not co-resident, or died). The launch is then flagged failed (the launcher
    raises) and no later wait spins, so a failed launch ends instead of hanging."""
    if arrived == 0:
        tl.atomic_max(sync_ptr, SYNC_ERROR, sem="relaxed", scope="gpu")
        budget = -1
    return budget


@triton.jit
def _store_exchange(ptr, value, mask, ASM: tl.constexpr):
    """The exchange store of h_t (dgates). With ASM, a relaxed gpu-scope store per element:
    others poll these elements with relaxed loads, and a relaxed (morally strong) store makes
    that a well-defined race in the PTX memory model. The interpreter has no inline PTX."""
    if ASM:
        bits: tl.constexpr = value.dtype.primitive_bitwidth
        if bits == 16:
            _store_relaxed(ptr, value.to(tl.int16, bitcast=True), mask, "b16", "h")
        elif bits == 32:
            _store_relaxed(ptr, value.to(tl.int32, bitcast=True), mask, "b32", "r")
        else:
            _store_relaxed(ptr, value.to(tl.int64, bitcast=True), mask, "b64", "l")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _store_relaxed(ptr, bits, mask, WIDTH: tl.constexpr, REG: tl.constexpr):
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.relaxed.gpu.global." + WIDTH
        + " [$1], $2; mov.u32 $0, 0; }",
        "=r,l," + REG + ",r", [ptr, bits, mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
        pack=1,
    )  # fmt: skip


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
def _runtime_zeros(like, s):
    """Zeros the compiler cannot prove zero. Triton folds `dot(a, b, 0) + c` into
    `dot(a, b, c)`, which chains per-chunk accumulators back into one accumulator: H/16
    dependent MMAs a step (about 30 cycles each on sm_90). Started from these, the chunks'
    dots stay independent chains that the tensor cores overlap, and are summed after."""
    return (tl.zeros_like(like) + s) * 0.0


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
def _load_exchanged(p, m, POLL: tl.constexpr):
    """A load of what other programs write during the launch: never from L1 (`.cg`), and
    polled loads volatile as well (read again until they arrive: never hoisted)."""
    if POLL:
        return tl.load(p, mask=m, other=0.0, volatile=True)
    else:
        return tl.load(p, mask=m, other=0.0, cache_modifier=".cg")


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
def _load_dgates_all(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k, nvalid, CELL: tl.constexpr,
                     G: tl.constexpr, GP: tl.constexpr, H: tl.constexpr,
                     POLL: tl.constexpr = False):  # fmt: skip
    """(GP, BLOCK_B, KC): columns offs_k of every gate of d(W_hh h) at step tn (gate-major,
    GRU's n block from dhn, padding gates 0); polled (volatile) or `.cg`, as `_load_h`."""
    g3 = tl.arange(0, GP)[:, None, None]
    k3 = offs_k[None, None, :]
    m = (g3 < G) & nvalid[None, :, None] & (k3 < H)
    p = dxg_ptr + tn.to(tl.int64) * B64 * (G * H) + xrow[None, :, None] + g3 * H + k3
    if CELL == GRU:
        pn = dhn_ptr + tn.to(tl.int64) * B64 * H + hrow[None, :, None] + k3
        p = tl.where(g3 == 2, pn, p)
    return _load_exchanged(p, m, POLL)


@triton.jit
def _load_whh_cols(whh_ptr, offs_k, offs_n, mn, G: tl.constexpr, GP: tl.constexpr,
                   H: tl.constexpr, W: tl.constexpr):  # fmt: skip
    """(GP, KC, N): rows offs_k of every gate block of W_hh (G*H, W), columns offs_n (the
    own units, or the own projected outputs); padding gates and rows 0."""
    g3 = tl.arange(0, GP)[:, None, None]
    k3 = offs_k[None, :, None]
    m = (g3 < G) & (k3 < H) & mn[None, None, :]
    return tl.load(whh_ptr + (g3 * H + k3) * W + offs_n[None, None, :], mask=m, other=0.0)


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


@triton.jit
def _load_xg(xg_ptr, s, s_begin, s_end, T, B64, xrow, col_n, mb, mn, L, G: tl.constexpr,
             H: tl.constexpr, REVERSE: tl.constexpr):  # fmt: skip
    """xg of step s (fused gate columns col_n), in the storage dtype; 0 past the step range
    or a sequence's end."""
    t = _time(s, T, REVERSE)
    xv = mb & (t < L) & (s < s_end) & (s >= s_begin)
    return tl.load(xg_ptr + t.to(tl.int64) * B64 * (G * H) + xrow[:, None] + col_n[None, :],
                   mask=xv[:, None] & mn[None, :], other=0.0)  # fmt: skip


@triton.jit
def _time(s, T, REVERSE: tl.constexpr):
    if REVERSE:
        return T - 1 - s
    else:
        return s


# ----------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["T", "B", "nrows", "s_begin", "s_end", "spin_max"])
def _recurrence_fwd_kernel(
    xg_ptr, whh_ptr, bhn_ptr, len_ptr,
    hx_ptr, y_ptr, hs_ptr, cs_ptr, ws_ptr, sync_ptr,
    T, B, nrows, s_begin, s_end, spin_max,
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, BH: tl.constexpr, BLOCK_B: tl.constexpr,
    ON_CHIP: tl.constexpr, RESIDENT: tl.constexpr, HAS_LEN: tl.constexpr,
    REVERSE: tl.constexpr, SAVE: tl.constexpr, USE_BARRIER: tl.constexpr, POLL: tl.constexpr,
    ASM: tl.constexpr, SENTINEL: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
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
    wrow = offs_b.to(tl.int64) * (NW * H)
    own = hrow[:, None] + offs_j[None, :]
    hd = hx_ptr.dtype.element_ty
    # Reverse with lengths: a row's steps past its end come first and must carry h0 through
    # to its last valid step, so the exchange holds the running state and y (zeros there)
    # is written apart. Everywhere else the exchange rows are y itself.
    SEPARATE_Y: tl.constexpr = HAS_LEN and REVERSE
    EVEN_K: tl.constexpr = H % KC == 0
    # POLL (resident weights): no grid barrier. The exchange rows start as SENTINEL (a
    # signalling-NaN bit pattern that no arithmetic produces) and each is written once, so a
    # program reads its step's h_{t-1} until no element is the sentinel any more: the data
    # is its own barrier (no fence, no counter; one round trip from store to load).
    budget = spin_max

    # running state of the own units: h0/c0 (or zeros) put in the state buffers by the
    # launcher, or what the previous launch left there (per-step fallback)
    hs = tl.load(hs_ptr + own, mask=m_own, other=0.0).to(ACC)
    cs = hs
    if CELL == LSTM:
        cs = tl.load(cs_ptr + own, mask=m_own, other=0.0).to(ACC)
    if CELL == GRU:
        bhn = tl.load(bhn_ptr + offs_j, mask=mj, other=0.0).to(ACC)

    # Gates fused along N: column n of the (K, GP*BH) weight tile is unit n % BH of gate
    # n // BH (GP = G padded to a power of two), so the 4 warps split one dot by gate instead
    # of each repeating a narrow one.
    NG: tl.constexpr = GP * BH
    offs_n = tl.arange(0, NG)
    gate_n = offs_n // BH
    unit_n = pid_h * BH + offs_n % BH
    mn = (gate_n < G) & (unit_n < H)
    col_n = gate_n * H + unit_n  # column of xg, row of W_hh
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

    for s in range(s_begin, s_end):
        if ON_CHIP:
            x_next = _load_xg(xg_ptr, s + 1, s_begin, s_end, T, B64, xrow, col_n, mb, mn, L, G,
                              H, REVERSE)  # fmt: skip
        t = _time(s, T, REVERSE)
        valid = mb & (t < L)

        # recurrent matvec: (BLOCK_B, H) h_{t-1} times the (H, GP*BH) fused gate tile
        acc = tl.zeros([BLOCK_B, NG], dtype=ACC)
        if ON_CHIP:
            acc = tl.dot(hs.to(hd), w_res[0], acc, input_precision=PREC, out_dtype=ACC)
        else:
            # exchange row of h_{t-1}: t (forward; row 0 is h0) or t + 1 (reverse; row T)
            prev = (t + REVERSE).to(tl.int64) * B64 * H
            if RESIDENT and POLL:
                # Read h_{t-1} and multiply until nothing read was pending. A pending element
                # (the sentinel is a NaN) makes its batch row of the product NaN, so a
                # NaN-free product proves that the step's h all arrived without comparing
                # each element on the way in; only a NaN product (data on its way, or a
                # genuine NaN in h or W_hh) compares elements.
                arrived = 0
                spins = 0
                while (arrived == 0) & (spins <= budget):
                    hp = ()
                    for i in tl.static_range(NKC):
                        offs_k = i * KC + tl.arange(0, KC)
                        hp = hp + (_load_h(hx_ptr, prev, hrow, offs_k, mb, H, EVEN_K, POLL),)
                    acc = _chunk_dots(hp, w_res, _runtime_zeros(acc, s), NKC,
                                      PREC, ACC)  # fmt: skip
                    arrived = 1 - tl.max((acc != acc).to(tl.int32))
                    if arrived == 0:
                        arrived = _all_arrived(hp, NKC, SENTINEL)
                    spins += 1
                budget = _spin_budget(arrived, budget, sync_ptr)
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
        a0, a1, a2, a3 = _split_gates(acc, BLOCK_B, BH, GP)
        x0, x1, x2, x3 = _split_gates(x, BLOCK_B, BH, GP)

        # gates (fp32, fp64 for fp64 inputs)
        if CELL == LSTM:
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

        # h_t into its exchange row: t + 1 (forward) or t (reverse). Past a sequence's end
        # y is 0 and the state is kept. The own state is kept as the others see it (rounded).
        v2 = valid[:, None]
        out = (t + 1 - REVERSE).to(tl.int64) * B64 * H
        toff = t.to(tl.int64) * B64
        if SEPARATE_Y:
            hs = tl.where(v2, h_new.to(hd).to(ACC), hs)
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
            wp = ws_ptr + toff * (NW * H) + wrow[:, None] + offs_j[None, :]
            wd = ws_ptr.dtype.element_ty
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
        if ON_CHIP:
            x = x_next.to(ACC)
        else:
            x = _load_xg(xg_ptr, s + 1, s_begin, s_end, T, B64, xrow, col_n, mb, mn, L, G, H,
                         REVERSE).to(ACC)  # fmt: skip
        if USE_BARRIER:
            if s + 1 < s_end:
                _barrier_wait(sync_ptr, (s - s_begin + 1) * nprog, spin_max)

    tl.store(hs_ptr + own, hs, mask=m_own)
    if CELL == LSTM:
        tl.store(cs_ptr + own, cs, mask=m_own)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_own_loads(
    s, T, B64, L, mb, mj, offs_j, hrow, wrow, y_ptr, h0_ptr, c0_ptr, ws_ptr, dy_ptr,
    CELL: tl.constexpr, NW: tl.constexpr, H: tl.constexpr, REVERSE: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """Everything of backward step s that only this program's units need (and that no other
    program writes during the launch): dy, the saved fields, and c_{t-1} / h_{t-1} (c0 / h0
    at a sequence's first step; the launcher passes zeros for a missing one)."""
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
    f0, f1, f2, f3, f4 = _load_fields(ws_ptr, toff * (NW * H) + wrow, offs_j, mv, H, NW, ACC)
    mp = pvalid[:, None] & mj[None, :]
    mf = first[:, None] & mj[None, :]
    if CELL == LSTM:
        pv = tl.load(ws_ptr + poff * (NW * H) + wrow[:, None] + 4 * H + offs_j[None, :], mask=mp,
                     other=0.0).to(ACC)  # fmt: skip
        pv += tl.load(c0_ptr + own, mask=mf, other=0.0).to(ACC)
    elif CELL == GRU:
        pv = tl.load(y_ptr + poff * H + own, mask=mp, other=0.0).to(ACC)
        pv += tl.load(h0_ptr + own, mask=mf, other=0.0).to(ACC)
    else:
        pv = dy
    return dy, f0, f1, f2, f3, f4, pv


@triton.jit(do_not_specialize=["T", "B", "nrows", "s_begin", "s_end", "spin_max"])
def _recurrence_bwd_kernel(
    whh_ptr, h0_ptr, c0_ptr, len_ptr, y_ptr, ws_ptr, dy_ptr,
    dxg_ptr, dhn_ptr, dhs_ptr, dcs_ptr, sync_ptr,
    T, B, nrows, s_begin, s_end, spin_max,
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, BH: tl.constexpr, BLOCK_B: tl.constexpr,
    CHUNKS_PER_TRIP: tl.constexpr, ON_CHIP: tl.constexpr, RESIDENT: tl.constexpr,
    HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, USE_BARRIER: tl.constexpr,
    POLL: tl.constexpr, ASM: tl.constexpr, SENTINEL: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Steps s in [0, T]: step s < T handles forward step T-1-s; step T only adds the last
    dgates' recurrent contribution (to dh0). dgates (= dxg, except GRU's n block, kept apart in
    dhn as dn_pre * r) are exchanged through their output buffers, or, ON_CHIP (one program
    owns every unit), kept in registers from one step to the next. POLL (resident weights):
    dxg and dhn start as the sentinel and are polled, as the forward's exchange rows."""
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
    wrow = offs_b.to(tl.int64) * (NW * H)
    GH: tl.constexpr = G * H
    own = hrow[:, None] + offs_j[None, :]
    xd = dxg_ptr.dtype.element_ty
    budget = spin_max

    # carries: dh_T / dc_T (put in the state buffers by the launcher) or what the previous
    # launch left there
    dh_c = tl.load(dhs_ptr + own, mask=m_own, other=0.0).to(ACC)
    dc_c = dh_c
    if CELL == LSTM:
        dc_c = tl.load(dcs_ptr + own, mask=m_own, other=0.0).to(ACC)

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
            offs_k = i * KC + tl.arange(0, KC)
            w_res = w_res + (_load_whh_cols(whh_ptr, offs_k, offs_j, mj, G, GP, H, H),)

    dy, f0, f1, f2, f3, f4, pv = _bwd_own_loads(
        s_begin, T, B64, L, mb, mj, offs_j, hrow, wrow, y_ptr, h0_ptr, c0_ptr, ws_ptr, dy_ptr,
        CELL, NW, H, REVERSE, ACC,
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
            # as the forward's poll: a NaN-free product proves that every dgates element it
            # read had arrived. A NaN product compares elements (read again: the trips do
            # not keep their tiles); once nothing is pending, one more product is final,
            # NaNs and all (they are genuine).
            arrived = 0
            complete = 0
            spins = 0
            while (arrived == 0) & (spins <= budget):
                rec = _dgates_dots(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, nvalid, w_res, whh_ptr,
                                   offs_j, mj, s, CELL, G, GP, H, H, KC, NKC, BLOCK_B, BH,
                                   CHUNKS_PER_TRIP, True, True, POLL, PREC, ACC)  # fmt: skip
                arrived = _product_arrived(rec, complete)
                if arrived == 0:
                    # (a runtime loop: compact code for a rare path, registers left alone)
                    pending = 0
                    for c in range(0, NKC):
                        offs_k = c * KC + tl.arange(0, KC)
                        gk = _load_dgates_all(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, offs_k,
                                              nvalid, CELL, G, GP, H, POLL)  # fmt: skip
                        pending = pending | tl.max(_is_pending(gk, SENTINEL).to(tl.int32))
                    complete = 1 - pending
                spins += 1
            budget = _spin_budget(arrived, budget, sync_ptr)
        elif RESIDENT:
            rec = _dgates_dots(dxg_ptr, dhn_ptr, tn, B64, xrow, hrow, nvalid, w_res, whh_ptr,
                               offs_j, mj, s, CELL, G, GP, H, H, KC, NKC, BLOCK_B, BH,
                               CHUNKS_PER_TRIP, True, True, False, PREC, ACC)  # fmt: skip
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
            d0, d1, d2, d3, dc = _lstm_cell_backward(dh, dc_c, f0, f1, f2, f3, f4, pv)
            dc_c = tl.where(v2, dc * f1, dc_c)
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
        gp = dxg_ptr + toff * GH + xrow[:, None] + offs_j[None, :]
        relaxed: tl.constexpr = ASM and POLL
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
            CELL, NW, H, REVERSE, ACC,
        )  # fmt: skip
        if USE_BARRIER:
            if s + 1 < s_end:
                _barrier_wait(sync_ptr, (s - s_begin + 1) * nprog, spin_max)

    tl.store(dhs_ptr + own, dh_c, mask=m_own)
    if CELL == LSTM:
        tl.store(dcs_ptr + own, dc_c, mask=m_own)


# ----------------------------------------------------------------------------- LSTM with projection


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
def _product_arrived(prod, complete):
    """Polls: a NaN-free product read nothing pending (a pending element is a NaN and turns
    its row of the product NaN); after a recheck found nothing pending (`complete`), the
    product is final whatever NaNs it holds (they are genuine)."""
    return (1 - tl.max((prod != prod).to(tl.int32))) | complete


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


@triton.jit(do_not_specialize=["T", "B", "nrows", "s_begin", "s_end", "spin_max"])
def _lstmp_fwd_kernel(
    xg_ptr, whh_ptr, whr_ptr, len_ptr,
    hx_ptr, y_ptr, mx_ptr, hs_ptr, cs_ptr, ws_ptr, sync_ptr,
    T, B, nrows, s_begin, s_end, spin_max,
    G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, NKP: tl.constexpr, BH: tl.constexpr,
    BP: tl.constexpr, BLOCK_B: tl.constexpr, CHUNKS_PER_TRIP: tl.constexpr,
    ON_CHIP: tl.constexpr, RESIDENT: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    USE_BARRIER: tl.constexpr, PHASES: tl.constexpr, POLL: tl.constexpr, ASM: tl.constexpr,
    SENTINEL: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
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
    each phase on its own, which is also how the interpreter runs several programs."""
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
    wrow = offs_b.to(tl.int64) * (NW * H)
    own = hrow[:, None] + offs_j[None, :]
    ownp = prow[:, None] + offs_p[None, :]
    hd = hx_ptr.dtype.element_ty
    SEPARATE_Y: tl.constexpr = HAS_LEN and REVERSE  # as in the unprojected kernel
    budget = spin_max

    # running state: the projected h of the own outputs, c of the own units
    hs = tl.load(hs_ptr + ownp, mask=m_ownp, other=0.0).to(ACC)
    cs = tl.load(cs_ptr + own, mask=m_own, other=0.0).to(ACC)

    # gates fused along N as in the unprojected kernel: column n is unit n % BH of gate n // BH
    NG: tl.constexpr = GP * BH
    offs_n = tl.arange(0, NG)
    gate_n = offs_n // BH
    unit_n = pid_h * BH + offs_n % BH
    mn = (gate_n < G) & (unit_n < H)
    col_n = gate_n * H + unit_n  # column of xg, row of W_hh
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

    if PHASES % 2 == 1:
        t = _time(s_begin, T, REVERSE)
        xv = mb & (t < L) & (s_begin < s_end)
        x = tl.load(
            xg_ptr + t.to(tl.int64) * B64 * (G * H) + xrow[:, None] + col_n[None, :],
            mask=xv[:, None] & mn[None, :], other=0.0,
        ).to(ACC)  # fmt: skip

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
        k_bar = 2 * (s - s_begin)
        if PHASES % 2 == 1:
            # exchange row of h_{t-1}: t (forward; row 0 is h0) or t + 1 (reverse; row T)
            prev = (t + REVERSE).to(tl.int64) * B64 * P
            if POLL:
                acc = tl.zeros([BLOCK_B, NG], dtype=ACC)
                arrived = 0
                complete = 0
                spins = 0
                while (arrived == 0) & (spins <= budget):
                    acc = _lstmp_gate_dots(hx_ptr, prev, prow, mb, w_g, whh_ptr, col_n, mn, s,
                                           BLOCK_B, NG, P, KC, NKP, CHUNKS_PER_TRIP, RESIDENT,
                                           POLL, PREC, ACC)  # fmt: skip
                    arrived = _product_arrived(acc, complete)
                    if arrived == 0:
                        complete = 1 - _rows_pending(hx_ptr, prev, prow, mb, P, KC, SENTINEL)
                    spins += 1
                budget = _spin_budget(arrived, budget, sync_ptr)
            else:
                acc = _lstmp_gate_dots(hx_ptr, prev, prow, mb, w_g, whh_ptr, col_n, mn, s,
                                       BLOCK_B, NG, P, KC, NKP, CHUNKS_PER_TRIP, RESIDENT,
                                       POLL, PREC, ACC)  # fmt: skip
            a0, a1, a2, a3 = _split_gates(acc, BLOCK_B, BH, GP)
            x0, x1, x2, x3 = _split_gates(x, BLOCK_B, BH, GP)
            ig, fg, gg, og, c_new, m_new = _lstm_cell(x0, x1, x2, x3, a0, a1, a2, a3, cs)
            cs = tl.where(v2, c_new, cs)
            _store_exchange(mx_ptr + mrow + own, tl.where(v2, m_new, 0.0).to(hd), m_own,
                            ASM and POLL)  # fmt: skip
            if USE_BARRIER:
                _barrier_arrive(sync_ptr)
            elif not POLL:
                tl.debug_barrier()
            if SAVE:
                wp = ws_ptr + toff * (NW * H) + wrow[:, None] + offs_j[None, :]
                wd = ws_ptr.dtype.element_ty
                tl.store(wp, tl.where(v2, ig, 0.0).to(wd), mask=m_own)
                tl.store(wp + H, tl.where(v2, fg, 0.0).to(wd), mask=m_own)
                tl.store(wp + 2 * H, tl.where(v2, gg, 0.0).to(wd), mask=m_own)
                tl.store(wp + 3 * H, tl.where(v2, og, 0.0).to(wd), mask=m_own)
                tl.store(wp + 4 * H, tl.where(v2, c_new, 0.0).to(wd), mask=m_own)
            if USE_BARRIER:
                _barrier_wait(sync_ptr, (k_bar + 1) * nprog, spin_max)
        if PHASES >= 2:
            # a program past P loads nothing (it only keeps step with the barriers)
            mb_p = mb & (pid_h * BP < P)
            if POLL:
                hproj = tl.zeros([BLOCK_B, BP], dtype=ACC)
                arrived = 0
                complete = 0
                spins = 0
                while (arrived == 0) & (spins <= budget):
                    hproj = _lstmp_proj_dots(mx_ptr, mrow, hrow, mb_p, w_r, whr_ptr, offs_p, mp,
                                             BLOCK_B, BP, H, KC, NKC, CHUNKS_PER_TRIP,
                                             RESIDENT, POLL, PREC, ACC)  # fmt: skip
                    arrived = _product_arrived(hproj, complete)
                    if arrived == 0:
                        complete = 1 - _rows_pending(mx_ptr, mrow, hrow, mb_p, H, KC, SENTINEL)
                    spins += 1
                budget = _spin_budget(arrived, budget, sync_ptr)
            else:
                hproj = _lstmp_proj_dots(mx_ptr, mrow, hrow, mb_p, w_r, whr_ptr, offs_p, mp,
                                         BLOCK_B, BP, H, KC, NKC, CHUNKS_PER_TRIP, RESIDENT,
                                         POLL, PREC, ACC)  # fmt: skip
            # h_t into its exchange row: t + 1 (forward) or t (reverse)
            out = (t + 1 - REVERSE).to(tl.int64) * B64 * P
            if SEPARATE_Y:
                hs = tl.where(v2, hproj.to(hd).to(ACC), hs)
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
        if PHASES % 2 == 1:
            tn = _time(s + 1, T, REVERSE)
            xv = mb & (tn < L) & (s + 1 < s_end)
            x = tl.load(
                xg_ptr + tn.to(tl.int64) * B64 * (G * H) + xrow[:, None] + col_n[None, :],
                mask=xv[:, None] & mn[None, :], other=0.0,
            ).to(ACC)  # fmt: skip
        if PHASES >= 2:
            if USE_BARRIER:
                if s + 1 < s_end:
                    _barrier_wait(sync_ptr, (k_bar + 2) * nprog, spin_max)

    tl.store(hs_ptr + ownp, hs, mask=m_ownp)
    tl.store(cs_ptr + own, cs, mask=m_own)


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


@triton.jit(do_not_specialize=["T", "B", "nrows", "s_begin", "s_end", "spin_max"])
def _lstmp_bwd_kernel(
    whh_ptr, whr_ptr, c0_ptr, len_ptr, ws_ptr, dy_ptr,
    dxg_ptr, dhp_ptr, dhs_ptr, dcs_ptr, sync_ptr,
    T, B, nrows, s_begin, s_end, spin_max,
    G: tl.constexpr, GP: tl.constexpr, NW: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
    KC: tl.constexpr, NKC: tl.constexpr, NKP: tl.constexpr, BH: tl.constexpr,
    BP: tl.constexpr, BLOCK_B: tl.constexpr, CHUNKS_PER_TRIP: tl.constexpr,
    ON_CHIP: tl.constexpr, RESIDENT: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
    USE_BARRIER: tl.constexpr,
    PHASES: tl.constexpr, POLL: tl.constexpr, ASM: tl.constexpr, SENTINEL: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Backward of `_lstmp_fwd_kernel`, steps s in [0, T] (step s < T handles forward step
    T-1-s; step T only folds the first step's dgates into dh0), two phases per step:
    1. program p owns outputs [p*BP, p*BP+BP): dh_t = carry + dgates_{next} @ W_hh[:, own]
       (K = 4H, dgates from dxg) + dy_t, stored to dhp[t] (the exchange buffer, and dW_hr's
       input);
    2. program p owns units [p*BH, p*BH+BH): dm = dh_t (B, P) @ W_hr[:, own] (K = P), the
       LSTM gate backward with dm for dh, dgates to dxg[t].
    A grid barrier follows each phase, or (POLL) none: dxg and dhp start as the sentinel and
    are polled (PHASES as in the forward)."""
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
    wrow = offs_b.to(tl.int64) * (NW * H)
    own = hrow[:, None] + offs_j[None, :]
    ownp = prow[:, None] + offs_p[None, :]
    xd = dxg_ptr.dtype.element_ty
    budget = spin_max

    # carries: dh of the own outputs (P wide), dc of the own units
    dh_c = tl.load(dhs_ptr + ownp, mask=m_ownp, other=0.0).to(ACC)
    dc_c = tl.load(dcs_ptr + own, mask=m_own, other=0.0).to(ACC)
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
        k_bar = 2 * (s - s_begin)
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
                spins = 0
                while (arrived == 0) & (spins <= budget):
                    rec = _dgates_dots(dxg_ptr, dxg_ptr, tn, B64, xrow, hrow, nvalid, w_g,
                                       whh_ptr, offs_p, mp, s, LSTM, G, GP, H, P, KC, NKC,
                                       BLOCK_B, BP, CHUNKS_PER_TRIP, RESIDENT, BLOCK_B < 64,
                                       POLL, PREC, ACC)  # fmt: skip
                    arrived = _product_arrived(rec, complete)
                    if arrived == 0:
                        row_off = tn.to(tl.int64) * B64 * (G * H)
                        complete = 1 - _rows_pending(dxg_ptr, row_off, xrow, nvalid, G * H, KC,
                                                     SENTINEL)  # fmt: skip
                    spins += 1
                budget = _spin_budget(arrived, budget, sync_ptr)
            else:
                rec = _dgates_dots(dxg_ptr, dxg_ptr, tn, B64, xrow, hrow, nvalid, w_g, whh_ptr,
                                   offs_p, mp, s, LSTM, G, GP, H, P, KC, NKC, BLOCK_B, BP,
                                   CHUNKS_PER_TRIP, RESIDENT, BLOCK_B < 64, POLL, PREC,
                                   ACC)  # fmt: skip
            dh_c += rec
            dy = tl.load(dy_ptr + toff * P + ownp, mask=v2 & mp[None, :], other=0.0).to(ACC)
            dh = dh_c + dy
            # rows past a sequence's end: dhp 0, the carry rides on to the sequence's end
            _store_exchange(dhp_ptr + toff * P + ownp, tl.where(v2, dh, 0.0).to(xd),
                            m_ownp & (s < T), ASM and POLL)  # fmt: skip
            dh_c = tl.where(v2, 0.0, dh_c)
            if USE_BARRIER:
                if s < T:
                    _barrier_arrive(sync_ptr)
            elif not POLL:
                tl.debug_barrier()
        if PHASES >= 2:
            # the own units' saved fields and c_{t-1}, overlapping the barrier
            mv = v2 & mj[None, :]
            f0, f1, f2, f3, f4 = _load_fields(ws_ptr, toff * (NW * H) + wrow, offs_j, mv, H, NW,
                                              ACC)  # fmt: skip
            # c_{t-1}: the saved c of the previous step, c0 at a sequence's first step
            if REVERSE:
                tp = t + 1
            else:
                tp = t - 1
            pvalid = valid & (tp >= 0) & (tp < L)
            first = valid & ~pvalid
            pv = tl.load(ws_ptr + tp.to(tl.int64) * B64 * (NW * H) + wrow[:, None] + 4 * H
                         + offs_j[None, :], mask=pvalid[:, None] & mj[None, :],
                         other=0.0).to(ACC)  # fmt: skip
            pv += tl.load(c0_ptr + own, mask=first[:, None] & mj[None, :], other=0.0).to(ACC)
        if PHASES % 2 == 1:
            if USE_BARRIER:
                if s < T:
                    _barrier_wait(sync_ptr, (k_bar + 1) * nprog, spin_max)
        if PHASES >= 2:
            if POLL:
                dm = tl.zeros([BLOCK_B, BH], dtype=ACC)
                arrived = 0
                complete = 0
                spins = 0
                while (arrived == 0) & (spins <= budget):
                    dm = _lstmp_dm_dots(dhp_ptr, toff, prow, valid, w_r, whr_ptr, offs_j, mj, s,
                                        H, P, KC, NKP, BLOCK_B, BH, RESIDENT, POLL, PREC,
                                        ACC)  # fmt: skip
                    arrived = _product_arrived(dm, complete)
                    if arrived == 0:
                        complete = 1 - _rows_pending(dhp_ptr, toff * P, prow, valid, P, KC,
                                                     SENTINEL)  # fmt: skip
                    spins += 1
                budget = _spin_budget(arrived, budget, sync_ptr)
            else:
                dm = _lstmp_dm_dots(dhp_ptr, toff, prow, valid, w_r, whr_ptr, offs_j, mj, s, H, P,
                                    KC, NKP, BLOCK_B, BH, RESIDENT, POLL, PREC, ACC)  # fmt: skip
            d0, d1, d2, d3, dc = _lstm_cell_backward(dm, dc_c, f0, f1, f2, f3, f4, pv)
            dc_c = tl.where(v2, dc * f1, dc_c)
            ms = m_own & (s < T)
            gp = dxg_ptr + toff * (G * H) + xrow[:, None] + offs_j[None, :]
            relaxed: tl.constexpr = ASM and POLL
            _store_exchange(gp, tl.where(v2, d0, 0.0).to(xd), ms, relaxed)
            _store_exchange(gp + H, tl.where(v2, d1, 0.0).to(xd), ms, relaxed)
            _store_exchange(gp + 2 * H, tl.where(v2, d2, 0.0).to(xd), ms, relaxed)
            _store_exchange(gp + 3 * H, tl.where(v2, d3, 0.0).to(xd), ms, relaxed)
            if USE_BARRIER:
                if s + 1 < s_end:
                    _barrier_arrive(sync_ptr)
                    _barrier_wait(sync_ptr, (k_bar + 2) * nprog, spin_max)
            elif not POLL:
                tl.debug_barrier()

    tl.store(dhs_ptr + ownp, dh_c, mask=m_ownp)
    tl.store(dcs_ptr + own, dc_c, mask=m_own)


# ----------------------------------------------------------------------------- launchers


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tests set this: every output is allocated NaN-filled, so an element a kernel forgets to
# write fails the comparison. GPURNN_DEBUG_POISON=1 does the same.
POISON = os.environ.get("GPURNN_DEBUG_POISON") == "1"

# Bounded barrier spin (iterations of one relaxed L2 load, ~0.5-1 us each): ~4 s by default.
SPIN_MAX = int(os.environ.get("GPURNN_TRITON_SPIN_MAX", str(1 << 22)))
# The polled exchanges (h forward, dgates backward) start as these bit patterns, and a
# program waits until no element it reads is one. They are signalling NaNs: arithmetic only
# ever produces quiet NaNs, so a value a kernel writes never equals one. Their payload sits
# in the highest mantissa bits that the tensor cores read (fp32 enters a tf32 MMA without
# its low 13 mantissa bits: a payload there would read as infinity, not NaN), so a pending
# element always makes the product it enters NaN.
_SENTINEL = {torch.bfloat16: 0x7F81, torch.float16: 0x7D00, torch.float32: 0x7FA00000,
             torch.float64: 0x7FF4000000000000}  # fmt: skip
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}  # fmt: skip

# Weights kept on chip live in shared memory (Triton stages a `tl.dot` operand loaded before
# the loop there and re-reads it with ldmatrix every step), so plans are budgeted in bytes of
# shared memory, then checked against what the compiled kernel really takes (`_fit`).
# The budget leaves room for the scratch of the dots' layout conversions.
RESIDENT_SMEM = 160 * 1024
# Bytes per thread that the backward's dgates loads of one round trip may hold in flight
# (registers): CHUNKS_PER_TRIP K chunks of every gate. 64 registers (two 128-wide chunks of
# an LSTM at B=16 on 4 warps); more spilled on sm_90, and a spill made the LSTM H=768
# backward step 18 us on an H100.
INFLIGHT_BYTES = 256
KC_GPU = 128  # K chunk of resident dots: 6 independent chains at H=768
KC_16ROWS = 64  # K chunk of 16-row forward tiles (and RNN backward): 4-deep MMA chains
BATCH_TILES = (16, 32, 64)  # rows per program: one m16 mma tile up to a 64-row wgmma tile


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
    on_chip: bool = False  # one program owns every unit: no exchange, no grid barrier
    chunks_per_trip: int = 1  # backward: K chunks (all gates) whose loads are issued together
    BP: int = 0  # LSTM with projection: projected outputs per program (0: no projection)
    # resident weights: poll the exchanged rows (h, dgates) instead of a grid barrier
    poll: bool = False
    # persistent: batch tiles per launch (0: all). Batch tiles are independent, so when the
    # grid would not fit the GPU at once, persistent launches take the tiles in turns.
    b_chunk: int = 0

    @property
    def tiles_per_launch(self) -> int:
        return min(self.n_b, self.b_chunk) if self.b_chunk else self.n_b

    @property
    def nprog(self) -> int:
        """Programs of one launch (they must all be resident at once when persistent)."""
        return self.n_h * self.tiles_per_launch


def _element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def weight_bytes(H: int, G: int, BH: int, KC: int, dtype: torch.dtype, backward: bool) -> int:
    """Shared memory the resident weights of one program take: forward a (NKC*KC, GP*BH)
    fused gate tile, backward G (NKC*KC, BH) column blocks of W_hh."""
    k = triton.cdiv(H, KC) * KC
    n = G * BH if backward else _next_pow2(G) * BH
    return k * n * _element_size(dtype)


def on_chip_bytes(H: int, G: int, dtype: torch.dtype, backward: bool) -> int:
    """Shared memory of W_hh whole, padded to powers of two, as one program holds it."""
    hp = _next_pow2(H)
    return (G if backward else _next_pow2(G)) * hp * hp * _element_size(dtype)


def _batch_tile(B: int) -> int:
    for bb in BATCH_TILES:
        if B <= bb:
            return bb
    return BATCH_TILES[-1]


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
    on_chip: bool | None = None,
    num_warps: int | None = None,
    chunks_per_trip: int | None = None,
    sm_count: int | None = None,
    proj_size: int | None = None,
    BP: int | None = None,
    poll: bool | None = None,
    b_chunk: int | None = None,
) -> Plan:
    """Pick tiling and mode from sizes (the launchers then check it against the compiled
    kernel, `_fit`). Keyword overrides exist for tests and tuning.

    GPU, in order of preference:
    1. on chip: W_hh whole fits one program's shared memory (16-bit LSTM/GRU H <= 128, RNN
       H <= 256): one program per batch tile, h (backward: dgates) stays in registers, no
       exchange buffer and no grid barrier.
    2. persistent: BLOCK_B rows (16, 32 or 64) x BH units (8..64, the smallest keeping the
       grid within one program per SM) per program, weights resident in shared memory when
       they fit RESIDENT_SMEM, else streamed from L2 each step. When even BH=64 leaves more
       programs than SMs, the batch tiles take turns (`b_chunk` per launch).
    3. one launch per step, when not even one batch tile's programs fit the SMs.
    With resident weights the kernels poll what they exchange (h forward, dgates backward)
    instead of waiting at a grid barrier (`poll`, POLL in the kernels).
    `sm_count` stands in for the device's SM count (planning for a GPU without one).
    `proj_size` (LSTM with projection): see `_make_proj_plan`."""
    if proj_size:
        return _make_proj_plan(H, proj_size, B, dtype, device, backward=backward, BH=BH, BP=BP,
                               BLOCK_B=BLOCK_B, KC=KC, resident=resident, persistent=persistent,
                               num_warps=num_warps, chunks_per_trip=chunks_per_trip,
                               sm_count=sm_count, poll=poll)  # fmt: skip
    es = _element_size(dtype)
    hp = _next_pow2(H)
    if device.type != "cuda":
        # interpreter: one program covering everything unless a test asks otherwise
        bb = BLOCK_B or max(2, _next_pow2(B))
        bh = BH or max(2, hp)
        kc = KC or max(16, min(64, hp))
        n_h, n_b = triton.cdiv(H, bh), triton.cdiv(B, bb)
        res = True if resident is None else resident
        per_launch = min(n_b, b_chunk) if b_chunk else n_b
        pers = (n_h * per_launch == 1) if persistent is None else persistent
        if pers and n_h * per_launch > 1:
            raise ValueError("the interpreter runs programs one after another: a grid barrier "
                             "across several programs would never complete")  # fmt: skip
        chip = (n_h == 1 and pers and res) if on_chip is None else on_chip
        return Plan(bh, bb, n_h, n_b, res, pers, kc, num_warps or 4, chip, chunks_per_trip or 2,
                    poll=True if poll is None else poll, b_chunk=b_chunk or 0)  # fmt: skip

    sms = sm_count or torch.cuda.get_device_properties(device).multi_processor_count
    bb = BLOCK_B or _batch_tile(B)
    n_b = triton.cdiv(B, bb)
    gp = G if backward else _next_pow2(G)
    if on_chip is None:
        on_chip = (BH is None and hp <= 256 and bb * gp * hp <= 16 * 1024
                   and on_chip_bytes(H, G, dtype, backward) <= RESIDENT_SMEM)  # fmt: skip
    if on_chip:
        # accumulator (BLOCK_B, GP*HP) fp32: 8 warps above 2048 elements (4 spilled at
        # LSTM H=128 on sm_90)
        nw = num_warps or (4 if bb * gp * hp <= 2048 else 8)
        return Plan(hp, bb, 1, n_b, True, True, hp, nw, True, G)

    bh = BH
    if bh is None:
        bh = 8
        while triton.cdiv(H, bh) * n_b > sms and bh < 64:
            bh *= 2
    n_h = triton.cdiv(H, bh)
    # batch tiles in turns when they do not all fit; one launch per step if not even one does
    if b_chunk is None:
        b_chunk = 0 if n_h * n_b <= sms else sms // n_h
    fits = n_h <= sms
    pers = fits if persistent is None else (persistent and fits)
    # backward: narrower chunks for taller batch tiles, so one chunk of every gate's dgates
    # stays within the registers INFLIGHT_BYTES allows (64 rows x 128 spilled on sm_90).
    # Forward, 16-row tiles: 64-wide chunks, i.e. H/64 independent MMA chains 4 deep (at 128
    # ptxas interleaves only two or three of the 8-deep chains: 15 MMAs in a row at H=768).
    # Backward RNN (one gate, so every warp holds the whole (16, 8) tile) likewise.
    if backward:
        kc_default = KC_16ROWS if (G == 1 and bb == 16) else max(32, KC_GPU * 16 // bb)
    else:
        kc_default = KC_16ROWS if bb == 16 else KC_GPU
    kc = KC or min(kc_default, hp)
    if resident is None:
        resident = weight_bytes(H, G, bh, kc, dtype, backward) <= RESIDENT_SMEM
    if not resident and KC is None:
        kc = stream_kc(G, bh, backward, dtype)
    # Forward: 4 warps for 16-row tiles in 16-bit, one (16, 8) output tile each (8 warps
    # computed every tile twice); with independent chunk accumulators all of a step's h
    # loads still go out in one wave (with one chained accumulator ptxas held most of them
    # back). 8 for taller tiles and fp32 (registers: 4 spilled).
    # Backward 4 (resident, up to 32 rows): a 3-D dot over the gates gives each warp a gate;
    # more warps would repeat MMAs (the first kernels: every warp computed the one (16, 8)
    # output tile, 18 us per LSTM H=768 step on an H100 with 8 warps). 64-row tiles and
    # streamed weights need 8 warps' registers (4 spilled on sm_90).
    # Backward: as many K chunks' dgates loads per trip as INFLIGHT_BYTES per thread allow.
    nw = num_warps or (4 if (backward and resident and bb <= 32)
                       or (not backward and bb == 16 and es == 2) else 8)  # fmt: skip
    per_chunk = _next_pow2(G) * bb * kc * es
    cpt = chunks_per_trip or max(1, min(triton.cdiv(H, kc), INFLIGHT_BYTES * 32 * nw // per_chunk))
    if poll is None:
        # backward 64-row tiles: the poll's retry loop spilled registers on sm_90
        poll = not (backward and bb == 64)
    return Plan(bh, bb, n_h, n_b, resident, pers, kc, nw, False, cpt, poll=poll, b_chunk=b_chunk)


def proj_weight_bytes(
    H: int, P: int, BH: int, BP: int, KC: int, dtype: torch.dtype, backward: bool
) -> int:
    """Shared memory of one program's resident weights, LSTM with projection: forward
    W_hh^T (P, 4*BH) and W_hr^T (H, BP); backward W_hh (4H, BP) and W_hr (P, BH) (K padded
    to whole KC chunks)."""
    kp = triton.cdiv(P, KC) * KC
    kh = triton.cdiv(H, KC) * KC
    if backward:
        return (4 * kh * BP + kp * BH) * _element_size(dtype)
    return (kp * 4 * BH + kh * BP) * _element_size(dtype)


# Shared memory for the exchange loads of one trip of the projected forward: every loaded
# K chunk of m (or h) is staged there for its dot (seen in the sm_90 compile: BLOCK_B x H
# bytes when a step loaded all of m at once, 128 KB at B=64, H=1024, bf16)
PROJ_STAGE_BYTES = 32 * 1024


def _make_proj_plan(H, P, B, dtype, device, *, backward, BH, BP, BLOCK_B, KC, resident,
                    persistent, num_warps, chunks_per_trip, sm_count,
                    poll=None) -> Plan:  # fmt: skip
    """Plan of the projected LSTM kernels: n_h programs (per batch tile) own BH units each
    for the gates and BP projected outputs each for the projection (the smallest power of
    two >= 8, 2 in the interpreter, that covers P with n_h programs; programs past P idle in
    that phase). Weights resident when they fit RESIDENT_SMEM, else streamed every step.
    Persistent (two grid barriers per step) when one batch tile's programs fit on the device
    at once (the batch tiles in turns when not all do); else one launch per phase of each
    step. Never on chip: the projection needs the
    exchange of m even with one program."""
    hp = _next_pow2(H)
    if device.type != "cuda":
        bb = BLOCK_B or max(2, _next_pow2(B))
        bh = BH or max(2, hp)
        n_h, n_b = triton.cdiv(H, bh), triton.cdiv(B, bb)
        bp = BP or max(2, _next_pow2(triton.cdiv(P, n_h)))
        kc = KC or max(16, min(64, hp))
        res = True if resident is None else resident
        pers = (n_h * n_b == 1) if persistent is None else persistent
        if pers and n_h * n_b > 1:
            raise ValueError("the interpreter runs programs one after another: a grid barrier "
                             "across several programs would never complete")  # fmt: skip
        return Plan(bh, bb, n_h, n_b, res, pers, kc, num_warps or 4, False,
                    chunks_per_trip or 2, bp, poll=True if poll is None else poll)  # fmt: skip
    sms = sm_count or torch.cuda.get_device_properties(device).multi_processor_count
    bb = BLOCK_B or _batch_tile(B)
    n_b = triton.cdiv(B, bb)
    bh = BH
    if bh is None:
        bh = 8
        while triton.cdiv(H, bh) * n_b > sms and bh < 64:
            bh *= 2
    n_h = triton.cdiv(H, bh)
    bp = BP or max(8, _next_pow2(triton.cdiv(P, n_h)))
    # batch tiles in turns when they do not all fit (as `make_plan`)
    b_chunk = 0 if n_h * n_b <= sms else sms // n_h
    fits = n_h <= sms
    pers = fits if persistent is None else (persistent and fits)
    kc = KC or min(KC_GPU if not backward else max(32, KC_GPU * 16 // bb), max(16, hp))
    if resident is None:
        resident = proj_weight_bytes(H, P, bh, bp, kc, dtype, backward) <= RESIDENT_SMEM
    if not resident and KC is None:
        kc = stream_kc(4, max(bh, bp), backward, dtype)
    nw = num_warps or (4 if backward and resident and bb <= 32 else 8)
    if backward:  # dgates chunks of every gate, as in the unprojected backward
        per_chunk = 4 * bb * kc * _element_size(dtype)
        cpt = min(triton.cdiv(H, kc), INFLIGHT_BYTES * 32 * nw // per_chunk)
    else:  # m (h) chunks, staged in shared memory; a power of two (the 3-D dot's batch)
        cpt = min(triton.cdiv(H, kc), PROJ_STAGE_BYTES // (bb * kc * _element_size(dtype)))
        cpt = 1 << max(0, cpt.bit_length() - 1)
    if poll is None:
        # 64-row tiles barrier-synchronised: polled, their loads went out in several times
        # as many waves on sm_90 (forward 5 -> 13 a step, more than two barriers cost)
        poll = bb < 64
    plan = Plan(bh, bb, n_h, n_b, resident, pers, kc, nw, False, chunks_per_trip or max(1, cpt), bp,
                poll=poll, b_chunk=b_chunk)  # fmt: skip
    assert plan.n_h * plan.BP >= P, plan
    return plan


def stream_kc(G: int, BH: int, backward: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    """K chunk when weights are streamed: each thread holds a (KC, N) weight chunk and its
    pointers, KC*N/128 of each; wider N needs shorter chunks to stay spill-free on sm_90
    (values found with tests/test_sm90_compile.py)."""
    if backward:
        return 64 if (BH <= 8 or _element_size(dtype) <= 2) else 16
    return max(16, min(64, 4096 // (_next_pow2(G) * BH)))


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
    return cells.unpack_workspace(cell, workspace, H)


_FIT_CACHE: dict = {}


def _fit(kernel, plan: Plan, args, kw, device) -> Plan:
    """The plan checked against the compiled kernel (GPU only): shared memory within the
    device's limit and no spills, else stream the weights; persistent launches only as many
    batch tiles as can be resident at once (all their programs), counting programs per SM
    from the kernel's real shared memory and registers (so two per SM where they fit); one
    launch per step only if not even one batch tile's programs can."""
    if device.type != "cuda":
        return plan
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel), plan,
           tuple(sorted((k, str(v)) for k, v in kw.items())), args[0].dtype)  # fmt: skip
    if key in _FIT_CACHE:
        return _FIT_CACHE[key]
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    max_smem = props["max_shared_mem"]
    sm_smem = torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    fitted = plan
    for _ in range(4):  # a few downgrades at most
        grid = (fitted.n_h, fitted.tiles_per_launch)
        try:
            sync = torch.zeros(2, dtype=torch.int32, device=device)
            pkw = _plan_kw(fitted, kw)
            k = kernel.warmup(*args, sync, 1, 1, 1, 0, 1, 1, grid=grid,
                              USE_BARRIER=_uses_barrier(fitted, pkw),
                              num_warps=fitted.num_warps, num_stages=1, **pkw)  # fmt: skip
            k._init_handles()
            ok = k.metadata.shared <= max_smem and getattr(k, "n_spills", 0) == 0
        except triton.runtime.errors.OutOfResources:
            ok, k = False, None
        if ok or fitted.on_chip:
            break
        bwd = "CHUNKS_PER_TRIP" in kw
        if k is not None and k.n_spills and fitted.chunks_per_trip > 1 and bwd:
            # spilled: fewer dgates loads in flight first
            fitted = Plan(**{**fitted.__dict__, "chunks_per_trip": fitted.chunks_per_trip // 2})
        elif fitted.resident:
            fitted = Plan(**{**fitted.__dict__, "resident": False,
                             "KC": stream_kc(kw["G"], fitted.BH, "CHUNKS_PER_TRIP" in kw,
                                             args[0].dtype)})  # fmt: skip
        else:
            break
    if k is not None and fitted.persistent and fitted.nprog > 1 and not fitted.on_chip:
        # (on chip, programs never wait for each other: any number may run)
        per_sm = min(sm_smem // max(1, k.metadata.shared + 1024),
                     65536 // max(1, k.n_regs * 32 * fitted.num_warps))  # fmt: skip
        resident = sms * max(1, per_sm)
        if fitted.nprog > resident:
            if fitted.n_h <= resident:
                fitted = dataclasses.replace(fitted, b_chunk=resident // fitted.n_h)
            else:
                fitted = dataclasses.replace(fitted, persistent=False)
    _FIT_CACHE[key] = fitted
    return fitted


def _polls(plan: Plan) -> bool:
    """Whether the forward kernel polls its exchange rows (POLL) under this plan."""
    return plan.poll and plan.resident and not plan.on_chip


def _uses_barrier(plan: Plan, kw: dict) -> bool:
    return plan.persistent and plan.nprog > 1 and not plan.on_chip and not kw.get("POLL")


def _plan_kw(plan: Plan, kw: dict) -> dict:
    out = dict(kw, KC=plan.KC, BH=plan.BH, BLOCK_B=plan.BLOCK_B, RESIDENT=plan.resident,
               ON_CHIP=plan.on_chip)  # fmt: skip
    out["NKC"] = triton.cdiv(kw["H"], plan.KC)
    if "POLL" in kw:  # the unprojected kernels
        out["POLL"] = _polls(plan)
    if "P" in kw:  # LSTM with projection
        out["BP"] = plan.BP
        out["NKP"] = triton.cdiv(kw["P"], plan.KC)
    if "CHUNKS_PER_TRIP" in kw:
        out["CHUNKS_PER_TRIP"] = plan.chunks_per_trip
    return out


def _batch_chunks(plan: Plan, B: int, args, batch_axes):
    """(rows, args) per persistent launch: the launch's first batch row is where its
    pointers start (a view from row b0 on, along each argument's batch axis, None for
    arguments without one); the kernels keep B for strides and mask rows >= `rows`."""
    if len(batch_axes) != len(args):
        raise ValueError("one batch axis (or None) per kernel argument")
    step = plan.tiles_per_launch * plan.BLOCK_B
    for b0 in range(0, B, step):
        if b0 == 0:
            yield min(B, step), args
        else:
            yield min(B - b0, step), tuple(
                a if ax is None else a.narrow(ax, b0, a.shape[ax] - b0)
                for a, ax in zip(args, batch_axes)
            )  # fmt: skip


def _launch_persistent(kernel, plan: Plan, T, B, n_steps, args, kw, spin_max, device,
                       batch_axes, use_barrier, check, barriers_per_step):  # fmt: skip
    """The persistent launches of a plan: its batch tiles in turns, as many per launch as can
    be resident at once, each launch with its own barrier counter and error flag."""
    if barriers_per_step * n_steps * plan.nprog >= _SYNC_ERROR:
        raise ValueError("sequence too long for one persistent launch")
    chunks = list(_batch_chunks(plan, B, args, batch_axes))
    sync = torch.zeros(2 * len(chunks), dtype=torch.int32, device=device)
    for c, (rows, chunk_args) in enumerate(chunks):
        grid = (plan.n_h, triton.cdiv(rows, plan.BLOCK_B))
        kernel[grid](*chunk_args, sync[2 * c :], T, B, rows, 0, n_steps, spin_max,
                     USE_BARRIER=use_barrier, num_warps=plan.num_warps, num_stages=1,
                     **kw)  # fmt: skip
    if check:
        _check_barrier(sync, plan, device)


def _launch_steps(kernel, plan: Plan, T: int, B: int, n_steps: int, args, kw, spin_max: int,
                  device, batch_axes):  # fmt: skip
    """Run steps [0, n_steps): persistent launches (the batch tiles in turns if not all fit
    at once), each with its exchange per step (polled, a grid barrier, or nothing with one
    program), or one launch per step. Raises if a wait timed out. `plan` is the fitted one
    (`_fit`: the launchers fit it first, since it decides how they fill the buffers)."""
    kw = _plan_kw(plan, kw)
    if plan.persistent:
        use_barrier = _uses_barrier(plan, kw)
        _launch_persistent(kernel, plan, T, B, n_steps, args, kw, spin_max, device, batch_axes,
                           use_barrier, use_barrier or kw.get("POLL"),
                           barriers_per_step=1)  # fmt: skip
    else:
        if plan.on_chip:
            raise ValueError("an on-chip plan keeps state in registers: it must be persistent")
        sync = torch.zeros(2, dtype=torch.int32, device=device)
        grid = (plan.n_h, plan.n_b)
        for s in range(n_steps):
            kernel[grid](*args, sync, T, B, B, s, s + 1, spin_max,
                         USE_BARRIER=False, num_warps=plan.num_warps, num_stages=1,
                         **kw)  # fmt: skip


def _check_barrier(sync: torch.Tensor, plan: Plan, device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if int(sync.max().item()) >= _SYNC_ERROR:
        raise RuntimeError(
            f"gpurnn triton: grid barrier timed out ({plan.nprog} programs did not all "
            "run concurrently: is another kernel holding SMs, or MPS/green contexts "
            "limiting them?). Results are invalid. Set make_plan(persistent=False) "
            "or raise GPURNN_TRITON_SPIN_MAX."
        )


def _launch_phases(kernel, plan: Plan, T: int, B: int, n_steps: int, args, kw, spin_max: int,
                   device, batch_axes):  # fmt: skip
    """`_launch_steps` for the projected LSTM kernels (two phases, so two grid barriers, per
    step): persistent launches, or two launches per step (one per phase)."""
    if plan.on_chip:
        raise ValueError("the projected LSTM kernels have no on-chip plan")
    kw = _plan_kw(plan, kw)
    if plan.persistent:
        use_barrier = plan.nprog > 1
        use_barrier = use_barrier and not kw.get("POLL")
        _launch_persistent(kernel, plan, T, B, n_steps, args, kw, spin_max, device, batch_axes,
                           use_barrier, use_barrier or kw.get("POLL"),
                           barriers_per_step=2)  # fmt: skip
    else:
        sync = torch.zeros(2, dtype=torch.int32, device=device)
        grid = (plan.n_h, plan.n_b)
        for s in range(n_steps):
            for phase in (1, 2):
                kernel[grid](*args, sync, T, B, B, s, s + 1, spin_max, USE_BARRIER=False,
                             num_warps=plan.num_warps, num_stages=1,
                             **{**kw, "PHASES": phase})  # fmt: skip


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
    w_hr: torch.Tensor | None = None,
    plan: Plan | None = None,
    precision: str = "tf32",
    spin_max: int | None = None,
):
    """Returns y (T, B, H), h_T (B, H), c_T (B, H) or None, workspace ((0,) unless save),
    all in xg.dtype. Inputs must be contiguous (the backend makes them so).

    h_{t-1} is exchanged through a (T+1)-row buffer whose first row in processing order
    (0, or T in reverse) holds h0: the step loop has no special first step. y is a view of
    the other T rows, except in reverse with lengths (see SEPARATE_Y in the kernel).

    LSTM with projection (w_hr (P, H), w_hh (4H, P), h0 (B, P)): y and h_T are P wide, the
    workspace is the unprojected LSTM's (m = o * tanh(c) follows from it)."""
    if w_hr is not None:
        return _forward_proj(xg, w_hh, w_hr, h0, c0, lengths, reverse, save, plan, precision,
                             spin_max)  # fmt: skip
    T, B, GH = xg.shape
    H = w_hh.shape[1]
    G = GATES[cell]
    assert GH == G * H and w_hh.shape[0] == G * H, (xg.shape, w_hh.shape)
    dev, dt = xg.device, xg.dtype
    plan = plan or make_plan(H, B, G, dt, dev)
    NW = len(WS_FIELDS[cell])
    acc_t = torch.float64 if dt == torch.float64 else torch.float32
    # running state (also the final state), starting from h0 / c0
    hs = h0.to(acc_t).clone() if h0 is not None else torch.zeros(B, H, dtype=acc_t, device=dev)
    cs = hs
    if cell == "lstm":
        cs = c0.to(acc_t).clone() if c0 is not None else torch.zeros_like(hs)
    ws = _alloc(workspace_shape(cell, T, B, H), dt, dev) if save else xg.new_empty((0,))
    if T == 0:
        return xg.new_empty((0, B, H)), hs.to(dt), (cs.to(dt) if cell == "lstm" else None), ws
    hx = _alloc((T + 1, B, H), dt, dev)
    first = T if reverse else 0
    if lengths is not None and reverse:
        y = _alloc((T, B, H), dt, dev)
    else:
        y = hx[:T] if reverse else hx[1:]
    dummy = xg
    if cell == "gru":
        bhn = b_hn if b_hn is not None else torch.zeros(H, dtype=dt, device=dev)
    else:
        bhn = dummy
    args = (
        xg, w_hh, bhn, lengths if lengths is not None else dummy,
        hx, y, hs, cs, ws if save else dummy,
    )  # fmt: skip
    kw = dict(
        CELL=CELL_CODE[cell], G=G, GP=_next_pow2(G), NW=NW, H=H,
        HAS_LEN=lengths is not None, REVERSE=bool(reverse), SAVE=bool(save),
        PREC=_prec(dt, precision), ACC=_acc_dtype(dt), POLL=False, ASM=not interpreting(),
        SENTINEL=_SENTINEL[dt],
    )  # fmt: skip
    plan = _fit(_recurrence_fwd_kernel, plan, args, kw, dev)
    _fill_polled(plan, dt, hx)  # every row but h0's
    _put_h0(plan, dt, hx[first], h0)
    has_len = lengths is not None
    axes = (1, None, None, 0 if has_len else None, 1, 1, 0, 0, 1 if save else None)
    _launch_steps(_recurrence_fwd_kernel, plan, T, B, T, args, kw,
                  SPIN_MAX if spin_max is None else spin_max, dev, axes)  # fmt: skip
    return y, hs.to(dt), (cs.to(dt) if cell == "lstm" else None), ws


def _fill_polled(plan: Plan, dtype: torch.dtype, *buffers) -> None:
    """Exchange buffers a polling plan reads start as the sentinel (None entries skipped)."""
    if _polls(plan):
        for b in buffers:
            if b is not None:
                b.view(_BITS[dtype]).fill_(_SENTINEL[dtype])


def _put_h0(plan: Plan, dtype: torch.dtype, row: torch.Tensor, h0) -> None:
    """h0 (or zeros) into the exchange row that holds it. Polled, the caller's bits must not
    look pending: a sentinel among them becomes a plain NaN."""
    if h0 is None:
        row.zero_()
        return
    row.copy_(h0)
    if _polls(plan):
        row.masked_fill_(row.view(_BITS[dtype]) == _SENTINEL[dtype], float("nan"))


def _forward_proj(xg, w_hh, w_hr, h0, c0, lengths, reverse, save, plan, precision, spin_max):
    T, B, GH = xg.shape
    P, H = w_hr.shape
    assert GH == 4 * H and tuple(w_hh.shape) == (4 * H, P), (xg.shape, w_hh.shape, w_hr.shape)
    dev, dt = xg.device, xg.dtype
    plan = plan or make_plan(H, B, 4, dt, dev, proj_size=P)
    cpt = plan.chunks_per_trip
    if cpt & (cpt - 1):
        raise ValueError(f"chunks_per_trip must be a power of two here (the batch of a 3-D "
                         f"dot), got {cpt}")  # fmt: skip
    acc_t = torch.float64 if dt == torch.float64 else torch.float32
    hs = h0.to(acc_t).clone() if h0 is not None else torch.zeros(B, P, dtype=acc_t, device=dev)
    cs = c0.to(acc_t).clone() if c0 is not None else torch.zeros(B, H, dtype=acc_t, device=dev)
    ws = _alloc(workspace_shape("lstm", T, B, H), dt, dev) if save else xg.new_empty((0,))
    if T == 0:
        return xg.new_empty((0, B, P)), hs.to(dt), cs.to(dt), ws
    hx = _alloc((T + 1, B, P), dt, dev)
    first = T if reverse else 0
    if lengths is not None and reverse:
        y = _alloc((T, B, P), dt, dev)
    else:
        y = hx[:T] if reverse else hx[1:]
    # m exchange: one row per step when polled (each written once), else per step parity
    mx = _alloc((T if _polls(plan) else 2, B, H), dt, dev)
    dummy = xg
    args = (
        xg, w_hh, w_hr, lengths if lengths is not None else dummy,
        hx, y, mx, hs, cs, ws if save else dummy,
    )  # fmt: skip
    kw = dict(
        G=4, GP=4, NW=len(WS_FIELDS["lstm"]), H=H, P=P, CHUNKS_PER_TRIP=plan.chunks_per_trip,
        HAS_LEN=lengths is not None, REVERSE=bool(reverse), SAVE=bool(save), PHASES=3,
        PREC=_prec(dt, precision), ACC=_acc_dtype(dt), POLL=False, ASM=not interpreting(),
        SENTINEL=_SENTINEL[dt],
    )  # fmt: skip
    fitted = _fit(_lstmp_fwd_kernel, plan, args, kw, dev)
    if _polls(fitted) != _polls(plan):  # weights streamed after all: m by step parity
        mx = _alloc((T if _polls(fitted) else 2, B, H), dt, dev)
        args = args[:6] + (mx,) + args[7:]
    plan = fitted
    _fill_polled(plan, dt, hx, mx)
    _put_h0(plan, dt, hx[first], h0)
    axes = (1, None, None, 0 if lengths is not None else None, 1, 1, 1, 0, 0,
            1 if save else None)  # fmt: skip
    _launch_phases(_lstmp_fwd_kernel, plan, T, B, T, args, kw,
                   SPIN_MAX if spin_max is None else spin_max, dev, axes)  # fmt: skip
    return y, hs.to(dt), cs.to(dt), ws


def _backward_proj(w_hh, w_hr, c0, lengths, reverse, y, workspace, dy, dh_T, dc_T, plan,
                   precision, spin_max):  # fmt: skip
    T, B, P = y.shape
    H = w_hr.shape[1]
    dev, dt = y.device, y.dtype
    plan = plan or make_plan(H, B, 4, dt, dev, backward=True, proj_size=P)
    acc_t = torch.float64 if dt == torch.float64 else torch.float32
    dxg = _alloc((T, B, 4 * H), dt, dev)
    dhp = _alloc((T, B, P), dt, dev)
    dhs = dh_T.to(acc_t).clone()
    dcs = dc_T.to(acc_t).clone() if dc_T is not None else torch.zeros(B, H, dtype=acc_t,
                                                                       device=dev)  # fmt: skip
    if T == 0:
        return dxg, dhp, dhs, dcs
    c0_ = c0 if c0 is not None else torch.zeros(B, H, dtype=dt, device=dev)
    args = (
        w_hh, w_hr, c0_, lengths if lengths is not None else y, workspace, dy,
        dxg, dhp, dhs, dcs,
    )  # fmt: skip
    kw = dict(
        G=4, GP=4, NW=len(WS_FIELDS["lstm"]), H=H, P=P, CHUNKS_PER_TRIP=plan.chunks_per_trip,
        HAS_LEN=lengths is not None, REVERSE=bool(reverse), PHASES=3,
        PREC=_prec(dt, precision), ACC=_acc_dtype(dt), POLL=False, ASM=not interpreting(),
        SENTINEL=_SENTINEL[dt],
    )  # fmt: skip
    plan = _fit(_lstmp_bwd_kernel, plan, args, kw, dev)
    _fill_polled(plan, dt, dxg, dhp)
    axes = (None, None, 0, 0 if lengths is not None else None, 1, 1, 1, 1, 0, 0)
    _launch_phases(_lstmp_bwd_kernel, plan, T, B, T + 1, args, kw,
                   SPIN_MAX if spin_max is None else spin_max, dev, axes)  # fmt: skip
    return dxg, dhp, dhs, dcs


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
    w_hr: torch.Tensor | None = None,
    plan: Plan | None = None,
    precision: str = "tf32",
    spin_max: int | None = None,
):
    """Recurrent part of backward-through-time. Returns
      dxg (T, B, G*H)  gradient of the pre-activations = of xg (0 past a sequence's end),
      dhn (T, B, H) or None  GRU only: dn_pre * r, the n block of d(W_hh h) (for dW_hh, db_hn),
      dh0 (B, H), dc0 (B, H) or None   (fp32 / fp64).
    d(W_hh h)[t] is dxg[t] with (GRU) its n block replaced by dhn[t]; weight gradients are
    GEMMs of it against h_{t-1} (done by the caller).

    LSTM with projection (w_hr given; y, dy, dh_T P wide): the second output is instead dhp
    (T, B, P), the gradient of each step's projected output h_t (0 past a sequence's end):
    dW_hr = sum over t of dhp[t]^T m_t, m_t = o_t * tanh(c_t) from the workspace; dh0 is
    (B, P)."""
    if w_hr is not None:
        return _backward_proj(w_hh, w_hr, c0, lengths, reverse, y, workspace, dy, dh_T, dc_T,
                              plan, precision, spin_max)  # fmt: skip
    T, B, H = y.shape
    G = GATES[cell]
    dev, dt = y.device, y.dtype
    plan = plan or make_plan(H, B, G, dt, dev, backward=True)
    NW = len(WS_FIELDS[cell])
    acc_t = torch.float64 if dt == torch.float64 else torch.float32
    dxg = _alloc((T, B, G * H), dt, dev)
    dhn = _alloc((T, B, H), dt, dev) if cell == "gru" else None
    # carries, starting from dh_T / dc_T (also dh0 / dc0 at the end)
    dhs = dh_T.to(acc_t).clone()
    dcs = dhs
    if cell == "lstm":
        dcs = dc_T.to(acc_t).clone() if dc_T is not None else torch.zeros_like(dhs)
    if T == 0:
        return dxg, dhn, dhs, (dcs if cell == "lstm" else None)
    zeros = None
    if h0 is None or (cell == "lstm" and c0 is None):
        zeros = torch.zeros(B, H, dtype=dt, device=dev)
    args = (
        w_hh, h0 if h0 is not None else zeros,
        (c0 if c0 is not None else zeros) if cell == "lstm" else y,
        lengths if lengths is not None else y, y, workspace, dy,
        dxg, dhn if dhn is not None else y, dhs, dcs,
    )  # fmt: skip
    kw = dict(
        CELL=CELL_CODE[cell], G=G, GP=_next_pow2(G), NW=NW, H=H,
        CHUNKS_PER_TRIP=plan.chunks_per_trip,
        HAS_LEN=lengths is not None, REVERSE=bool(reverse), PREC=_prec(dt, precision),
        ACC=_acc_dtype(dt), POLL=False, ASM=not interpreting(), SENTINEL=_SENTINEL[dt],
    )  # fmt: skip
    plan = _fit(_recurrence_bwd_kernel, plan, args, kw, dev)
    # every dgates element is written once, by the step that owns it: polled
    _fill_polled(plan, dt, dxg, dhn)
    # T + 1 steps: the last one only folds the first step's dgates into dh0
    axes = (None, 0, 0 if cell == "lstm" else None, 0 if lengths is not None else None, 1, 1,
            1, 1, 1 if dhn is not None else None, 0, 0)  # fmt: skip
    _launch_steps(_recurrence_bwd_kernel, plan, T, B, T + 1, args, kw,
                  SPIN_MAX if spin_max is None else spin_max, dev, axes)  # fmt: skip
    return dxg, dhn, dhs, (dcs if cell == "lstm" else None)
