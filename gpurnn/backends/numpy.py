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

from gpurnn import reference
from gpurnn.backends.base import Backend, Grads, Inputs

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
