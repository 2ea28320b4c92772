"""The launchers: `forward` and `backward` of the primitive (plain and projected kernels), which
allocate the outputs and exchange buffers, fill what a polling plan reads with the sentinel,
fit the plan (`_fit`) and run the launches; and the workspace's shape and fields. Host code;
imports the planner (plan), the kernels (forward, backward, projected) and the sentinel table
(exchange). Inputs must be contiguous (the backend makes them so).

- Batch tiles never exchange anything, so when a grid would not fit the GPU at once the
  launcher runs persistent launches over a few batch tiles each (`b_chunk`): a launch's
  pointers start at its first batch row, B stays the row stride and `nrows` says how many
  rows the launch covers.
- Kernels take a step range [s_begin, s_end): the persistent launch covers all steps; the
  per-step fallback launches one step at a time, carrying state between launches in the
  fp32 state buffers (`hs`, `cs`, `dhs`, `dcs`), which the launcher fills with h0/c0
  (dh_T/dc_T) first and which end as the final-state outputs.

Workspace (what backward reads): (T, B, NW*H) in the input dtype, field k of unit j at
column k*H + j, the fields as gpurnn.cells lists them (WS_FIELDS; `unpack_workspace` names
them): lstm NW=5 i, f, g, o, c; gru NW=4 r, z, n, hn; rnn NW=1 h (the activation, before
rounding to the output dtype). Entries of (t, b) past a sequence's end are 0. With
LayerNorm it is in the accumulation dtype and adds G fields, the normalized h W_hhᵀ (gate
g of unit j at column (NW + g)*H + j), then per row 1/σ_hh and, with LN_c, μ_c and 1/σ_c
(`workspace_shape`).
"""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from gpurnn import cells, masks
from gpurnn.cells import GATES

from .backward import _recurrence_bwd_kernel
from .cell_math import CELL_CODE
from .exchange import _BITS, _SENTINEL, _SYNC_ERROR
from .forward import _recurrence_fwd_kernel
from .interpreter import interpreting
from .plan import Plan, _cooperative, _fit, _next_pow2, _plan_kw, _polls, _uses_barrier, make_plan
from .projected import _lstmp_bwd_kernel, _lstmp_fwd_kernel

# the workspace fields per cell, all of them (the plain RNN's h too): gpurnn.cells' table
WS_FIELDS = {cell: cells.saved_fields(cell) for cell in cells.CELLS}

# Tests set this: every output is allocated NaN-filled, so an element a kernel forgets to
# write fails the comparison. GPURNN_DEBUG_POISON=1 does the same.
POISON = os.environ.get("GPURNN_DEBUG_POISON") == "1"

# How long a program waits for the others' data (a grid barrier or a poll) before the launch
# is flagged failed and the launcher raises: a time on the GPU (%globaltimer), 1 s unless
# GPURNN_TRITON_WAIT_S says otherwise (at most ~35 minutes: µs in an int32). The interpreter
# has no timer and runs programs one after another (a wait there is never satisfied by
# another program), so it counts polls instead: GPURNN_TRITON_WAIT_POLLS, 100 by default.
WAIT_US = max(0, min(int(float(os.environ.get("GPURNN_TRITON_WAIT_S", "1")) * 1e6), 2**31 - 1))
WAIT_POLLS = int(os.environ.get("GPURNN_TRITON_WAIT_POLLS", "100"))


def _wait_bound(wait_bound: int | None) -> int:
    """The kernels' wait bound: µs compiled, polls under the interpreter (see WAIT_US)."""
    if wait_bound is not None:
        return wait_bound
    return WAIT_POLLS if interpreting() else WAIT_US


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype: torch.dtype, precision: str) -> str:
    # input_precision only means something for fp32 inputs (tf32 by default, "ieee" exact)
    return precision if dtype == torch.float32 else "ieee"


