"""The `torch` backend: the recurrence primitive as an explicit time loop in PyTorch ops,
on any device.

The loop is vectorised over the batch, with a hand-written backpropagation through time
(`TorchBackend`). It runs single layers, layers under torch.compile, and is the model for
the fused kernels' forward/backward split. (Whole modules run eagerly with
backend="torch" skip it and call PyTorch's native layer functions: gpurnn.native.)

The loop keeps what its backward needs in one workspace tensor, in the gate math's dtype
(fp32 for 16-bit inputs), laid out as gpurnn.cells says: lstm i, f, g, o, c; gru r, z, n,
hn; rnn h. Its backward never reads y: the states are rebuilt from the workspace (LSTM
h = o * tanh(c), GRU's h by its own update), so the caller may modify y in place, as
torch.nn's CPU layers allow.

Masks select (torch.where), never multiply: a NaN or Inf in xg past a sequence's end
reaches no output and no gradient (NaN * 0 is NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpurnn import masks
from gpurnn.backends.base import Backend, Grads, LayerNormGrads
from gpurnn.backends.common import compute_dtype, previous_states, step_mask
from gpurnn.cells import GATES, INDRNN_CELLS, LAYER_NORM_EPS, regularized_gate_count, saved_fields


def _step(cell, x, h, c, w_hh, b_hn, w_hr):
    """One step for the whole batch: returns (h_new, c_new, workspace row or None)."""
    if cell in ("rnn_tanh", "rnn_relu"):
        a = torch.addmm(x, h, w_hh.t())
        return (torch.tanh(a) if cell == "rnn_tanh" else torch.relu(a)), None, None
    if cell == "lstm":
        a = torch.addmm(x, h, w_hh.t())
        i, f, g, o = a.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        m = o * torch.tanh(c_new)
        h_new = m @ w_hr.t() if w_hr is not None else m
        return h_new, c_new, torch.cat([i, f, g, o, c_new], dim=1)
    hh = h @ w_hh.t()
    x_r, x_z, x_n = x.chunk(3, dim=1)
    h_r, h_z, h_n = hh.chunk(3, dim=1)
    if b_hn is not None:
        h_n = h_n + b_hn
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, None, torch.cat([r, z, n, h_n], dim=1)


def _step_backward(cell, saved, h_prev, c_prev, h_new, dh, dc, w_hh, w_hr):
    """Gradient of one step. Returns (dx, d_hidden, dh_prev, dc_prev, dm):
    dx for xg, d_hidden for W_hh's output (differs from dx in GRU's n block),
    dm the gradient of the unprojected LSTM output (for dW_hr)."""
    if cell in ("rnn_tanh", "rnn_relu"):
        da = dh * (1 - h_new * h_new) if cell == "rnn_tanh" else dh * (h_new > 0)
        return da, da, da @ w_hh, None, None
    if cell == "lstm":
        i, f, g, o, c_new = saved.chunk(5, dim=1)
        dm = dh @ w_hr if w_hr is not None else dh
        tc = torch.tanh(c_new)
        dc_total = dc + dm * o * (1 - tc * tc)
        da = torch.cat(
            [
                dc_total * g * i * (1 - i),
                dc_total * c_prev * f * (1 - f),
                dc_total * i * (1 - g * g),
                dm * tc * o * (1 - o),
            ],
            dim=1,
        )
        return da, da, da @ w_hh, dc_total * f, dm
    r, z, n, h_n = saved.chunk(4, dim=1)
    da_n = dh * (1 - z) * (1 - n * n)
    da_z = dh * (h_prev - n) * z * (1 - z)
    da_r = da_n * h_n * r * (1 - r)
    d_hidden = torch.cat([da_r, da_z, da_n * r], dim=1)
    return torch.cat([da_r, da_z, da_n], dim=1), d_hidden, d_hidden @ w_hh + dh * z, None, None


def weight_grads(cell, d_hidden, h_prev, b_hn, w_hr, dh_out, m):
    """dW_hh, db_hn and dW_hr as single GEMMs over all steps (rows past a sequence's end
    carry zero gradients, so they add nothing)."""
    H = d_hidden.shape[-1] // GATES[cell]
    d_hidden2 = d_hidden.reshape(-1, d_hidden.shape[-1])
    dw_hh = d_hidden2.t() @ h_prev.reshape(-1, h_prev.shape[-1])
    db_hn = d_hidden2[:, 2 * H :].sum(0) if (cell == "gru" and b_hn is not None) else None
    dw_hr = None
    if w_hr is not None:
        dw_hr = dh_out.reshape(-1, dh_out.shape[-1]).t() @ m.reshape(-1, m.shape[-1])
    return dw_hh, db_hn, dw_hr


def _regularized_step(cell, x, h, c, w, b_hn, w_hr, h_scale, ln_hh, ln_c):
    """One regularized step before zoneout: (h̃, c̃ or None); the formulas of
    gpurnn.reference's `_reg_step_forward`, in plain differentiable ops."""
    h_in = h * h_scale if h_scale is not None else h
    hh = h_in * w if cell in INDRNN_CELLS else h_in @ w.t()
    if ln_hh is not None:
        hh = F.layer_norm(hh, (hh.shape[-1],), *ln_hh, LAYER_NORM_EPS)
    if cell == "lstm":
        i, f, g, o = (x + hh).chunk(4, dim=1)
        c_tilde = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_norm = c_tilde
        if ln_c is not None:
            c_norm = F.layer_norm(c_tilde, (c_tilde.shape[-1],), *ln_c, LAYER_NORM_EPS)
        m = torch.sigmoid(o) * torch.tanh(c_norm)
        return (m @ w_hr.t() if w_hr is not None else m), c_tilde
    if cell == "gru":
        x_r, x_z, x_n = x.chunk(3, dim=1)
        h_r, h_z, h_n = hh.chunk(3, dim=1)
        if b_hn is not None:
            h_n = h_n + b_hn
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    a = x + hh
    return (torch.tanh(a) if cell.endswith("tanh") else torch.relu(a)), None


