"""Helpers shared by the backends: the loop backend (torch), the fused-kernel backends
(triton, cupy) and gpurnn.inspect use them alike, so they live beside the backends rather
than inside any one of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpurnn.cells import saved_fields


def loop_workspace_shape(cell: str, T: int, B: int, H: int, save: bool) -> tuple[int, ...]:
    """The workspace of the loop and CuPy backends: gpurnn.cells' fields less those y
    already holds (the plain RNN's h), so (0,) for plain RNNs and when nothing is saved."""
    fields = saved_fields(cell, from_output=True)
    return (T, B, len(fields) * H) if save and fields else (0,)


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


def kernel_weight_grads(cell, dxg, dhn, y, h_init, lengths, reverse, b_hn, h_factors=None,
                        d_hidden=None):  # fmt: skip
    """dW_hh and db_hn after a fused backward kernel that wrote dxg (T, B, G*H) and, for GRU,
    dhn (T, B, H): the n block of d(W_hh h), which differs from dxg's by the factor r.
    One GEMM over every (t, b) against the state each step started from (times h_factors
    (B, H), the recurrent-dropout mask, where given: what entered W_hh); rows past a
    sequence's end carry zero gradients and add nothing. d_hidden: d(W_hh h) where it is
    neither (with LayerNorm, the gradient before LN_hh); db_hn is dhn's sum all the same."""
    H = y.shape[-1]
    h_prev = previous_states(y, h_init.to(y.dtype), lengths, reverse)
    if h_factors is not None:
        h_prev = h_prev * h_factors.to(y.dtype)
    if d_hidden is None:
        d_hidden = dxg if dhn is None else torch.cat([dxg[..., : 2 * H], dhn], dim=-1)
    d_hidden, h_prev = d_hidden.reshape(-1, d_hidden.shape[-1]), h_prev.reshape(-1, H)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    if y.device.type == "cuda" and y.dtype != torch.float64:
        dw_hh = d_hidden.t() @ h_prev  # cuBLAS accumulates 16-bit GEMMs in fp32 already
    else:
        dw_hh = d_hidden.t().to(acc) @ h_prev.to(acc)
    db_hn = dhn.to(acc).sum(dim=(0, 1)).to(b_hn.dtype) if b_hn is not None else None
    return dw_hh, db_hn


def projection_grad(dhp: Tensor, workspace: Tensor, H: int, c_init: Tensor | None = None,
                    lengths: Tensor | None = None, reverse: bool = False,
                    normalize_c=None) -> Tensor:  # fmt: skip
    """dW_hr (P, H) of an LSTM with projection = the sum over every (t, b) of
    dhp[t, b]^T m[t, b], one GEMM, with m = o * tanh(c) recomputed from the workspace's o and
    c (field k of unit j at column k*H + j, the cell table's order, first in each row; every
    GPU backend saves the same LSTM fields). Rows past a sequence's end have dhp = 0 and add
    nothing. With zoneout (c_init given: c0 or zeros) the saved c is the blended c_t, and
    m_t came from c̃_t = f c_{t-1} + i g: rebuilt from the step before's c (c_init at a
    sequence's first). With LayerNorm of c, normalize_c maps c̃ (T*B, H) to LN_c(c̃)."""
    P = dhp.shape[-1]
    if dhp.numel() == 0:
        return torch.zeros(P, H, dtype=torch.float32, device=dhp.device)
    names = saved_fields("lstm")
    T, B = dhp.shape[:2]
    fields = workspace.reshape(T * B, -1)[:, : len(names) * H].reshape(-1, len(names), H)
    acc = torch.float64 if torch.float64 in (dhp.dtype, workspace.dtype) else torch.float32

    def field(name):
        return fields[:, names.index(name)].to(acc)

    o, c = field("o"), field("c")
    if c_init is not None:
        T, B = dhp.shape[:2]
        c_prev = previous_states(c.reshape(T, B, H), c_init.to(acc), lengths, reverse)
        c = field("f") * c_prev.reshape(-1, H) + field("i") * field("g")
    if normalize_c is not None:
        c = normalize_c(c)
    m = o * torch.tanh(c)
    if dhp.device.type == "cuda" and dhp.dtype != torch.float64:
        # 16-bit GEMM (cuBLAS accumulates in fp32), m rounded as the kernels exchange it
        return dhp.reshape(-1, P).t() @ m.to(dhp.dtype)
    return dhp.reshape(-1, P).t().to(acc) @ m
