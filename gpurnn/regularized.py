"""Regularized recurrences: zoneout, recurrent (variational) dropout, DropConnect, LayerNorm
and IndRNN, as a second custom op beside `gpurnn::recurrence`.

    regularized_recurrence(cell, xg, w_hh, h0=None, c0=None, *, lengths=None, reverse=False,
        b_hn=None, w_hr=None, reg=Regularization(), backend=None) -> (y, h_T, c_T)

One layer, one direction, as gpurnn.recurrence, with what `reg` (gpurnn.backends.
Regularization) switches on; gpurnn.reference writes the formulas out. The op
`gpurnn::regularized_recurrence` takes the fields of Inputs and then those of
Regularization, flat; its autograd runs `gpurnn::regularized_recurrence_backward`, and a
graph of the backward (second-order gradients) comes from differentiating the torch
backend's loop, as for the plain primitive. The plain primitive is untouched: a layer with
every regularizer off never comes here.

Above the op, `rnn` and `cell_step` build layers and cells: the input projection x W_ihᵀ
(LayerNorm'd over its G·H entries when layer_norm is on) plus the biases, the masks drawn
from torch's generator on the input's device in training (gpurnn.masks), inter-layer dropout
as torch.nn's. `add_parameters` / `layer_norm_weights` give modules their LayerNorm
parameters under the names the modules document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpurnn import masks
from gpurnn.backends import (
    Grads,
    Inputs,
    LayerNormGrads,
    Regularization,
    _unavailable_reason,
    get_backend,
    requested_backend,
)
from gpurnn.cells import INDRNN_CELLS, LAYER_NORM_EPS, regularized_gate_count
from gpurnn.recurrence import _check_args, folded_biases

__all__ = ["Regularization", "regularized_recurrence", "rnn", "cell_step"]

_N_INPUTS = len(Inputs._fields)
_N_REG = len(Regularization._fields)
# auto's order for regularized recurrences (the fused backends refuse what they lack)
_AUTO_ORDER = ("triton", "cupy", "torch")
_GPU_KERNELS = ("triton", "cupy")
_LN_FIELDS = LayerNormGrads._fields


def _split(op_args) -> tuple[Inputs, Regularization, tuple]:
    inputs = Inputs(*op_args[:_N_INPUTS])
    reg = Regularization(*op_args[_N_INPUTS : _N_INPUTS + _N_REG])
    return inputs, reg, tuple(op_args[_N_INPUTS + _N_REG :])


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def kinds(cell: str, reg: Regularization) -> tuple[str, ...]:
    """The names of what is on, as backends' refusals and errors spell them."""
    on = []
    if reg.zoneout > 0:
        on.append("zoneout")
    if reg.recurrent_mask is not None:
        on.append("recurrent_dropout")
    if reg.dropconnect_mask is not None:
        on.append("dropconnect")
    if reg.ln_hh_weight is not None:
        on.append("layer_norm")
    if cell in INDRNN_CELLS:
        on.append("indrnn")
    return tuple(on)


def _out_size(cell: str, w_hh: Tensor) -> int:
    return w_hh.shape[0] if cell in INDRNN_CELLS else w_hh.shape[1]


# ---------------------------------------------------------------------- the custom ops