def _alloc(shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def workspace_shape(cell: str, T: int, B: int, H: int, layer_norm: bool = False,
                    ln_c: bool = False) -> tuple[int, int, int]:  # fmt: skip
    """(T, B, NW*H), with LayerNorm (LN_FIELDS) (T, B, (NW + G)*H + 1), + 2 more with LN_c."""
    if not layer_norm:
        return (T, B, len(WS_FIELDS[cell]) * H)
    return (T, B, (len(WS_FIELDS[cell]) + GATES[cell]) * H + _ln_numbers(ln_c))


def _ln_numbers(ln_c: bool) -> int:
    """Per-row numbers of a LayerNorm workspace after its fields: 1/σ_hh (μ_c, 1/σ_c)."""
    return 3 if ln_c else 1


def unpack_layer_norm(cell: str, workspace: torch.Tensor, H: int) -> dict[str, torch.Tensor]:
    """A LayerNorm workspace's own part (`workspace_shape`), as views: "normalized" (T, B,
    G*H), the normalized h W_hhᵀ; "rstd_hh" (T, B); with LN_c "mu_c", "rstd_c" (T, B)."""
    T, B, width = workspace.shape
    first = len(WS_FIELDS[cell]) * H
    numbers = first + GATES[cell] * H
    out = dict(normalized=workspace[..., first:numbers], rstd_hh=workspace[..., numbers])
    if width - numbers == _ln_numbers(True):
        out.update(mu_c=workspace[..., numbers + 1], rstd_c=workspace[..., numbers + 2])
    return out


def unpack_workspace(cell: str, workspace: torch.Tensor, H: int) -> dict[str, torch.Tensor]:
    """Every step's gate activations and cell states from a saved workspace (T, B, NW*H),
    as (T, B, H) views, named as in WS_FIELDS: lstm i, f, g, o, c (c after the step);
    gru r, z, n, hn (= W_hn h + b_hn); rnn h. Entries past a sequence's end are 0."""
    return cells.unpack_workspace(cell, workspace, H)


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


def _launch_persistent(kernel, plan: Plan, T, B, n_steps, args, kw, wait_bound, device,
                       batch_axes, use_barrier, check, barriers_per_step,
                       defer=False):  # fmt: skip
    """The persistent launches of a plan: its batch tiles in turns, as many per launch as can
    be resident at once, each launch with its own barrier counter and error flag (word 0 of
    its two in `sync`, which is returned; word 1 counts failed polls under COUNT_POLLS)."""
    if barriers_per_step * n_steps * plan.nprog >= _SYNC_ERROR:
        raise ValueError("sequence too long for one persistent launch")
    chunks = list(_batch_chunks(plan, B, args, batch_axes))
    sync = torch.zeros(2 * len(chunks), dtype=torch.int32, device=device)
    for c, (rows, chunk_args) in enumerate(chunks):
        grid = (plan.n_h, triton.cdiv(rows, plan.BLOCK_B))
        kernel[grid](*chunk_args, sync[2 * c :], T, B, rows, 0, n_steps, wait_bound,
                     USE_BARRIER=use_barrier, num_warps=plan.num_warps, num_stages=1,
                     launch_cooperative_grid=_cooperative(plan), **kw)  # fmt: skip
    if check:
        _check_barrier(sync, plan, device, kernel, wait_bound, defer)
    return sync


def _launch_steps(kernel, plan: Plan, T: int, B: int, n_steps: int, args, kw, wait_bound: int,
                  device, batch_axes, defer=False, ln_exchanges: int = 0):  # fmt: skip
    """Run steps [0, n_steps): persistent launches (the batch tiles in turns if not all fit
    at once), each with its exchange per step (polled, a grid barrier, or nothing with one
    program), or one launch per step. Raises if a wait timed out. `plan` is the fitted one
    (`_fit`: the launchers fit it first, since it decides how they fill the buffers).
    ln_exchanges: LayerNorm's exchanges of statistics per step (one more barrier each; the
    per-step fallback runs a step in that many stopping launches, then a whole one).
    Returns the sync words (`_launch_persistent`)."""
    kw = _plan_kw(plan, kw)
    if plan.persistent:
        use_barrier = _uses_barrier(plan, kw)
        return _launch_persistent(kernel, plan, T, B, n_steps, args, kw, wait_bound, device,
                                  batch_axes, use_barrier, use_barrier or kw.get("POLL"),
                                  barriers_per_step=1 + ln_exchanges, defer=defer)  # fmt: skip
    else:
        if plan.on_chip:
            raise ValueError("an on-chip plan keeps state in registers: it must be persistent")
        sync = torch.zeros(2, dtype=torch.int32, device=device)
        grid = (plan.n_h, plan.n_b)
        stops = [{"LN_STOP": k} for k in range(1, ln_exchanges + 1)] + [{}]
        for s in range(n_steps):
            for stop in stops:
                kernel[grid](*args, sync, T, B, B, s, s + 1, wait_bound,
                             USE_BARRIER=False, num_warps=plan.num_warps, num_stages=1,
                             **kw, **stop)  # fmt: skip
        return sync


# Error flags of launches whose check was deferred (`defer_check`): (flag on the device,
# the message to raise), checked together by `check_pending`.
_PENDING: list[tuple[torch.Tensor, str]] = []
_PENDING_LOCK = threading.Lock()  # modules may run in several threads
_MAX_PENDING = 256  # beyond this many unchecked launches, check them (bounds the list)


def _check_barrier(sync: torch.Tensor, plan: Plan, device, kernel, wait_bound: int,
                   defer: bool = False) -> None:  # fmt: skip
    """Raise if a wait of the launches timed out (their counters >= SYNC_ERROR). On a GPU
    that is a host sync; `defer` queues the flag instead (no sync) for `check_pending`.
    Skipped while a CUDA graph is captured."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    message = _timeout_message(kernel, plan, wait_bound)
    if defer and device.type == "cuda":
        with _PENDING_LOCK:
            _PENDING.append((sync[0::2].amax(), message))
            full = len(_PENDING) >= _MAX_PENDING
        if full:
            check_pending()
        return
    if int(sync[0::2].max().item()) >= _SYNC_ERROR:
        raise RuntimeError(message)


def check_pending() -> None:
    """Raise the first timed-out wait among the launches whose check was deferred
    (`defer_check=True`) since the last call: one host sync for all of them (per device).
    gpurnn.functional calls it (through the backend) once per module call."""
    if not _PENDING:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    with _PENDING_LOCK:
        pending = list(_PENDING)
        _PENDING.clear()
    by_device: dict = {}
    for flag, message in pending:
        by_device.setdefault(flag.device, []).append((flag, message))
    for entries in by_device.values():
        flags = torch.stack([f for f, _ in entries]).cpu()
        for (_, message), v in zip(entries, flags.tolist()):
            if v >= _SYNC_ERROR:
                raise RuntimeError(message)


def _kernel_name(kernel) -> str:
    return getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))


def _timeout_message(kernel, plan: Plan, wait_bound: int) -> str:
    wait = f"{wait_bound} polls" if interpreting() else f"{wait_bound / 1e6:g} s"
    return (
        f"gpurnn triton: a wait timed out in {_kernel_name(kernel)} ({plan.nprog} programs "
        f"that wait for each other did not all run concurrently within {wait}: another "
        "kernel holding SMs, MPS or green contexts limiting them, or a program that died?). "
        f"Results are invalid. Plan: {plan}. Use make_plan(persistent=False), or raise "
        "GPURNN_TRITON_WAIT_S."
    )


def _launch_phases(kernel, plan: Plan, T: int, B: int, n_steps: int, args, kw, wait_bound: int,
                   device, batch_axes, defer=False, ln_exchanges: int = 0,
                   ln_phase: int = 1):  # fmt: skip
    """`_launch_steps` for the projected LSTM kernels (two phases, so two grid barriers, per
    step, and one more per LayerNorm exchange of statistics): persistent launches, or two
    launches per step (one per phase), phase ln_phase (LayerNorm's: the forward's gates, the
    backward's gate backward) after its stopping launches (`_launch_steps`)."""
    if plan.on_chip:
        raise ValueError("the projected LSTM kernels have no on-chip plan")
    kw = _plan_kw(plan, kw)
    if plan.persistent:
        use_barrier = plan.nprog > 1
        use_barrier = use_barrier and not kw.get("POLL")
        return _launch_persistent(kernel, plan, T, B, n_steps, args, kw, wait_bound, device,
                                  batch_axes, use_barrier, use_barrier or kw.get("POLL"),
                                  barriers_per_step=2 + ln_exchanges, defer=defer)  # fmt: skip
    else:
        sync = torch.zeros(2, dtype=torch.int32, device=device)
        grid = (plan.n_h, plan.n_b)
        launches = []
        for phase in (1, 2):
            if phase == ln_phase:
                launches += [{"PHASES": phase, "LN_STOP": k} for k in range(1, ln_exchanges + 1)]
            launches.append({"PHASES": phase})
        for s in range(n_steps):
            for launch_kw in launches:
                kernel[grid](*args, sync, T, B, B, s, s + 1, wait_bound, USE_BARRIER=False,
                             num_warps=plan.num_warps, num_stages=1,
                             **{**kw, **launch_kw})  # fmt: skip
        return sync


def _regularized(cell, acc_t, dev, H, zoneout, zoneout_h, zoneout_c, recurrent_dropout,
                 recurrent_mask, dummy, H_out=None):  # fmt: skip
    """The regularized kernels' extra arguments (zh, zc, rmask, rates: masks packed as
    gpurnn.masks keeps them, rates = [zoneout p, 1/(1 − recurrent dropout p)] in the
    accumulation dtype), their batch axes, the switches ZONEOUT / RDROP, and the factors
    (B, H_out) by which h enters W_hh (None without recurrent dropout). H_out: the width of
    h (P with a projection; H by default); c's masks are H wide."""
    H_out = H_out or H
    if zoneout_h is not None and (
        zoneout_h.shape[-1] != masks.packed_width(H_out)
        or (cell == "lstm") != (zoneout_c is not None)
        or (zoneout_c is not None and zoneout_c.shape[-1] != masks.packed_width(H))
    ):
        raise ValueError("zoneout needs packed (T, B, ⌈H/8⌉) masks of h, and of c for lstm")
    rates = torch.tensor([zoneout, masks.dropout_scale(recurrent_dropout)], dtype=acc_t,
                         device=dev)  # fmt: skip
    r_keep = None
    if recurrent_mask is not None:
        r_keep = masks.dropout_factors(recurrent_mask, H_out, recurrent_dropout, acc_t)
    zone = 1 if zoneout_h is not None else 2 if zoneout > 0 else 0
    args = (
        zoneout_h if zoneout_h is not None else dummy,
        zoneout_c if zoneout_c is not None else dummy,
        recurrent_mask if recurrent_mask is not None else dummy,
        rates,
    )
    axes = (1 if zoneout_h is not None else None, 1 if zoneout_c is not None else None,
            0 if recurrent_mask is not None else None, None)  # fmt: skip
    return args, axes, dict(ZONEOUT=zone, RDROP=recurrent_mask is not None), r_keep


def _layer_norm(cell: str, plan: Plan, T: int, B: int, acc_t, dev, ln_hh, ln_c, dummy):
    """LayerNorm's kernel arguments: the parameters (LN_hh's weight and bias, LN_c's; absent
    ones `dummy`) and the statistics buffer (T * NX slots of (B padded to whole batch tiles,
    NHP, 2): norm.py; the caller fills it with the sentinel once the plan is fitted), their
    batch axes, the switches, and NX, the exchanges of statistics per step (LN_hh's, and
    LN_c's)."""
    if ln_hh is None:
        if ln_c is not None:
            raise ValueError("LayerNorm of c needs LayerNorm of W_hh h as well")
        return (dummy,) * 5, (None,) * 5, {}, 0
    nx = 1 + (ln_c is not None)
    rows = triton.cdiv(B, plan.BLOCK_B) * plan.BLOCK_B  # (whole batch tiles: norm.py)
    st = torch.zeros((T * nx, rows, _next_pow2(plan.n_h), 2), dtype=acc_t, device=dev)
    lnc_w, lnc_b = ln_c if ln_c is not None else (dummy, dummy)
    args = (ln_hh[0], ln_hh[1], lnc_w, lnc_b, st)
    kw = dict(LN=True, LN_C=ln_c is not None, NHP=_next_pow2(plan.n_h),
              NS=_ln_numbers(ln_c is not None), LN_SENTINEL=_SENTINEL[acc_t],
              NW=len(WS_FIELDS[cell]) + GATES[cell])  # fmt: skip
    return args, (None, None, None, None, 1), kw, nx


def _backward_layer_norm(cell, plan, T, B, acc_t, dev, ln_hh, ln_c, drec, lng, dummy):
    """`_layer_norm` for the backward kernels: LN_hh's weight, LN_c's weight and bias, drec
    (what W_hh multiplies), the statistics buffer and lng (LN_c's parameter gradients per
    (row, unit)), their batch axes, the switches and NX."""
    args, axes, kw, nx = _layer_norm(cell, plan, T, B, acc_t, dev, ln_hh, ln_c, dummy)
    if not nx:
        return (dummy,) * 6, (None,) * 6, kw, nx
    args = (args[0], args[2], args[3], drec, args[4], lng if lng is not None else dummy)
    return args, (None, None, None, 1, 1, 1 if lng is not None else None), kw, nx


def _check_poll_counter(poll_counter, device) -> None:
    if poll_counter is None:
        return
    if (not isinstance(poll_counter, torch.Tensor) or poll_counter.shape != (1,)
            or poll_counter.dtype not in (torch.int32, torch.int64)
            or poll_counter.device != device):  # fmt: skip
        raise ValueError(f"poll_counter must be an int32 or int64 tensor of shape (1,) on "
                         f"{device}, got {poll_counter!r}")  # fmt: skip


def _add_failed_polls(poll_counter, sync: torch.Tensor) -> None:
    """The launches' failed polls (second sync word of each) into the caller's counter, on
    the device: no host sync."""
    if poll_counter is not None:
        poll_counter.add_(sync[1::2].sum().to(poll_counter.dtype))


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
    wait_bound: int | None = None,
    poll_counter: torch.Tensor | None = None,
    defer_check: bool = False,
    zoneout: float = 0.0,
    zoneout_h: torch.Tensor | None = None,
    zoneout_c: torch.Tensor | None = None,
    recurrent_dropout: float = 0.0,
    recurrent_mask: torch.Tensor | None = None,
    ln_hh: tuple[torch.Tensor, torch.Tensor] | None = None,
    ln_c: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Returns y (T, B, H), h_T (B, H), c_T (B, H) or None, workspace ((0,) unless save),
    all in xg.dtype (the workspace in the accumulation dtype with LayerNorm). Inputs must be
    contiguous (the backend makes them so).

    Regularized (gpurnn.regularized's formulas): zoneout with the packed masks zoneout_h,
    zoneout_c (training) or its rate alone (eval), recurrent dropout with the packed
    (B, ⌈H_out/8⌉) recurrent_mask (training only; H_out = P with w_hr). The LSTM workspace
    then keeps the blended c_t. DropConnect is the caller's: a masked w_hh. LayerNorm (not
    with w_hr): ln_hh = (weight, bias) (G*H,) of h W_hhᵀ, ln_c = (weight, bias) (H,) of c̃_t
    (LSTM); the workspace then adds the normalized h W_hhᵀ and the rows' statistics
    (`workspace_shape`).

    h_{t-1} is exchanged through a (T+1)-row buffer whose first row in processing order
    (0, or T in reverse) holds h0: the step loop has no special first step. y is a view of
    the other T rows, except in reverse with lengths (see SEPARATE_Y in the kernel).

    LSTM with projection (w_hr (P, H), w_hh (4H, P), h0 (B, P)): y and h_T are P wide, the
    workspace is the unprojected LSTM's (m = o * tanh(c) follows from it).

    wait_bound: how long a program waits for the others (µs; polls under the interpreter;
    default WAIT_US / WAIT_POLLS) before the launch fails with a RuntimeError.
    poll_counter: an int32/int64 tensor of shape (1,) on the device, or None (off, the
    kernels compiled without counting): the launches add their failed polls to it, summed
    over programs and steps (attempts that found data still on its way; divide by programs
    x steps for the attempts per step beyond the first), on the device.
    defer_check: on a GPU, do not sync to check for a timed-out wait; `check_pending` raises
    it later (the backend defers, and gpurnn.functional checks once per module call)."""
    if w_hr is not None:
        reg = (zoneout, zoneout_h, zoneout_c, recurrent_dropout, recurrent_mask)
        return _forward_proj(xg, w_hh, w_hr, h0, c0, lengths, reverse, save, plan, precision,
                             wait_bound, poll_counter, defer_check, reg, ln_hh, ln_c)  # fmt: skip
    _check_poll_counter(poll_counter, xg.device)
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
    ws = _workspace(cell, T, B, H, dt, acc_t, dev, save, ln_hh, ln_c)
    if T == 0:
        return xg.new_empty((0, B, H)), hs.to(dt), (cs.to(dt) if cell == "lstm" else None), ws
    hx = _alloc((T + 1, B, H), dt, dev)
    first = T if reverse else 0
    dummy = xg
    reg_args, reg_axes, reg_kw, r_keep = _regularized(
        cell, acc_t, dev, H, zoneout, zoneout_h, zoneout_c, recurrent_dropout,
        recurrent_mask, dummy,
    )  # fmt: skip
    ln_args, ln_axes, ln_kw, ln_x = _layer_norm(cell, plan, T, B, acc_t, dev, ln_hh, ln_c,
                                                dummy)  # fmt: skip
    if (lengths is not None and reverse) or reg_kw["RDROP"]:
        y = _alloc((T, B, H), dt, dev)  # the exchange rows are not y (SEPARATE_Y)
    else:
        y = hx[:T] if reverse else hx[1:]
    if cell == "gru":
        bhn = b_hn if b_hn is not None else torch.zeros(H, dtype=dt, device=dev)
    else:
        bhn = dummy
    args = (
        xg, w_hh, bhn, lengths if lengths is not None else dummy,
        hx, y, hs, cs, ws if save else dummy, *reg_args, *ln_args,
    )  # fmt: skip
    kw = dict(
        CELL=CELL_CODE[cell], G=G, GP=_next_pow2(G), NW=NW, H=H,
        HAS_LEN=lengths is not None, REVERSE=bool(reverse), SAVE=bool(save),
        PREC=_prec(dt, precision), ACC=_acc_dtype(dt), POLL=False, ASM=not interpreting(),
        SENTINEL=_SENTINEL[dt], COUNT_POLLS=poll_counter is not None, **reg_kw,
    )  # fmt: skip
    kw.update(ln_kw)
    plan = _fit(_recurrence_fwd_kernel, plan, args, kw, dev)
    _fill_polled(plan, dt, hx)  # every row but h0's
    if ln_x:
        _fill_stats(plan, acc_t, ln_args[-1], B)
    # what enters W_hh at the first step: h0, masked with recurrent dropout
    _put_h0(plan, dt, hx[first], h0 if r_keep is None or h0 is None else h0 * r_keep)
    has_len = lengths is not None
    axes = (1, None, None, 0 if has_len else None, 1, 1, 0, 0, 1 if save else None, *reg_axes,
            *ln_axes)  # fmt: skip
    sync = _launch_steps(_recurrence_fwd_kernel, plan, T, B, T, args, kw,
                         _wait_bound(wait_bound), dev, axes, defer_check, ln_x)  # fmt: skip
    _add_failed_polls(poll_counter, sync)
    return y, hs.to(dt), (cs.to(dt) if cell == "lstm" else None), ws


def _fill_polled(plan: Plan, dtype: torch.dtype, *buffers) -> None:
    """Exchange buffers a polling plan reads start as the sentinel (None entries skipped)."""
    if _polls(plan):
        for b in buffers:
            if b is not None:
                b.view(_BITS[dtype]).fill_(_SENTINEL[dtype])


def _workspace(cell, T, B, H, dt, acc_t, dev, save, ln_hh, ln_c) -> torch.Tensor:
    """The forward's workspace (`workspace_shape`; (0,) unless save): in the input dtype, in
    the accumulation dtype with LayerNorm (its statistics need it)."""
    ws_dt = acc_t if ln_hh is not None else dt
    if not save:
        return torch.empty((0,), dtype=ws_dt, device=dev)
    return _alloc(workspace_shape(cell, T, B, H, ln_hh is not None, ln_c is not None), ws_dt, dev)


def _ln_grad_buffers(T, B, G, H, dt, acc_t, dev, ln_hh, ln_c):
    """The backward's LayerNorm outputs, allocated: drec (T, B, G*H) and lng, LN_c's
    parameter gradients per (row, unit) (2, B, H), summed as the kernels go (None where
    off)."""
    drec = _alloc((T, B, G * H), dt, dev) if ln_hh is not None else None
    lng = torch.zeros((2, B, H), dtype=acc_t, device=dev) if ln_c is not None else None
    return drec, lng


def _ln_outputs(drec, lng) -> tuple:
    """The backward's outputs after the first four: with LayerNorm drec and LN_c's (weight,
    bias) gradients (None without LN_c), () without."""
    if drec is None:
        return ()
    return drec, ((lng[0].sum(0), lng[1].sum(0)) if lng is not None else None)


def _fill_stats(plan: Plan, acc_t: torch.dtype, st: torch.Tensor, B: int) -> None:
    """LayerNorm's statistics start as the sentinel where a persistent launch polls them;
    one step per launch finds them complete (its stopping launches read zeros where a
    program has not published yet, and drop what follows from them)."""
    if plan.persistent:
        _fill_polled(plan, acc_t, st[:, :B, : plan.n_h])  # (the padding stays 0)


def _put_h0(plan: Plan, dtype: torch.dtype, row: torch.Tensor, h0) -> None:
    """h0 (or zeros) into the exchange row that holds it. Polled, the caller's bits must not
    look pending: a sentinel among them becomes a plain NaN."""
    if h0 is None:
        row.zero_()
        return
    row.copy_(h0)
    if _polls(plan):
        row.masked_fill_(row.view(_BITS[dtype]) == _SENTINEL[dtype], float("nan"))


def _forward_proj(xg, w_hh, w_hr, h0, c0, lengths, reverse, save, plan, precision, wait_bound,
                  poll_counter, defer_check, reg, ln_hh, ln_c):  # fmt: skip
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
    ws = _workspace("lstm", T, B, H, dt, acc_t, dev, save, ln_hh, ln_c)
    if T == 0:
        return xg.new_empty((0, B, P)), hs.to(dt), cs.to(dt), ws
    hx = _alloc((T + 1, B, P), dt, dev)
    first = T if reverse else 0
    dummy = xg
    reg_args, reg_axes, reg_kw, r_keep = _regularized("lstm", acc_t, dev, H, *reg, dummy, P)
    ln_args, ln_axes, ln_kw, ln_x = _layer_norm("lstm", plan, T, B, acc_t, dev, ln_hh, ln_c,
                                                dummy)  # fmt: skip
    if (lengths is not None and reverse) or reg_kw["RDROP"]:
        y = _alloc((T, B, P), dt, dev)
    else:
        y = hx[:T] if reverse else hx[1:]
    # m exchange: one row per step when polled (each written once), else per step parity
    mx = _alloc((T if _polls(plan) else 2, B, H), dt, dev)
    args = (
        xg, w_hh, w_hr, lengths if lengths is not None else dummy,
        hx, y, mx, hs, cs, ws if save else dummy, *reg_args, *ln_args,
    )  # fmt: skip
    kw = dict(
        G=4, GP=4, NW=len(WS_FIELDS["lstm"]), H=H, P=P, CHUNKS_PER_TRIP=plan.chunks_per_trip,
        HAS_LEN=lengths is not None, REVERSE=bool(reverse), SAVE=bool(save), PHASES=3,
        PREC=_prec(dt, precision), ACC=_acc_dtype(dt), POLL=False, ASM=not interpreting(),
        SENTINEL=_SENTINEL[dt], COUNT_POLLS=poll_counter is not None, **reg_kw,
    )  # fmt: skip
    kw.update(ln_kw)
    fitted = _fit(_lstmp_fwd_kernel, plan, args, kw, dev)
    if _polls(fitted) != _polls(plan):  # weights streamed after all: m by step parity
        mx = _alloc((T if _polls(fitted) else 2, B, H), dt, dev)
        args = args[:6] + (mx,) + args[7:]
    plan = fitted
    _fill_polled(plan, dt, hx, mx)
    if ln_x:
        _fill_stats(plan, acc_t, ln_args[-1], B)
    # what enters W_hh at the first step: h0, masked with recurrent dropout
    _put_h0(plan, dt, hx[first], h0 if r_keep is None or h0 is None else h0 * r_keep)
    axes = (1, None, None, 0 if lengths is not None else None, 1, 1, 1, 0, 0,
            1 if save else None, *reg_axes, *ln_axes)  # fmt: skip
    sync = _launch_phases(_lstmp_fwd_kernel, plan, T, B, T, args, kw, _wait_bound(wait_bound),
                          dev, axes, defer_check, ln_x, ln_phase=1)  # fmt: skip
    _add_failed_polls(poll_counter, sync)
    return y, hs.to(dt), cs.to(dt), ws


def _backward_proj(w_hh, w_hr, c0, lengths, reverse, y, workspace, dy, dh_T, dc_T, plan,
                   precision, wait_bound, poll_counter, defer_check, reg, ln_hh,
                   ln_c):  # fmt: skip
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
    drec, lng = _ln_grad_buffers(T, B, 4, H, dt, acc_t, dev, ln_hh, ln_c)
    if T == 0:
        return dxg, dhp, dhs, dcs, *_ln_outputs(drec, lng)
    c0_ = c0 if c0 is not None else torch.zeros(B, H, dtype=dt, device=dev)
    reg_args, reg_axes, reg_kw, _ = _regularized("lstm", acc_t, dev, H, *reg, y, P)
    ln_args, ln_axes, ln_kw, ln_x = _backward_layer_norm("lstm", plan, T, B, acc_t, dev, ln_hh,
                                                         ln_c, drec, lng, y)  # fmt: skip
    args = (
        w_hh, w_hr, c0_, lengths if lengths is not None else y, workspace, dy,
        dxg, dhp, dhs, dcs, *reg_args, *ln_args,
    )  # fmt: skip
    kw = dict(
        G=4, GP=4, NW=len(WS_FIELDS["lstm"]), H=H, P=P, CHUNKS_PER_TRIP=plan.chunks_per_trip,
        HAS_LEN=lengths is not None, REVERSE=bool(reverse), PHASES=3,
        PREC=_prec(dt, precision), ACC=_acc_dtype(dt), POLL=False, ASM=not interpreting(),
        SENTINEL=_SENTINEL[dt], COUNT_POLLS=poll_counter is not None, **reg_kw,
    )  # fmt: skip
    kw.update(ln_kw)
    plan = _fit(_lstmp_bwd_kernel, plan, args, kw, dev)
    if ln_x:  # with LayerNorm the dgates exchanged are drec (dxg is only written)
        _fill_polled(plan, dt, drec, dhp)
        _fill_stats(plan, acc_t, ln_args[4], B)
    else:
        _fill_polled(plan, dt, dxg, dhp)
    axes = (None, None, 0, 0 if lengths is not None else None, 1, 1, 1, 1, 0, 0, *reg_axes,
            *ln_axes)  # fmt: skip
    sync = _launch_phases(_lstmp_bwd_kernel, plan, T, B, T + 1, args, kw, _wait_bound(wait_bound),
                          dev, axes, defer_check, ln_x, ln_phase=2)  # fmt: skip
    _add_failed_polls(poll_counter, sync)
    return dxg, dhp, dhs, dcs, *_ln_outputs(drec, lng)


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
    wait_bound: int | None = None,
    poll_counter: torch.Tensor | None = None,
    defer_check: bool = False,
    zoneout: float = 0.0,
    zoneout_h: torch.Tensor | None = None,
    zoneout_c: torch.Tensor | None = None,
    recurrent_dropout: float = 0.0,
    recurrent_mask: torch.Tensor | None = None,
    ln_hh: tuple[torch.Tensor, torch.Tensor] | None = None,
    ln_c: tuple[torch.Tensor, torch.Tensor] | None = None,
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
    (B, P). wait_bound, poll_counter, defer_check and the regularizers: as in `forward` (with
    recurrent dropout, dxg is the gradient of the pre-activations as ever; the weight
    gradients take h_{t-1} masked, as it entered W_hh).

    LayerNorm (ln_hh, ln_c as in `forward`, whose workspace it reads): dxg and dhn are still
    the gradients of the gates' pre-activations, and two more outputs follow: drec (T, B,
    G*H), the gradient of h_{t-1} W_hhᵀ before the normalization (dW_hh is its GEMM against
    h_{t-1}), and dln_c, LN_c's weight and bias gradients ((H,) each, fp32 / fp64; None
    without ln_c). LN_hh's are sums over (t, b) of (dxg, GRU's n block dhn) times the workspace's
    normalized W_hh h, and of the same alone (the caller's)."""
    if w_hr is not None:
        reg = (zoneout, zoneout_h, zoneout_c, recurrent_dropout, recurrent_mask)
        return _backward_proj(w_hh, w_hr, c0, lengths, reverse, y, workspace, dy, dh_T, dc_T,
                              plan, precision, wait_bound, poll_counter, defer_check, reg,
                              ln_hh, ln_c)  # fmt: skip
    _check_poll_counter(poll_counter, y.device)
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
    # LayerNorm: what W_hh multiplies, and LN_c's parameter gradients per (row, unit)
    drec, lng = _ln_grad_buffers(T, B, G, H, dt, acc_t, dev, ln_hh, ln_c)
    if T == 0:
        return dxg, dhn, dhs, (dcs if cell == "lstm" else None), *_ln_outputs(drec, lng)
    zeros = None
    if h0 is None or (cell == "lstm" and c0 is None):
        zeros = torch.zeros(B, H, dtype=dt, device=dev)
    reg_args, reg_axes, reg_kw, _ = _regularized(
        cell, acc_t, dev, H, zoneout, zoneout_h, zoneout_c, recurrent_dropout,
        recurrent_mask, y,
    )  # fmt: skip
    ln_args, ln_axes, ln_kw, ln_x = _backward_layer_norm(cell, plan, T, B, acc_t, dev, ln_hh,
                                                         ln_c, drec, lng, y)  # fmt: skip
    args = (
        w_hh, h0 if h0 is not None else zeros,
        (c0 if c0 is not None else zeros) if cell == "lstm" else y,
        lengths if lengths is not None else y, y, workspace, dy,
        dxg, dhn if dhn is not None else y, dhs, dcs, *reg_args, *ln_args,
    )  # fmt: skip
    kw = dict(
        CELL=CELL_CODE[cell], G=G, GP=_next_pow2(G), NW=NW, H=H,
        CHUNKS_PER_TRIP=plan.chunks_per_trip,
        HAS_LEN=lengths is not None, REVERSE=bool(reverse), PREC=_prec(dt, precision),
        ACC=_acc_dtype(dt), POLL=False, ASM=not interpreting(), SENTINEL=_SENTINEL[dt],
        COUNT_POLLS=poll_counter is not None, **reg_kw,
    )  # fmt: skip
    kw.update(ln_kw)
    plan = _fit(_recurrence_bwd_kernel, plan, args, kw, dev)
    # every dgates element is written once, by the step that owns it: polled (with
    # LayerNorm what is exchanged is drec, and the row sums)
    if ln_x:
        _fill_polled(plan, dt, drec)
        _fill_stats(plan, acc_t, ln_args[4], B)
    else:
        _fill_polled(plan, dt, dxg, dhn)
    # T + 1 steps: the last one only folds the first step's dgates into dh0
    axes = (None, 0, 0 if cell == "lstm" else None, 0 if lengths is not None else None, 1, 1,
            1, 1, 1 if dhn is not None else None, 0, 0, *reg_axes, *ln_axes)  # fmt: skip
    sync = _launch_steps(_recurrence_bwd_kernel, plan, T, B, T + 1, args, kw,
                         _wait_bound(wait_bound), dev, axes, defer_check, ln_x)  # fmt: skip
    _add_failed_polls(poll_counter, sync)
    return dxg, dhn, dhs, (dcs if cell == "lstm" else None), *_ln_outputs(drec, lng)
