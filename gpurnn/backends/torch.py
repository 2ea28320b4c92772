"""The `torch` backend: PyTorch's own ops, on any device.

Two ways to run, both exact:
- whole modules through PyTorch's native RNN functions (`torch._VF.lstm` & co., the
  functions `torch.nn.LSTM` itself calls: cuDNN on GPU, oneDNN/ATen on CPU) when a module
  runs eagerly: `native_rnn` / `native_cell` below, used by gpurnn.modules;
- the recurrence primitive as an explicit time loop vectorised over the batch, with a
  hand-written backpropagation through time (`TorchBackend`), used for single layers,
  under torch.compile, and as the model for the fused kernels' forward/backward split.

The loop keeps what its backward needs in one workspace tensor (T, B, S), gate math in
fp32 for 16-bit inputs:
    lstm  S = 5H: i, f, g, o (activations), c (cell state after the step)
    gru   S = 4H: r, z, n (activations), hn = W_hn h + b_hn
    rnn   S = 0:  the output y already holds every h_t
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from gpurnn.backends.base import Backend, Grads
from gpurnn.cells import GATES

# Modules run eagerly with backend="torch" call PyTorch's native layer functions; tests
# turn this off to run the same modules through the loop below.
USE_NATIVE_LAYERS = True

WORKSPACE_GATES = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gate math runs in fp32 for 16-bit inputs, in the input's dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def step_mask(T: int, lengths: Tensor | None, device) -> Tensor | None:
    """(T, B, 1) bool: step t is inside sequence b. None when every sequence has length T."""
    if lengths is None:
        return None
    return (torch.arange(T, device=device)[:, None] < lengths.to(device)[None, :])[..., None]


def previous_states(states: Tensor, init: Tensor, lengths: Tensor | None, reverse: bool):
    """The state each step started from: states (T, B, N) of every step, init (B, N).

    Forward, step t starts from step t-1 (init at t = 0). Reverse, from step t+1, except
    at a sequence's own last element (t = length - 1), where it starts from init.
    """
    if not reverse:
        return torch.cat([init[None], states[:-1]])
    shifted = torch.cat([states[1:], init[None]])
    if lengths is None:
        return shifted
    T = states.shape[0]
    first = torch.arange(T, device=states.device)[:, None] == (lengths.to(states.device) - 1)
    return torch.where(first[..., None], init[None], shifted)


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


def kernel_weight_grads(cell, dxg, dhn, y, h_init, lengths, reverse, b_hn):
    """dW_hh and db_hn after a fused backward kernel that wrote dxg (T, B, G*H) and, for GRU,
    dhn (T, B, H): the n block of d(W_hh h), which differs from dxg's by the factor r.
    One GEMM over every (t, b) against the state each step started from; rows past a
    sequence's end carry zero gradients and add nothing."""
    H = y.shape[-1]
    h_prev = previous_states(y, h_init.to(y.dtype), lengths, reverse)
    d_hidden = dxg if dhn is None else torch.cat([dxg[..., : 2 * H], dhn], dim=-1)
    d_hidden, h_prev = d_hidden.reshape(-1, d_hidden.shape[-1]), h_prev.reshape(-1, H)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    if y.device.type == "cuda" and y.dtype != torch.float64:
        dw_hh = d_hidden.t() @ h_prev  # cuBLAS accumulates 16-bit GEMMs in fp32 already
    else:
        dw_hh = d_hidden.t().to(acc) @ h_prev.to(acc)
    db_hn = dhn.to(acc).sum(dim=(0, 1)).to(b_hn.dtype) if b_hn is not None else None
    return dw_hh, db_hn


