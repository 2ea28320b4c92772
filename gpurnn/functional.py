"""Layers and cells built from the recurrence primitive (the module layer's engine).

Everything here is time-major and differentiable with ordinary autograd: the input
projection is one large GEMM per (layer, direction) done by torch, the recurrence is the
`gpurnn::recurrence` custom op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gpurnn import backends, export
from gpurnn.recurrence import folded_biases, input_projection, recurrence

__all__ = ["rnn", "cell_step", "folded_biases", "input_projection"]


def rnn(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[tuple],
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Tensor | None = None,
    backend: str | None = None,
):
    """A stack of recurrent layers, as torch.nn runs them.

    x (T, B, F); h0 (L*D, B, H_out); c0 (L*D, B, H) for LSTM; weights[layer*D + d] =
    (w_ih, w_hh, b_ih, b_hh, w_hr), biases and w_hr None where absent; lengths (B,) or
    None. Dropout applies to the outputs of every layer but the last, in training only.
    Returns (output (T, B, D*H_out), h_n (L*D, B, H_out), c_n (L*D, B, H) or None).
    """
    D = 2 if bidirectional else 1
    layer_in = x
    h_n, c_n = [], []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            layer_in = F.dropout(layer_in, dropout, training=True)
        outputs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            if torch.compiler.is_exporting():
                # one op per (layer, direction) that ONNX can write with the raw weights
                y, h_T, c_T = export.layer(
                    cell, layer_in, w_ih, w_hh, b_ih, b_hh, h0[k],
                    c0[k] if c0 is not None else None,
                    lengths=lengths, reverse=d == 1, w_hr=w_hr, backend=backend,
                )  # fmt: skip
                outputs.append(y)
                h_n.append(h_T)
                c_n.append(c_T)
                continue
            bias, b_hn = folded_biases(cell, w_ih, b_ih, b_hh)
            xg = F.linear(layer_in, w_ih, bias)
            # under autocast the GEMM above runs in the autocast dtype: follow it
            dtype = xg.dtype
            y, h_T, c_T = recurrence(
                cell,
                xg,
                w_hh.to(dtype),
                h0[k].to(dtype),
                c0[k].to(dtype) if c0 is not None else None,
                lengths=lengths,
                reverse=d == 1,
                b_hn=b_hn.to(dtype) if b_hn is not None else None,
                w_hr=w_hr.to(dtype) if w_hr is not None else None,
                backend=backend,
                projection=(layer_in, w_ih, bias),
            )
            outputs.append(y)
            h_n.append(h_T)
            c_n.append(c_T)
        layer_in = outputs[0] if D == 1 else torch.cat(outputs, dim=-1)
    # one check per module call of what the launches flagged (a wait that timed out),
    # instead of a host sync after each (layer, direction)
    if not torch.compiler.is_compiling():
        backends.check_deferred()
    return layer_in, torch.stack(h_n), torch.stack(c_n) if cell == "lstm" else None


def cell_step(
    cell: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    backend: str | None = None,
):
    """One step of a cell for a batch: x (B, F), h (B, H), c (B, H) for LSTM.
    Returns (h', c' or None)."""
    if torch.compiler.is_exporting():
        _, h_new, c_new = export.layer(cell, x[None], w_ih, w_hh, b_ih, b_hh, h, c, backend=backend)
        return h_new, c_new
    bias, b_hn = folded_biases(cell, w_ih, b_ih, b_hh)
    xg = F.linear(x, w_ih, bias)
    dtype = xg.dtype
    _, h_new, c_new = recurrence(
        cell,
        xg[None],
        w_hh.to(dtype),
        h.to(dtype),
        c.to(dtype) if c is not None else None,
        b_hn=b_hn.to(dtype) if b_hn is not None else None,
        backend=backend,
        projection=(x[None], w_ih, bias),
    )
    if not torch.compiler.is_compiling():
        backends.check_deferred()
    return h_new, c_new


def layer_weights(module) -> list[tuple]:
    """(w_ih, w_hh, b_ih, b_hh, w_hr) per (layer, direction) of a torch.nn-style RNN module,
    read by name so that torch.func.functional_call's substituted tensors are used."""
    D = 2 if module.bidirectional else 1
    out = []
    for layer in range(module.num_layers):
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
            out.append(
                tuple(
                    getattr(module, f"{kind}{sfx}", None)
                    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
                )
            )
    return out
