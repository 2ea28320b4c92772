"""The `numpy` backend: the float64 reference (gpurnn.reference) behind the primitive.

Slow and exact: every tensor goes to the host as float64 and comes back in its own dtype
and device. Its backward recomputes the forward inside the reference, so it keeps no
workspace. With it a model trains on the reference itself, and any other backend's
results can be compared with it inside the same model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gpurnn import masks, reference
from gpurnn.backends.base import Backend, Grads, Inputs, LayerNormGrads
from gpurnn.cells import INDRNN_CELLS, regularized_gate_count

# Both ways copy: torch marks a storage shared with NumPy as not resizable, and whoever
# frees or regrows a parameter's or gradient's storage (FSDP does) would then fail.


def _host(t):
    return None if t is None else t.detach().to("cpu", torch.float64, copy=True).numpy()


def _back(a, like):
    if a is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device, like.dtype, copy=True)


def _host_inputs(inputs: Inputs) -> Inputs:
    """The inputs as the reference takes them: float64 arrays, lengths as integers."""
    lengths = inputs.lengths
    return Inputs(
        *(_host(v) if isinstance(v, Tensor) else v for v in inputs._replace(lengths=None))
    )._replace(lengths=None if lengths is None else lengths.cpu().numpy())


def _reference_regularizers(inputs: Inputs, reg) -> dict:
    """A Regularization as the reference's keywords: float64 arrays that say what each step
    does (see gpurnn.reference, "regularized recurrences")."""
    T, B, GH = inputs.xg.shape
    H = GH // regularized_gate_count(inputs.cell)
    w_hh = inputs.w_hh
    H_out = w_hh.shape[0] if inputs.cell in INDRNN_CELLS else w_hh.shape[1]

    def bits(packed, n, scale=1.0):
        return _host(masks.unpack(packed, n, torch.float64)) * scale

    out = {}
    for name, packed, n in (("zoneout_h", reg.zoneout_h, H_out), ("zoneout_c", reg.zoneout_c, H)):
        if name == "zoneout_c" and inputs.cell != "lstm":
            continue
        if packed is not None:
            out[name] = bits(packed, n)
        elif reg.zoneout > 0:
            out[name] = np.full((T, B, n), float(reg.zoneout))
    if reg.recurrent_mask is not None:
        scale = masks.dropout_scale(reg.recurrent_dropout)
        out["recurrent_scale"] = bits(reg.recurrent_mask, H_out, scale)
    if reg.dropconnect_mask is not None:
        scale = masks.dropout_scale(reg.dropconnect)
        out["weight_scale"] = bits(reg.dropconnect_mask, w_hh.shape[-1], scale)
    if reg.ln_hh_weight is not None:
        out["ln_hh"] = (_host(reg.ln_hh_weight), _host(reg.ln_hh_bias))
    if reg.ln_c_weight is not None:
        out["ln_c"] = (_host(reg.ln_c_weight), _host(reg.ln_c_bias))
    return out


class NumpyBackend(Backend):
    name = "numpy"
    backward_uses_y = False  # the reference recomputes everything from the inputs

    def forward(self, inputs, save):
        y, h_T, c_T = reference.recurrence_forward(*_host_inputs(inputs))
        xg = inputs.xg
        return _back(y, xg), _back(h_T, xg), _back(c_T, xg), xg.new_empty(0)

    def backward(self, inputs, y, workspace, dy, dh_T, dc_T):
        g = reference.recurrence_backward(
            *_host_inputs(inputs), _host(dy), _host(dh_T), _host(dc_T)
        )
        return Grads(*(_back(g[name], getattr(inputs, name)) for name in Grads._fields))

    # regularized recurrences: the reference's, the masks unpacked into its arrays

    def regularized_unsupported_reason(self, cell, device, dtype, projected, kinds):
        return None

    def regularized_forward(self, inputs, reg, save):
        y, h_T, c_T = reference.regularized_forward(
            *_host_inputs(inputs), **_reference_regularizers(inputs, reg)
        )
        xg = inputs.xg
        return _back(y, xg), _back(h_T, xg), _back(c_T, xg), xg.new_empty(0)

    def regularized_backward(self, inputs, reg, y, workspace, dy, dh_T, dc_T):
        g = reference.regularized_backward(
            *_host_inputs(inputs), _host(dy), _host(dh_T), _host(dc_T),
            **_reference_regularizers(inputs, reg),
        )  # fmt: skip
        grads = Grads(*(_back(g[name], getattr(inputs, name)) for name in Grads._fields))
        ln = LayerNormGrads(*(_back(g[n], getattr(reg, n)) for n in LayerNormGrads._fields))
        return grads, ln