def _zoneout(previous, update, packed, p, width, dtype):
    """zh ⊙ previous + (1 − zh) ⊙ update, zh the step's mask bits (training) or p (eval)."""
    if packed is not None:
        keep = masks.unpack(packed, width, dtype)
        return keep * previous + (1 - keep) * update
    if p > 0:
        return p * previous + (1 - p) * update
    return update


def regularized_loop(inputs, reg):
    """The regularized recurrence as a time loop of plain torch ops, differentiable with
    autograd (to any order). Returns (y, h_T, c_T or None)."""
    cell, xg = inputs.cell, inputs.xg
    T, B, GH = xg.shape
    H = GH // regularized_gate_count(cell)
    acc = compute_dtype(xg.dtype)
    with torch.autocast(xg.device.type, enabled=False):
        w = inputs.w_hh.to(acc)
        H_out = w.shape[0] if cell in INDRNN_CELLS else w.shape[1]
        if reg.dropconnect_mask is not None:
            w = w * masks.dropout_factors(reg.dropconnect_mask, w.shape[-1], reg.dropconnect, acc)
        h_scale = None
        if reg.recurrent_mask is not None:
            h_scale = masks.dropout_factors(reg.recurrent_mask, H_out, reg.recurrent_dropout, acc)

        def cast(*ts):
            return None if ts[0] is None else tuple(t.to(acc) for t in ts)

        ln_hh, ln_c = cast(reg.ln_hh_weight, reg.ln_hh_bias), cast(reg.ln_c_weight, reg.ln_c_bias)
        b_hn = inputs.b_hn.to(acc) if inputs.b_hn is not None else None
        w_hr = inputs.w_hr.to(acc) if inputs.w_hr is not None else None
        h = inputs.h0.to(acc) if inputs.h0 is not None else xg.new_zeros(B, H_out, dtype=acc)
        c = None
        if cell == "lstm":
            c = inputs.c0.to(acc) if inputs.c0 is not None else xg.new_zeros(B, H, dtype=acc)
        inside = step_mask(T, inputs.lengths, xg.device)
        ys = [None] * T
        for t in range(T - 1, -1, -1) if inputs.reverse else range(T):
            h_tilde, c_tilde = _regularized_step(
                cell, xg[t].to(acc), h, c, w, b_hn, w_hr, h_scale, ln_hh, ln_c
            )
            zh = reg.zoneout_h[t] if reg.zoneout_h is not None else None
            h_new = _zoneout(h, h_tilde, zh, reg.zoneout, H_out, acc)
            c_new = None
            if c is not None:
                zc = reg.zoneout_c[t] if reg.zoneout_c is not None else None
                c_new = _zoneout(c, c_tilde, zc, reg.zoneout, H, acc)
            if inside is None:
                h, c, ys[t] = h_new, c_new, h_new
            else:
                h = torch.where(inside[t], h_new, h)
                c = torch.where(inside[t], c_new, c) if c is not None else None
                ys[t] = torch.where(inside[t], h_new, 0)
        y = torch.stack(ys).to(xg.dtype)
    return y, h.to(xg.dtype), c.to(xg.dtype) if c is not None else None