@torch.library.custom_op("gpurnn::regularized_recurrence", mutates_args=())
def _op(
    cell: str,
    xg: Tensor,
    w_hh: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    b_hn: Tensor | None,
    w_hr: Tensor | None,
    zoneout: float,
    zoneout_h: Tensor | None,
    zoneout_c: Tensor | None,
    recurrent_dropout: float,
    recurrent_mask: Tensor | None,
    dropconnect: float,
    dropconnect_mask: Tensor | None,
    ln_hh_weight: Tensor | None,
    ln_hh_bias: Tensor | None,
    ln_c_weight: Tensor | None,
    ln_c_bias: Tensor | None,
    backend: str,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    inputs, reg, _ = _split(
        (cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, zoneout, zoneout_h, zoneout_c,
         recurrent_dropout, recurrent_mask, dropconnect, dropconnect_mask,
         ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias)
    )  # fmt: skip
    y, h_T, c_T, workspace = get_backend(backend).regularized_forward(inputs, reg, save)
    return y, h_T, c_T if c_T is not None else _empty(xg), workspace


@_op.register_fake
def _op_fake(*op_args):
    inputs, reg, (backend, save) = _split(op_args)
    T, B, GH = inputs.xg.shape
    H = GH // regularized_gate_count(inputs.cell)
    xg = inputs.xg
    shape, dtype = get_backend(backend).regularized_workspace_spec(
        inputs.cell, T, B, H, xg.dtype, save, reg
    )
    return (
        xg.new_empty(T, B, _out_size(inputs.cell, inputs.w_hh)),
        xg.new_empty(B, _out_size(inputs.cell, inputs.w_hh)),
        xg.new_empty(B, H) if inputs.cell == "lstm" else _empty(xg),
        xg.new_empty(shape, dtype=dtype),
    )


@torch.library.custom_op("gpurnn::regularized_recurrence_backward", mutates_args=())
def _backward_op(
    cell: str,
    xg: Tensor,
    w_hh: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    b_hn: Tensor | None,
    w_hr: Tensor | None,
    zoneout: float,
    zoneout_h: Tensor | None,
    zoneout_c: Tensor | None,
    recurrent_dropout: float,
    recurrent_mask: Tensor | None,
    dropconnect: float,
    dropconnect_mask: Tensor | None,
    ln_hh_weight: Tensor | None,
    ln_hh_bias: Tensor | None,
    ln_c_weight: Tensor | None,
    ln_c_bias: Tensor | None,
    y: Tensor,
    workspace: Tensor,
    dy: Tensor,
    dh_T: Tensor,
    dc_T: Tensor | None,
    backend: str,
) -> list[Tensor]:
    inputs, reg, _ = _split(
        (cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, zoneout, zoneout_h, zoneout_c,
         recurrent_dropout, recurrent_mask, dropconnect, dropconnect_mask,
         ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias)
    )  # fmt: skip
    grads, ln_grads = get_backend(backend).regularized_backward(
        inputs, reg, y, workspace, dy, dh_T, dc_T
    )
    return [g if g is not None else _empty(y) for g in (*grads, *ln_grads)]


@_backward_op.register_fake
def _backward_op_fake(*op_args):
    inputs, reg, (y, *_) = _split(op_args)
    like = [inputs.xg, inputs.w_hh, inputs.h0, inputs.c0, inputs.b_hn, inputs.w_hr]
    like += [getattr(reg, name) for name in _LN_FIELDS]
    return [torch.empty_like(t) if t is not None else _empty(y) for t in like]


class _Kept:
    """Marks, in ctx.kept, a place whose tensor went to ctx.save_for_backward."""


def _setup_context(ctx, inputs, output):
    inputs, reg, (backend, _) = _split(inputs)
    y, _, _, workspace = output
    ctx.backend = backend
    kept = (*inputs, *reg)
    ctx.kept = [_Kept if isinstance(v, Tensor) else v for v in kept]
    ctx.save_for_backward(*(v for v in kept if isinstance(v, Tensor)), y, workspace)
    ctx.mark_non_differentiable(workspace)


# the op's differentiable arguments, by name, in the order of (Grads, LayerNormGrads)
_GRAD_NAMES = (*Grads._fields, *_LN_FIELDS)
_ARG_NAMES = (*Inputs._fields, *Regularization._fields)


def _differentiable_backward(ctx, inputs, reg, dy, dh_T, dc_T):
    """A graph of the backward: the torch backend's loop rerun and differentiated with
    create_graph=True (as gpurnn.recurrence does for the plain primitive)."""
    from gpurnn.backends.torch import regularized_loop

    values = {**inputs._asdict(), **reg._asdict()}
    wanted = {
        name: values[name]
        for name in _GRAD_NAMES
        if ctx.needs_input_grad[_ARG_NAMES.index(name)]
        and values[name] is not None
        and values[name].requires_grad
    }
    if not wanted:
        return {}
    y, h_T, c_T = regularized_loop(inputs, reg)
    outputs, grad_outputs = [y, h_T], [dy, dh_T]
    if c_T is not None:
        outputs.append(c_T)
        grad_outputs.append(dc_T)
    grads = torch.autograd.grad(
        outputs, list(wanted.values()), grad_outputs, create_graph=True, allow_unused=True
    )
    return dict(zip(wanted, grads))


def _backward(ctx, dy, dh_T, dc_T, _d_workspace):
    *saved, y, workspace = ctx.saved_tensors
    saved = iter(saved)
    kept = [next(saved) if v is _Kept else v for v in ctx.kept]
    inputs, reg, _ = _split(kept)
    is_lstm = inputs.cell == "lstm"
    dy = dy if dy is not None else torch.zeros_like(y)
    dh_T = dh_T if dh_T is not None else y.new_zeros(y.shape[1:])
    H = inputs.xg.shape[2] // regularized_gate_count(inputs.cell)
    if is_lstm and (dc_T is None or dc_T.numel() == 0):
        dc_T = y.new_zeros(y.shape[1], H)
    dc_T = dc_T if is_lstm else None
    if torch.is_grad_enabled():
        grads = _differentiable_backward(ctx, inputs, reg, dy, dh_T, dc_T)
    else:
        out = _backward_op(*inputs, *reg, y, workspace, dy, dh_T, dc_T, ctx.backend)
        values = {**inputs._asdict(), **reg._asdict()}
        grads = {name: g for name, g in zip(_GRAD_NAMES, out) if values[name] is not None}
    return tuple(grads.get(name) for name in _ARG_NAMES) + (None, None)


torch.library.register_autograd(
    "gpurnn::regularized_recurrence", _backward, setup_context=_setup_context
)


# ---------------------------------------------------------------------- the primitive


@torch.compiler.assume_constant_result
def choose_backend(
    explicit: str | None,
    cell: str,
    device: torch.device,
    dtype: torch.dtype,
    projected: bool,
    on: tuple[str, ...],
) -> str:
    """The backend that runs a regularized recurrence: the one requested (as
    gpurnn.backends.choose_backend reads it) or a clear error naming what it lacks; for
    "auto" the first of triton, cupy, torch that runs it and has passed its GPU tests (the
    GPU kernels on CUDA only)."""
    name = requested_backend(explicit)

    def reason_against(candidate):
        reason = _unavailable_reason(candidate)
        if reason is None:
            reason = get_backend(candidate).regularized_unsupported_reason(
                cell, device, dtype, projected, on
            )
        return reason

    if name != "auto":
        reason = reason_against(name)
        if reason is not None:
            raise RuntimeError(f"gpurnn backend {name!r} cannot run this case: {reason}")
        return name
    for candidate in _AUTO_ORDER:
        if candidate in _GPU_KERNELS and device.type != "cuda":
            continue
        if reason_against(candidate) is None and (
            get_backend(candidate).regularized_auto_reason(cell) is None
        ):
            return candidate
    raise RuntimeError(f"no gpurnn backend can run cell={cell} {on} dtype={dtype} device={device}")


def _check_regularization(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr, reg):
    if cell in INDRNN_CELLS:
        T, B, H = xg.shape
        if w_hh.dim() != 1 or w_hh.shape[0] != H:
            raise ValueError(f"w_hh of {cell} must have shape ({H},), got {tuple(w_hh.shape)}")
        for name, t in (("c0", c0), ("b_hn", b_hn), ("w_hr", w_hr)):
            if t is not None:
                raise ValueError(f"{name} is not an input of {cell}")
        if reg.ln_hh_weight is not None:
            raise ValueError(f"layer_norm is not defined for {cell}")
        # the rest as for a plain RNN of the same sizes (an (H, H) view of u stands in for
        # its W_hh: same dtype and device, no copy)
        _check_args("rnn_tanh", xg, w_hh[:, None].expand(H, H), h0, None, lengths, None, None)
    else:
        _check_args(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr)
    T, B, GH = xg.shape
    H = GH // regularized_gate_count(cell)
    H_out = _out_size(cell, w_hh)
    for name in ("zoneout", "recurrent_dropout", "dropconnect"):
        p = getattr(reg, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    width = masks.packed_width
    expected = {
        "zoneout_h": (T, B, width(H_out)),
        "zoneout_c": (T, B, width(H)),
        "recurrent_mask": (B, width(H_out)),
        "dropconnect_mask": (*w_hh.shape[:-1], width(w_hh.shape[-1])),
        "ln_hh_weight": (GH,),
        "ln_hh_bias": (GH,),
        "ln_c_weight": (H,),
        "ln_c_bias": (H,),
    }
    for name, shape in expected.items():
        t = getattr(reg, name)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != xg.device:
            raise ValueError(f"{name} is on {t.device} but xg is on {xg.device}")
        if name.startswith("ln_"):
            if t.dtype != xg.dtype:
                raise TypeError(f"{name} dtype ({t.dtype}) must match xg dtype ({xg.dtype})")
        elif t.dtype != torch.uint8:
            raise TypeError(f"{name} must be a packed mask (uint8, gpurnn.masks), got {t.dtype}")
    if reg.zoneout_c is not None and cell != "lstm":
        raise ValueError(f"zoneout_c is only for lstm, not {cell}")
    if (reg.ln_c_weight is not None) != (cell == "lstm" and reg.ln_hh_weight is not None):
        raise ValueError("ln_c_weight/bias go with ln_hh_weight/bias, for lstm only")
    if (reg.ln_hh_weight is None) != (reg.ln_hh_bias is None) or (
        (reg.ln_c_weight is None) != (reg.ln_c_bias is None)
    ):
        raise ValueError("a LayerNorm needs both its weight and its bias")


def regularized_recurrence(
    cell,
    xg,
    w_hh,
    h0=None,
    c0=None,
    *,
    lengths=None,
    reverse=False,
    b_hn=None,
    w_hr=None,
    reg: Regularization | None = None,
    backend=None,
):
    """One regularized layer in one direction: gpurnn.recurrence plus `reg`, and the IndRNN
    cells ("indrnn_tanh", "indrnn_relu": w_hh is the vector u of H). Returns (y, h_T, c_T);
    differentiable in xg, w_hh, h0, c0, b_hn, w_hr and the LayerNorm parameters, to any
    order."""
    reg = reg if reg is not None else Regularization()
    _check_regularization(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr, reg)
    chosen = choose_backend(backend, cell, xg.device, xg.dtype, w_hr is not None, kinds(cell, reg))
    if lengths is not None:
        lengths = lengths.to(device=xg.device, dtype=torch.int64)
    differentiable = (xg, w_hh, h0, c0, b_hn, w_hr, *(getattr(reg, n) for n in _LN_FIELDS))
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in differentiable
    )
    y, h_T, c_T, _ = _op(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, *reg, chosen, save)
    return y, h_T, (c_T if cell == "lstm" else None)


# ---------------------------------------------------------------------- layers and cells


def draw(
    cell: str,
    T: int,
    B: int,
    H: int,
    H_out: int,
    w_hh: Tensor,
    zoneout: float,
    recurrent_dropout: float,
    dropconnect: float,
    training: bool,
    ln: tuple[Tensor | None, ...] = (None,) * 4,
) -> Regularization:
    """The Regularization of one (layer, direction) for one forward call: in training the
    masks, drawn from torch's generator on w_hh's device, in this order: zoneout of h, of c,
    recurrent dropout, DropConnect; in eval only what eval keeps (zoneout's p)."""
    device = w_hh.device
    zh = zc = rmask = wmask = None
    if training:
        if zoneout > 0:
            zh = masks.draw((T, B, H_out), zoneout, device)
            if cell == "lstm":
                zc = masks.draw((T, B, H), zoneout, device)
        if recurrent_dropout > 0:
            rmask = masks.draw((B, H_out), 1.0 - recurrent_dropout, device)
        if dropconnect > 0:
            wmask = masks.draw(tuple(w_hh.shape), 1.0 - dropconnect, device)
    return Regularization(
        zoneout, zh, zc,
        recurrent_dropout if rmask is not None else 0.0, rmask,
        dropconnect if wmask is not None else 0.0, wmask,
        *ln,
    )  # fmt: skip


def _input_projection(cell, x, w_ih, b_ih, b_hh, ln_ih):
    """xg = LN_ih(x W_ihᵀ) + b_ih + b_hh (GRU's b_hn apart); LN_ih = None: no LayerNorm."""
    if cell in INDRNN_CELLS:
        bias = None if b_ih is None else b_ih + b_hh
        return F.linear(x, w_ih, bias), None
    if ln_ih is None:
        bias, b_hn = folded_biases(cell, w_ih, b_ih, b_hh)
        return F.linear(x, w_ih, bias), b_hn
    xw = F.linear(x, w_ih)
    xg = F.layer_norm(xw, (xw.shape[-1],), ln_ih[0].to(xw.dtype), ln_ih[1].to(xw.dtype),
                      LAYER_NORM_EPS)  # fmt: skip
    bias, b_hn = folded_biases(cell, w_ih, b_ih, b_hh)
    if bias is not None:
        xg = xg + bias.to(xg.dtype)
    # autocast runs layer_norm in fp32 (on CUDA): the recurrence follows the GEMM's dtype,
    # as without LayerNorm
    return xg.to(xw.dtype), b_hn


def _to(t, dtype):
    return t.to(dtype) if t is not None else None


def rnn(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[tuple],
    ln_weights: list[tuple] | None,
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Tensor | None = None,
    zoneout: float = 0.0,
    recurrent_dropout: float = 0.0,
    dropconnect: float = 0.0,
    backend: str | None = None,
):
    """gpurnn.functional.rnn with the regularizers. weights[k] = (w_ih, w_hh, b_ih, b_hh,
    w_hr); ln_weights[k] = (ih_w, ih_b, hh_w, hh_b, c_w, c_b) (c_* None unless LSTM), or
    None without LayerNorm. Returns (output, h_n, c_n or None)."""
    if torch.compiler.is_exporting():
        raise NotImplementedError(
            "exporting regularized layers (zoneout, recurrent_dropout, dropconnect, "
            "layer_norm, IndRNN) is not supported yet"
        )
    D = 2 if bidirectional else 1
    T, B = x.shape[:2]
    layer_in = x
    h_n, c_n = [], []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            layer_in = F.dropout(layer_in, dropout, training=True)
        outputs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            ln = ln_weights[k] if ln_weights is not None else None
            xg, b_hn = _input_projection(cell, layer_in, w_ih, b_ih, b_hh, ln[:2] if ln else None)
            dtype = xg.dtype  # under autocast the projection ran in the autocast dtype
            H = xg.shape[-1] // regularized_gate_count(cell)
            reg = draw(
                cell, T, B, H, _out_size(cell, w_hh), w_hh, zoneout, recurrent_dropout,
                dropconnect, training,
                tuple(_to(t, dtype) for t in ln[2:]) if ln else (None,) * 4,
            )  # fmt: skip
            y, h_T, c_T = regularized_recurrence(
                cell, xg, w_hh.to(dtype), h0[k].to(dtype),
                _to(c0[k] if c0 is not None else None, dtype),
                lengths=lengths, reverse=d == 1, b_hn=_to(b_hn, dtype), w_hr=_to(w_hr, dtype),
                reg=reg, backend=backend,
            )  # fmt: skip
            outputs.append(y)
            h_n.append(h_T)
            c_n.append(c_T)
        layer_in = outputs[0] if D == 1 else torch.cat(outputs, dim=-1)
    return layer_in, torch.stack(h_n), torch.stack(c_n) if cell == "lstm" else None


def cell_step(cell, x, h, c, weights, ln, *, zoneout, recurrent_dropout, dropconnect, training,
              backend=None):  # fmt: skip
    """One step of a regularized cell (a sequence of one step: masks drawn at every call).
    weights = (w_ih, w_hh, b_ih, b_hh); ln as in `rnn`. Returns (h', c' or None)."""
    out, h_n, c_n = rnn(
        cell, x[None], h[None], c[None] if c is not None else None, [(*weights, None)],
        [ln] if ln is not None else None, num_layers=1, bidirectional=False,
        training=training, zoneout=zoneout, recurrent_dropout=recurrent_dropout,
        dropconnect=dropconnect, backend=backend,
    )  # fmt: skip
    return h_n[0], (c_n[0] if c_n is not None else None)


# ---------------------------------------------------------------------- module glue

LN_KINDS = ("ih", "hh", "c")


def check_rates(zoneout, recurrent_dropout, dropconnect) -> None:
    for name, p in (("zoneout", zoneout), ("recurrent_dropout", recurrent_dropout),
                    ("dropconnect", dropconnect)):  # fmt: skip
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{name} should be a number in [0, 1], got {p!r}")


def layer_norm_names(cell: str, suffix: str) -> list[str]:
    """The LayerNorm parameters' names for one (layer, direction): suffix "_l0",
    "_l1_reverse", or "" for a cell."""
    return [
        f"layer_norm_{kind}_{part}{suffix}"
        for kind in LN_KINDS
        if kind != "c" or cell == "lstm"
        for part in ("weight", "bias")
    ]


def add_layer_norm(module: nn.Module, cell: str, suffixes, H: int, factory: dict) -> None:
    """Registers the LayerNorm parameters (weights 1, biases 0) of each suffix."""
    G = regularized_gate_count(cell)
    for sfx in suffixes:
        for name in layer_norm_names(cell, sfx):
            size = H if name.startswith("layer_norm_c_") else G * H
            fill = 1.0 if "_weight" in name else 0.0
            module.register_parameter(name, nn.Parameter(torch.full((size,), fill, **factory)))


def reset_layer_norm(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            if name.startswith("layer_norm_"):
                p.fill_(1.0 if "_weight" in name else 0.0)


def layer_norm_weights(module: nn.Module, cell: str, suffixes) -> list[tuple]:
    """(ih_w, ih_b, hh_w, hh_b, c_w, c_b) per suffix, read by name (functional_call works)."""
    out = []
    for sfx in suffixes:
        names = layer_norm_names(cell, sfx)
        values = [getattr(module, n) for n in names]
        out.append(tuple(values) + (None, None) * (3 - len(values) // 2))
    return out
