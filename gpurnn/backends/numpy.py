"""The `numpy` backend: the float64 reference (gpurnn.reference) behind the primitive.

Slow and exact: every tensor goes to the host as float64 and comes back in its own dtype
and device. Its backward recomputes the forward inside the reference, so it keeps no
workspace. With it a model trains on the reference itself, and any other backend's
results can be compared with it inside the same model.
"""

from __future__ import annotations

import numpy as np
import torch

from gpurnn import reference
from gpurnn.backends.base import Backend, Grads

# Both ways copy: torch marks a storage shared with NumPy as not resizable, and whoever
# frees or regrows a parameter's or gradient's storage (FSDP does) would then fail.


def _host(t):
    return None if t is None else t.detach().to("cpu", torch.float64, copy=True).numpy()


def _back(a, like):
    if a is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device, like.dtype, copy=True)


class NumpyBackend(Backend):
    name = "numpy"

    def forward(self, cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, save):
        y, h_T, c_T = reference.recurrence_forward(
            cell,
            _host(xg),
            _host(w_hh),
            _host(h0),
            _host(c0),
            None if lengths is None else lengths.cpu().numpy(),
            reverse,
            _host(b_hn),
            _host(w_hr),
        )
        workspace = xg.new_empty(0)
        return _back(y, xg), _back(h_T, xg), _back(c_T, xg), workspace

    def backward(
        self, cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, y, workspace, dy, dh_T, dc_T
    ):
        g = reference.recurrence_backward(
            cell,
            _host(xg),
            _host(w_hh),
            _host(h0),
            _host(c0),
            None if lengths is None else lengths.cpu().numpy(),
            reverse,
            _host(b_hn),
            _host(w_hr),
            _host(dy),
            _host(dh_T),
            _host(dc_T),
        )
        return Grads(
            xg=_back(g["xg"], xg),
            w_hh=_back(g["w_hh"], w_hh),
            h0=_back(g["h0"], h0),
            c0=_back(g["c0"], c0),
            b_hn=_back(g["b_hn"], b_hn),
            w_hr=_back(g["w_hr"], w_hr),
        )