def _states(cell, workspace, h_init, lengths, reverse, mask, w_hr):
    """Every step's output state h_t (T, B, H_out), 0 past a sequence's end, rebuilt from
    the workspace by the forward's own arithmetic: what y holds, without reading y."""
    H = workspace.shape[-1] // len(saved_fields(cell))
    if cell in ("rnn_tanh", "rnn_relu"):
        return workspace  # its one field is h, kept masked
    if cell == "lstm":
        h = workspace[..., 3 * H : 4 * H] * torch.tanh(workspace[..., 4 * H :])
        if w_hr is not None:
            h = h @ w_hr.t()
        return h if mask is None else torch.where(mask, h, 0)
    T = workspace.shape[0]
    z, n = workspace[..., H : 2 * H], workspace[..., 2 * H : 3 * H]
    out = torch.empty_like(n)
    h = h_init
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h_new = (1 - z[t]) * n[t] + z[t] * h
        if mask is None:
            h = out[t] = h_new
        else:
            h = torch.where(mask[t], h_new, h)
            out[t] = torch.where(mask[t], h_new, 0)
    return out


class TorchBackend(Backend):
    name = "torch"
    backward_uses_xg = False
    backward_uses_y = False

    # ------------------------------------------------------------ regularized recurrences
    # The loop above, under no_grad in forward; backward reruns it and differentiates it
    # (no workspace kept: the loop is the slow path, its memory is what autograd keeps
    # while it runs).

    def regularized_unsupported_reason(self, cell, device, dtype, projected, kinds):
        return None

    def regularized_forward(self, inputs, reg, save):
        with torch.no_grad():
            y, h_T, c_T = regularized_loop(inputs, reg)
        return y, h_T, c_T, inputs.xg.new_empty(0)

    def regularized_backward(self, inputs, reg, y, workspace, dy, dh_T, dc_T):
        # torch.func.vjp, not autograd.grad: a custom op's kernel runs below autograd
        names = [n for n in Grads._fields if getattr(inputs, n) is not None]
        ln_names = [n for n in LayerNormGrads._fields if getattr(reg, n) is not None]

        def run(*tensors):
            given = dict(zip(names + ln_names, tensors))
            outs = regularized_loop(
                inputs._replace(**{n: given[n] for n in names}),
                reg._replace(**{n: given[n] for n in ln_names}),
            )
            return tuple(o for o in outs if o is not None)

        values = [getattr(inputs, n) for n in names] + [getattr(reg, n) for n in ln_names]
        outs, vjp = torch.func.vjp(run, *values)
        cotangents = (dy, dh_T, dc_T)[: len(outs)]
        grads = dict(zip(names + ln_names, vjp(tuple(cotangents))))
        return (
            Grads(*(grads.get(n) for n in Grads._fields)),
            LayerNormGrads(*(grads.get(n) for n in LayerNormGrads._fields)),
        )

    def workspace_spec(self, cell, T, B, H, dtype, save):
        shape = (T, B, len(saved_fields(cell)) * H) if save else (0,)
        return shape, compute_dtype(dtype)

    def forward(self, inputs, save):
        cell, xg, w_hh, h0, c0 = inputs.cell, inputs.xg, inputs.w_hh, inputs.h0, inputs.c0
        b_hn, w_hr = inputs.b_hn, inputs.w_hr
        T, B, GH = xg.shape
        H = GH // GATES[cell]
        acc = compute_dtype(xg.dtype)
        w_hh_, b_hn_ = w_hh.to(acc), b_hn.to(acc) if b_hn is not None else None
        w_hr_ = w_hr.to(acc) if w_hr is not None else None
        h = h0.to(acc) if h0 is not None else xg.new_zeros(B, w_hh.shape[1], dtype=acc)
        c = None
        if cell == "lstm":
            c = c0.to(acc) if c0 is not None else xg.new_zeros(B, H, dtype=acc)
        outputs = [None] * T  # stacked at the end rather than written into y: under
        # torch.func.vmap, a batched value cannot be written into an unbatched tensor
        shape, _ = self.workspace_spec(cell, T, B, H, xg.dtype, save)
        workspace = xg.new_zeros(shape, dtype=acc)
        mask = step_mask(T, inputs.lengths, xg.device)
        for t in range(T - 1, -1, -1) if inputs.reverse else range(T):
            x = xg[t].to(acc)
            if mask is not None:  # padding never enters the arithmetic (nor its gradient)
                x = torch.where(mask[t], x, 0)
            h_new, c_new, saved = _step(cell, x, h, c, w_hh_, b_hn_, w_hr_)
            if mask is None:
                h, c, out = h_new, c_new, h_new
            else:
                h = torch.where(mask[t], h_new, h)
                c = torch.where(mask[t], c_new, c) if c is not None else None
                out = torch.where(mask[t], h_new, 0)
            outputs[t] = out.to(xg.dtype)
            if save:  # a plain RNN's one field is its (unrounded) output
                workspace[t] = saved if saved is not None else out
        y = torch.stack(outputs) if T else xg.new_zeros(0, B, w_hh.shape[1])
        return y, h.to(xg.dtype), c.to(xg.dtype) if c is not None else None, workspace

    def backward(self, inputs, y, workspace, dy, dh_T, dc_T):
        # y is not read (it may be None): see the module docstring
        cell, w_hh, h0, c0, lengths = inputs.cell, inputs.w_hh, inputs.h0, inputs.c0, inputs.lengths
        reverse, b_hn, w_hr = inputs.reverse, inputs.b_hn, inputs.w_hr
        T, B, H_out = dy.shape
        H = w_hh.shape[0] // GATES[cell]
        acc = workspace.dtype
        w_hh_ = w_hh.to(acc)
        w_hr_ = w_hr.to(acc) if w_hr is not None else None
        mask = step_mask(T, lengths, dy.device)
        h_init = h0.to(acc) if h0 is not None else dy.new_zeros(B, H_out, dtype=acc)
        y_ = _states(cell, workspace, h_init, lengths, reverse, mask, w_hr_)
        h_prev = previous_states(y_, h_init, lengths, reverse)
        c_prev = None
        if cell == "lstm":
            c_init = c0.to(acc) if c0 is not None else y_.new_zeros(B, H)
            c_prev = previous_states(workspace[..., 4 * H :], c_init, lengths, reverse)
        d_xg = y_.new_zeros(T, B, w_hh.shape[0])
        d_hidden = y_.new_zeros(T, B, w_hh.shape[0])
        dh_out = y_.new_zeros(T, B, H_out) if w_hr is not None else None
        dh = dh_T.to(acc)
        dc = dc_T.to(acc) if cell == "lstm" else None
        dy_ = dy.to(acc) if mask is None else torch.where(mask, dy.to(acc), 0)
        for t in range(T) if reverse else range(T - 1, -1, -1):
            dh_t = dh + dy_[t]
            dx, dhid, dh_p, dc_p, _ = _step_backward(
                cell,
                workspace[t],
                h_prev[t],
                c_prev[t] if c_prev is not None else None,
                y_[t],
                dh_t,
                dc,
                w_hh_,
                w_hr_,
            )
            if mask is not None:
                dx, dhid = torch.where(mask[t], dx, 0), torch.where(mask[t], dhid, 0)
                dh_p = torch.where(mask[t], dh_p, dh)
                dc_p = torch.where(mask[t], dc_p, dc) if dc is not None else None
                dh_t = torch.where(mask[t], dh_t, 0)
            d_xg[t], d_hidden[t] = dx, dhid
            if dh_out is not None:
                dh_out[t] = dh_t
            dh, dc = dh_p, dc_p
        m = None
        if w_hr is not None:
            o, c_all = workspace[..., 3 * H : 4 * H], workspace[..., 4 * H :]
            m = o * torch.tanh(c_all)
        dw_hh, db_hn, dw_hr = weight_grads(cell, d_hidden, h_prev, b_hn, w_hr, dh_out, m)
        return Grads(
            xg=d_xg.to(dy.dtype),
            w_hh=dw_hh.to(w_hh.dtype),
            h0=dh.to(h0.dtype) if h0 is not None else None,
            c0=dc.to(c0.dtype) if c0 is not None else None,
            b_hn=db_hn.to(b_hn.dtype) if db_hn is not None else None,
            w_hr=dw_hr.to(w_hr.dtype) if dw_hr is not None else None,
        )