class TorchBackend(Backend):
    name = "torch"
    backward_uses_xg = False

    def workspace_spec(self, cell, T, B, H, dtype, save):
        if not save or WORKSPACE_GATES[cell] == 0:
            return (0,), compute_dtype(dtype)
        return (T, B, WORKSPACE_GATES[cell] * H), compute_dtype(dtype)

    def forward(self, cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, save):
        T, B, GH = xg.shape
        H = GH // GATES[cell]
        acc = compute_dtype(xg.dtype)
        w_hh_, b_hn_ = w_hh.to(acc), b_hn.to(acc) if b_hn is not None else None
        w_hr_ = w_hr.to(acc) if w_hr is not None else None
        h = h0.to(acc) if h0 is not None else xg.new_zeros(B, w_hh.shape[1], dtype=acc)
        c = None
        if cell == "lstm":
            c = c0.to(acc) if c0 is not None else xg.new_zeros(B, H, dtype=acc)
        y = xg.new_zeros(T, B, w_hh.shape[1])
        shape, _ = self.workspace_spec(cell, T, B, H, xg.dtype, save)
        workspace = xg.new_zeros(shape, dtype=acc)
        mask = step_mask(T, lengths, xg.device)
        for t in range(T - 1, -1, -1) if reverse else range(T):
            h_new, c_new, saved = _step(cell, xg[t].to(acc), h, c, w_hh_, b_hn_, w_hr_)
            if mask is None:
                h, c = h_new, c_new
                y[t] = h_new
            else:
                h = torch.where(mask[t], h_new, h)
                c = torch.where(mask[t], c_new, c) if c is not None else None
                y[t] = torch.where(mask[t], h_new, 0)
            if workspace.numel():
                workspace[t] = saved
        return y, h.to(xg.dtype), c.to(xg.dtype) if c is not None else None, workspace

    def backward(
        self, cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, y, workspace, dy, dh_T, dc_T
    ):
        T, B, H_out = y.shape
        H = w_hh.shape[0] // GATES[cell]
        acc = workspace.dtype
        w_hh_ = w_hh.to(acc)
        w_hr_ = w_hr.to(acc) if w_hr is not None else None
        y_ = y.to(acc)
        h_init = h0.to(acc) if h0 is not None else y_.new_zeros(B, H_out)
        h_prev = previous_states(y_, h_init, lengths, reverse)
        c_prev = None
        if cell == "lstm":
            c_init = c0.to(acc) if c0 is not None else y_.new_zeros(B, H)
            c_prev = previous_states(workspace[..., 4 * H :], c_init, lengths, reverse)
        mask = step_mask(T, lengths, y.device)
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
                workspace[t] if workspace.numel() else None,
                h_prev[t],
                c_prev[t] if c_prev is not None else None,
                y_[t],
                dh_t,
                dc,
                w_hh_,
                w_hr_,
            )
            if mask is not None:
                dx, dhid = dx * mask[t], dhid * mask[t]
                dh_p = torch.where(mask[t], dh_p, dh)
                dc_p = torch.where(mask[t], dc_p, dc) if dc is not None else None
                dh_t = dh_t * mask[t]
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
            xg=d_xg.to(y.dtype),
            w_hh=dw_hh.to(w_hh.dtype),
            h0=dh.to(h0.dtype) if h0 is not None else None,
            c0=dc.to(c0.dtype) if c0 is not None else None,
            b_hn=db_hn.to(b_hn.dtype) if db_hn is not None else None,
            w_hr=dw_hr.to(w_hr.dtype) if dw_hr is not None else None,
        )


# ----------------------------------------------------------------------------------------
# whole modules through PyTorch's native functions (what torch.nn itself runs)
# ----------------------------------------------------------------------------------------

_NATIVE_LAYERS = {
    "lstm": torch._VF.lstm,
    "gru": torch._VF.gru,
    "rnn_tanh": torch._VF.rnn_tanh,
    "rnn_relu": torch._VF.rnn_relu,
}
_NATIVE_CELLS = {
    "lstm": torch._VF.lstm_cell,
    "gru": torch._VF.gru_cell,
    "rnn_tanh": torch._VF.rnn_tanh_cell,
    "rnn_relu": torch._VF.rnn_relu_cell,
}


def native_may_use_cudnn(
    device: torch.device, training: bool, needs_grad: bool, dropout_active: bool
) -> bool:
    """Whether an eager layer may let PyTorch's native RNN function run cuDNN. cuDNN's RNN
    cannot backpropagate in eval mode ("cudnn RNN backward can only be called in training
    mode"), draws its dropout masks from a state of its own that torch.manual_seed does not
    reset (same seed, different masks), and is documented as nondeterministic on some
    cuDNN/CUDA versions. PyTorch's other native path (fused cell kernels and GEMMs, what
    torch.nn runs with cuDNN disabled) has none of these limits, so those cases go there."""
    if torch.device(device).type != "cuda":
        return True  # cuDNN is CUDA only: nothing to route
    if needs_grad and not training:
        return False
    if dropout_active or torch.are_deterministic_algorithms_enabled():
        return False
    return True


@contextlib.contextmanager
def cudnn_disabled():
    """cuDNN off for the block (the flag is global; restored on the way out)."""
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled


def native_rnn(
    cell,
    input,
    batch_sizes,
    hx,
    flat_weights,
    bias,
    num_layers,
    dropout,
    training,
    bidirectional,
    batch_first,
):
    """torch.nn's own call: returns (output, h_n, c_n or None). On CUDA, with cuDNN only
    where `native_may_use_cudnn` allows it."""
    fn = _NATIVE_LAYERS[cell]
    states = hx if isinstance(hx, tuple) else (hx,)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, *states, *flat_weights)
    )
    dropout_active = training and dropout > 0 and num_layers > 1
    may_use_cudnn = native_may_use_cudnn(input.device, training, needs_grad, dropout_active)
    with contextlib.nullcontext() if may_use_cudnn else cudnn_disabled():
        if batch_sizes is None:
            result = fn(
                input, hx, flat_weights, bias, num_layers, dropout, training, bidirectional,
                batch_first,
            )  # fmt: skip
        else:
            result = fn(
                input, batch_sizes, hx, flat_weights, bias, num_layers, dropout, training,
                bidirectional,
            )  # fmt: skip
    if cell == "lstm":
        return result[0], result[1], result[2]
    return result[0], result[1], None


def native_cell(cell, input, hx, w_ih, w_hh, b_ih, b_hh):
    return _NATIVE_CELLS[cell](input, hx, w_ih, w_hh, b_ih, b_hh)
