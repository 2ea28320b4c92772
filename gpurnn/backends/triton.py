"""The `triton` backend: persistent Triton kernels (kernels/triton/, run by its launch.py).

The recurrent part of forward and backward runs in the kernels; the weight gradients
(dW_hh, db_hn) are single GEMMs over all steps afterwards (docs/design.md, 2.2).

Options (attributes of the backend object, defaults from the environment):
  recompute       GPURNN_TRITON_RECOMPUTE=1: forward keeps no workspace; backward reruns the
                  forward kernel to rebuild the gate activations (saves NW*T*B*H elements
                  per layer-direction between forward and backward: 5x, 4x, 1x the size of
                  y for LSTM, GRU, RNN), at the cost of one more forward kernel.
  fp32_precision  GPURNN_TRITON_FP32_PRECISION: "tf32" (default) or "ieee" (exact fp32 dots)
                  for float32 inputs.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
from torch import Tensor

from gpurnn import masks
from gpurnn.backends.base import Backend, Grads, Inputs, LayerNormGrads, Regularization
from gpurnn.backends.common import kernel_weight_grads, projection_grad
from gpurnn.cells import GATES, INDRNN_CELLS

try:  # triton is optional (e.g. macOS); the kernels module imports it at the top
    from gpurnn.kernels.triton import independent as _independent
    from gpurnn.kernels.triton import launch as _launch

    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the machine
    _launch = _independent = None
    _IMPORT_ERROR = f"cannot import triton: {e}"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_interpreted() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1: `triton.jit` reads the
    variable once, when it decorates a kernel, so setting it later changes nothing."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_launch._recurrence_fwd_kernel, InterpretedFunction)


def _c(t: Tensor | None) -> Tensor | None:
    return t.contiguous() if t is not None else None


# Triton's interpreter is not thread-safe (while a kernel runs it swaps triton.language's
# functions for its own, process-wide), so interpreted launches from several threads take
# turns; compiled kernels need no lock.
_INTERPRETER_LOCK = threading.RLock()


def _launching():
    return _INTERPRETER_LOCK if _kernels_interpreted() else contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        self.recompute = os.environ.get("GPURNN_TRITON_RECOMPUTE", "0") == "1"
        self.fp32_precision = os.environ.get("GPURNN_TRITON_FP32_PRECISION", "tf32")

    @property
    def backward_uses_xg(self) -> bool:
        # only when backward reruns the forward kernel
        return self.recompute

    # ------------------------------------------------------------------ capability

    def unavailable_reason(self) -> str | None:
        if _launch is None:
            return _IMPORT_ERROR
        if _interpreting() and not _kernels_interpreted():
            return (
                "TRITON_INTERPRET=1 was set after gpurnn's Triton kernels were imported; "
                "Triton reads it only when a kernel is defined: set it before the first "
                "use of the triton backend (e.g. in the environment, or before "
                "`import gpurnn`)"
            )
        if _kernels_interpreted() and not _interpreting():
            return (
                "gpurnn's Triton kernels were imported under TRITON_INTERPRET=1, which is "
                "no longer set; they run only interpreted in this process (restart "
                "without it to compile them)"
            )
        if not (torch.cuda.is_available() or _interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
        return None

    def unsupported_reason(
        self,
        cell: str,
        device: torch.device,
        dtype: torch.dtype,
        projected: bool,
        hidden_size: int | None = None,
    ) -> str | None:
        # every hidden size runs: weights stream from L2 where they do not fit on chip;
        # LSTM projections (proj_size) too
        device = torch.device(device)
        if dtype not in _DTYPES:
            return f"dtype {dtype} not supported (float16, bfloat16, float32, float64)"
        if _interpreting():
            if device.type != "cpu":
                return "TRITON_INTERPRET=1 runs the kernels on CPU tensors only"
            if dtype == torch.bfloat16:
                return "bfloat16 tl.dot is broken in the Triton interpreter (triton#11584)"
            return None
        if device.type != "cuda":
            return f"tensors on {device.type}; the triton backend needs CUDA tensors"
        if dtype == torch.float64:
            return "float64 runs only under the interpreter (no fp64 tensor-core dot on GPU)"
        return None

    def auto_reason(self, cell, projected):
        if projected and torch.cuda.is_available():
            # checked under the interpreter and compiled for sm_90, not yet run on a GPU:
            # until the GPU tests of the projection kernels pass, "auto" leaves LSTMP layers
            # to torch (cuDNN), and backend="triton" runs them
            return "LSTM projections in the triton kernels have not yet passed their GPU tests"
        return None

    def workspace_spec(self, cell, T, B, H, dtype, save):
        if not save or self.recompute:
            return (0,), dtype
        return _launch.workspace_shape(cell, T, B, H), dtype

    # ------------------------------------------------------------------ forward

    def _forward(self, inputs: Inputs, save: bool, reg: Regularization | None = None):
        with _launching():
            return self._launch_forward(inputs, save, reg)

    def _launch_forward(self, inputs: Inputs, save: bool, reg: Regularization | None = None):
        return _launch.forward(
            inputs.cell, inputs.xg.contiguous(), _weights(inputs.w_hh, reg), _c(inputs.h0),
            _c(inputs.c0), _c(inputs.lengths), inputs.reverse, _c(inputs.b_hn), save,
            w_hr=_c(inputs.w_hr), precision=self.fp32_precision, defer_check=True,
            **_kernel_regularizers(reg, inputs.xg.dtype),
        )  # fmt: skip

    def check_deferred(self) -> None:
        _launch.check_pending()

    def forward(self, inputs, save):
        xg = inputs.xg
        reason = self.unsupported_reason(inputs.cell, xg.device, xg.dtype, inputs.w_hr is not None)
        if reason is not None:
            raise RuntimeError(f"gpurnn triton backend: {reason}")
        return self._forward(inputs, save and not self.recompute)

    # ------------------------------------------------------------------ backward

    def backward(self, inputs, y, workspace, dy, dh_T, dc_T):
        return self._backward(inputs, y, workspace, dy, dh_T, dc_T)[0]

    def _backward(self, inputs, y, workspace, dy, dh_T, dc_T, reg: Regularization | None = None):
        """(Grads, LayerNormGrads) of the plain or the regularized recurrence."""
        cell, h0, c0, lengths, b_hn = inputs.cell, inputs.h0, inputs.c0, inputs.lengths, inputs.b_hn
        reverse = inputs.reverse
        T, B, H_out = y.shape  # H_out: P for a projected LSTM, else H
        w_hh = inputs.w_hh.contiguous()
        w_run = _weights(w_hh, reg)  # what the forward multiplied by (DropConnect: masked)
        w_hr = _c(inputs.w_hr)
        if workspace.numel() == 0 and T * B * H_out > 0:
            # recompute: rebuild the activations (y again too: it is the exchange buffer,
            # and the values match the saved y bit for bit)
            if inputs.xg is None:
                raise RuntimeError("triton backward: no workspace saved and no xg to recompute it")
            y, _, _, workspace = self._forward(inputs, True, reg)
        y = y.contiguous()
        workspace = workspace.contiguous()
        with _launching():
            dxg, dhn, dh0, dc0, *ln_out = _launch.backward(
                cell, w_run, _c(h0), _c(c0), _c(lengths), reverse, y, workspace,
                dy.contiguous(), dh_T.contiguous(), _c(dc_T) if cell == "lstm" else None,
                w_hr=w_hr, precision=self.fp32_precision, defer_check=True,
                **_kernel_regularizers(reg, y.dtype),
            )  # fmt: skip

        dw_hr = None
        if w_hr is not None:
            # the kernel's second output is then dhp, each step's projected-output gradient
            dhp, dhn = dhn, None
            H = w_hr.shape[1]
            c_init = None  # zoneout: m_t came from c̃_t, rebuilt from the blended c
            if reg is not None and reg.zoneout > 0:
                c_init = c0 if c0 is not None else y.new_zeros(B, H)
            normalize_c = None  # LayerNorm of c: m_t = o tanh(LN_c(c̃_t))
            if reg is not None and reg.ln_c_weight is not None:
                normalize_c = _ln_c_of(reg, workspace, H)
            dw_hr = projection_grad(dhp, workspace, H, c_init, lengths, reverse, normalize_c)
        h_init = h0 if h0 is not None else y.new_zeros(B, H_out)
        h_factors = None  # recurrent dropout: h_{t-1} entered W_hh masked
        if reg is not None and reg.recurrent_mask is not None:
            h_factors = masks.dropout_factors(reg.recurrent_mask, H_out, reg.recurrent_dropout,
                                              y.dtype)  # fmt: skip
        # LayerNorm: W_hh multiplied the gradient before LN_hh (drec), and b_hn joins after
        # it (dhn); LN_hh's parameter gradients pair the gate gradients (GRU's n block: dhn)
        # with the normalized W_hh h the workspace keeps
        drec, dln_c = ln_out if ln_out else (None, None)
        dw_hh, db_hn = kernel_weight_grads(cell, dxg, dhn, y, h_init, lengths, reverse, b_hn,
                                           h_factors, drec)  # fmt: skip
        ln_grads = LayerNormGrads()
        if drec is not None:
            ln_grads = _layer_norm_grads(cell, reg, dxg, dhn, workspace, dln_c)
        if reg is not None and reg.dropconnect_mask is not None:
            dw_hh = dw_hh * masks.dropout_factors(reg.dropconnect_mask, w_hh.shape[1],
                                                  reg.dropconnect, dw_hh.dtype)  # fmt: skip
        return Grads(
            xg=dxg,
            w_hh=dw_hh.to(w_hh.dtype),
            h0=dh0.to(h0.dtype) if h0 is not None else None,
            c0=dc0.to(c0.dtype) if c0 is not None else None,
            b_hn=db_hn,
            w_hr=dw_hr.to(w_hr.dtype) if dw_hr is not None else None,
        ), ln_grads

    # ------------------------------------------------------------ regularized recurrences
    # IndRNN: its own kernels (kernels/triton/independent.py: no exchange; masks and zoneout
    # fused). LSTM, GRU, RNN: the plain kernels with zoneout, recurrent dropout and LayerNorm
    # switched on in the step (ZONEOUT, RDROP, LN, LN_C), DropConnect a masked W_hh once per
    # launch; the projected LSTM kernels take the same switches.

    def regularized_unsupported_reason(self, cell, device, dtype, projected, kinds):
        if cell in INDRNN_CELLS:
            return self.unsupported_reason("rnn_tanh", device, dtype, False)
        return self.unsupported_reason(cell, device, dtype, projected)

    def regularized_auto_reason(self, cell):
        if torch.cuda.is_available():
            # checked under the interpreter against the reference, not yet run on a GPU
            return "the regularized triton kernels have not yet passed their GPU tests"
        return None

    def regularized_workspace_spec(self, cell, T, B, H, dtype, save, reg=None):
        if cell in INDRNN_CELLS:
            return (0,), dtype  # its backward recomputes each step from y
        if reg is None or reg.ln_hh_weight is None:
            return self.workspace_spec(cell, T, B, H, dtype, save)
        # LayerNorm: its normalized W_hh h and row statistics, in the accumulation dtype
        acc = _accumulation_dtype(dtype)
        if not save or self.recompute:
            return (0,), acc
        return _launch.workspace_shape(cell, T, B, H, True, reg.ln_c_weight is not None), acc

    def regularized_forward(self, inputs, reg, save):
        if inputs.cell not in INDRNN_CELLS:
            return self._forward(inputs, save and not self.recompute, reg)
        y, h_T = _independent.forward(
            inputs.cell, inputs.xg.contiguous(), inputs.w_hh.contiguous(), _c(inputs.h0),
            _c(inputs.lengths), inputs.reverse, reg,
        )  # fmt: skip
        return y, h_T, None, inputs.xg.new_empty(0)

    def regularized_backward(self, inputs, reg, y, workspace, dy, dh_T, dc_T):
        if inputs.cell not in INDRNN_CELLS:
            return self._backward(inputs, y, workspace, dy, dh_T, dc_T, reg)
        h0 = inputs.h0
        dxg, du, dh0 = _independent.backward(
            inputs.cell, inputs.xg.contiguous(), inputs.w_hh.contiguous(), _c(h0),
            _c(inputs.lengths), inputs.reverse, reg, y.contiguous(), dy.contiguous(),
            dh_T.contiguous(),
        )  # fmt: skip
        grads = Grads(dxg, du, dh0 if h0 is not None else None, None, None, None)
        return grads, LayerNormGrads()


def _weights(w_hh: Tensor, reg: Regularization | None) -> Tensor:
    """W_hh as the kernels multiply by it: with DropConnect masked (once per launch)."""
    w_hh = w_hh.contiguous()
    if reg is None or reg.dropconnect_mask is None:
        return w_hh
    factors = masks.dropout_factors(reg.dropconnect_mask, w_hh.shape[1], reg.dropconnect,
                                    w_hh.dtype)  # fmt: skip
    return w_hh * factors


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_regularizers(reg: Regularization | None, dtype: torch.dtype) -> dict:
    """The launchers' keywords for what the step itself does (zoneout, recurrent dropout,
    LayerNorm of W_hh h and of c, its parameters in the accumulation dtype of `dtype`)."""
    if reg is None:
        return {}
    acc = _accumulation_dtype(dtype)

    def params(weight, bias):
        if weight is None:
            return None
        return weight.to(acc).contiguous(), bias.to(acc).contiguous()

    return dict(
        zoneout=reg.zoneout, zoneout_h=_c(reg.zoneout_h), zoneout_c=_c(reg.zoneout_c),
        recurrent_dropout=reg.recurrent_dropout, recurrent_mask=_c(reg.recurrent_mask),
        ln_hh=params(reg.ln_hh_weight, reg.ln_hh_bias), ln_c=params(reg.ln_c_weight, reg.ln_c_bias),
    )  # fmt: skip


def _ln_c_of(reg: Regularization, workspace: Tensor, H: int):
    """c̃ (T*B, H) -> LN_c(c̃), with the row statistics the forward saved."""
    stats = _launch.unpack_layer_norm("lstm", workspace, H)
    mu, rstd = stats["mu_c"].reshape(-1, 1), stats["rstd_c"].reshape(-1, 1)
    w, b = reg.ln_c_weight.to(workspace.dtype), reg.ln_c_bias.to(workspace.dtype)
    return lambda c: (c - mu) * rstd * w + b


def _layer_norm_grads(cell: str, reg: Regularization, dxg: Tensor, dhn: Tensor | None,
                      workspace: Tensor, dln_c: Tensor | None) -> LayerNormGrads:  # fmt: skip
    """LN_hh's weight and bias gradients: sums over every (t, b) of the gradient of the
    normalized W_hh h (the gate gradients, GRU's n block from dhn) times the normalized
    value the workspace keeps (its fields after the cell's own), and alone; LN_c's come
    summed from the kernel (dln_c). Rows past a sequence's end hold zeros and add nothing."""
    H = dxg.shape[-1] // GATES[cell]
    acc = workspace.dtype
    d_norm = dxg if dhn is None else torch.cat([dxg[..., : 2 * H], dhn], dim=-1)
    normalized = _launch.unpack_layer_norm(cell, workspace, H)["normalized"]
    d_norm = d_norm.to(acc)
    w, b = reg.ln_hh_weight, reg.ln_hh_bias
    grads = [(d_norm * normalized).sum((0, 1)).to(w.dtype), d_norm.sum((0, 1)).to(b.dtype)]
    if dln_c is not None:
        grads += [dln_c[0].to(reg.ln_c_weight.dtype), dln_c[1].to(reg.ln_c_bias.dtype)]
    return LayerNormGrads(*grads)
