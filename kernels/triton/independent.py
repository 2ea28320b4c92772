"""IndRNN (Li et al. 2018) on Triton: h_t = act(xg_t + u ⊙ h_{t-1}), with zoneout, recurrent
dropout and DropConnect fused into the step, forward and backward.

Every unit recurs on itself alone, so there is nothing to exchange: each program owns BLOCK
(batch row, unit) pairs and runs them through all T steps in registers, reading xg and
writing y once each. No step's loads depend on h, so each is issued a step ahead: the only
serial chain is the arithmetic h_{t-1} -> h_t, and the loads stream behind it.

Per-sequence lengths and the reverse direction as the primitive's (a sequence's own last
element starts the reverse direction), so each element computes its own time index. The
masks arrive packed (gpurnn.masks: bit j%8 of byte j//8 of a row) and are unpacked in the
kernel; the rates and scales arrive as a 3-element tensor in the math's dtype (a scalar
argument would be fp32, too coarse for the float64 checks). h is carried rounded to the
output dtype, as y stores it, so the backward, which recomputes each step from y (no
workspace), sees exactly the forward's inputs.

Kernel -> launcher: `_indrnn_fwd_kernel` / `forward`, `_indrnn_bwd_kernel` / `backward`;
the float64 ground truth is gpurnn.reference.regularized_forward/backward. Device code
imports cell_math and tiles (the packed mask bits); launchers are host code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cell_math import _tanh
from .tiles import _load_bits

_BLOCK = 256


@triton.jit
def _setup(n, u, h0, lengths, rmask, umask, scalars, T, H, NB,
           HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RMASK: tl.constexpr,
           HAS_UMASK: tl.constexpr, ACC: tl.constexpr, N):  # fmt: skip
    """Per element: its batch row b, unit j, validity, u_j (DropConnect applied), the
    recurrent-dropout scale of h_{t-1}, h_0 and the sequence's length."""
    inside = n < N
    b = n // H
    j = n % H
    u_j = tl.load(u + j, mask=inside, other=0).to(ACC)
    if HAS_UMASK:
        u_j = u_j * (_load_bits(umask, 0, j, inside, ACC) * tl.load(scalars + 2).to(ACC))
    r_scale = tl.full((n.shape[0],), 1.0, ACC)
    if HAS_RMASK:
        r_scale = _load_bits(rmask, b * NB, j, inside, ACC) * tl.load(scalars + 1).to(ACC)
    h = tl.zeros((n.shape[0],), ACC)
    if HAS_H0:
        h = tl.load(h0 + n, mask=inside, other=0).to(ACC)
    L = tl.full((n.shape[0],), T, tl.int32)
    if HAS_LENGTHS:
        L = tl.load(lengths + b, mask=inside, other=0).to(tl.int32)
    return inside, b, j, u_j, r_scale, h, L


@triton.jit
def _activate(a, RELU: tl.constexpr):
    if RELU:
        return tl.maximum(a, 0.0)
    else:
        return _tanh(a)


@triton.jit
def _fwd_loads(xg, zmask, s, inside, L, b, j, B, H, NB, REVERSE: tl.constexpr,
               ZONEOUT_MASK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """What forward step s reads: xg, its zoneout bit, its time index, its validity."""
    valid = inside & (s < L)
    t = tl.where(valid, (L - 1 - s) if REVERSE else s, 0)
    x = tl.load(xg + (t * B + b) * H + j, mask=valid, other=0).to(ACC)
    z = x
    if ZONEOUT_MASK:
        z = _load_bits(zmask, (t * B + b) * NB, j, valid, ACC)
    return x, z, t, valid


@triton.jit
def _bwd_loads(xg, y, dy, zmask, s, inside, L, b, j, h_init, B, H, NB, REVERSE: tl.constexpr,
               ZONEOUT_MASK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """What backward step s (the forward's steps in reverse) reads: xg, h_{t-1} (h_0 at a
    sequence's first step), dy, the zoneout bit, the time index, the validity."""
    valid = inside & (s < L)
    k = L - 1 - s  # the forward's step index of this step, within its sequence
    t = tl.where(valid, s if REVERSE else k, 0)
    first = k == 0
    t_prev = tl.where(first | ~valid, 0, (t + 1) if REVERSE else (t - 1))
    h_prev = tl.load(y + (t_prev * B + b) * H + j, mask=valid & ~first, other=0).to(ACC)
    h_prev = tl.where(first, h_init, h_prev)
    at = (t * B + b) * H + j
    x = tl.load(xg + at, mask=valid, other=0).to(ACC)
    g = tl.load(dy + at, mask=valid, other=0).to(ACC)
    z = x
    if ZONEOUT_MASK:
        z = _load_bits(zmask, (t * B + b) * NB, j, valid, ACC)
    return x, h_prev, g, z, t, valid


@triton.jit
def _indrnn_fwd_kernel(
    xg, u, h0, lengths, zmask, rmask, umask, scalars, y, h_T,
    T, B, H, NB,
    RELU: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ZONEOUT_MASK: tl.constexpr, ZONEOUT_MIX: tl.constexpr,
    HAS_RMASK: tl.constexpr, HAS_UMASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside, b, j, u_j, r_scale, h, L = _setup(
        n, u, h0, lengths, rmask, umask, scalars, T, H, NB,
        HAS_H0, HAS_LENGTHS, HAS_RMASK, HAS_UMASK, ACC, B * H,
    )  # fmt: skip
    p = tl.load(scalars).to(ACC)
    # each step's loads depend on no h: issued a step ahead, so that only the arithmetic
    # h_{t-1} -> h_t is serial and the memory latency overlaps the step before
    x, z, t, valid = _fwd_loads(xg, zmask, 0, inside, L, b, j, B, H, NB, REVERSE, ZONEOUT_MASK, ACC)
    for s in range(0, T):
        x_next, z_next, t_next, valid_next = _fwd_loads(
            xg, zmask, s + 1, inside, L, b, j, B, H, NB, REVERSE, ZONEOUT_MASK, ACC
        )
        a = x + u_j * (h * r_scale)
        h_tilde = _activate(a, RELU).to(ACC)
        if ZONEOUT_MASK:
            h_new = z * h + (1.0 - z) * h_tilde
        elif ZONEOUT_MIX:
            h_new = p * h + (1.0 - p) * h_tilde
        else:
            h_new = h_tilde
        h_new = h_new.to(y.dtype.element_ty)
        tl.store(y + (t * B + b) * H + j, h_new, mask=valid)
        h = tl.where(valid, h_new.to(ACC), h)
        x, z, t, valid = x_next, z_next, t_next, valid_next
    tl.store(h_T + n, h.to(h_T.dtype.element_ty), mask=inside)


@triton.jit
def _indrnn_bwd_kernel(
    xg, u, h0, lengths, zmask, rmask, umask, scalars, y, dy, dh_T, dxg, du_rows, dh0,
    T, B, H, NB,
    RELU: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ZONEOUT_MASK: tl.constexpr, ZONEOUT_MIX: tl.constexpr,
    HAS_RMASK: tl.constexpr, HAS_UMASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside, b, j, u_j, r_scale, h_init, L = _setup(
        n, u, h0, lengths, rmask, umask, scalars, T, H, NB,
        HAS_H0, HAS_LENGTHS, HAS_RMASK, HAS_UMASK, ACC, B * H,
    )  # fmt: skip
    p = tl.load(scalars).to(ACC)
    dh = tl.load(dh_T + n, mask=inside, other=0).to(ACC)
    du = tl.zeros((BLOCK,), ACC)
    # as in the forward, every load of a step is issued a step ahead: only dh is serial
    x, h_prev, g, z, t, valid = _bwd_loads(
        xg, y, dy, zmask, 0, inside, L, b, j, h_init, B, H, NB, REVERSE, ZONEOUT_MASK, ACC
    )
    for s in range(0, T):
        x_n, h_prev_n, g_n, z_n, t_n, valid_n = _bwd_loads(
            xg, y, dy, zmask, s + 1, inside, L, b, j, h_init, B, H, NB, REVERSE, ZONEOUT_MASK,
            ACC,
        )  # fmt: skip
        a = x + u_j * (h_prev * r_scale)
        h_tilde = _activate(a, RELU).to(ACC)
        d_total = dh + g
        if ZONEOUT_MASK:
            d_tilde = (1.0 - z) * d_total
            d_keep = z * d_total
        elif ZONEOUT_MIX:
            d_tilde = (1.0 - p) * d_total
            d_keep = p * d_total
        else:
            d_tilde = d_total
            d_keep = tl.zeros((BLOCK,), ACC)
        if RELU:
            da = tl.where(a > 0.0, d_tilde, 0.0)
        else:
            da = d_tilde * (1.0 - h_tilde * h_tilde)
        tl.store(dxg + (t * B + b) * H + j, da.to(dxg.dtype.element_ty), mask=valid)
        du += tl.where(valid, da * (h_prev * r_scale), 0.0)
        dh = tl.where(valid, d_keep + u_j * da * r_scale, dh)
        x, h_prev, g, z, t, valid = x_n, h_prev_n, g_n, z_n, t_n, valid_n
    tl.store(dh0 + n, dh.to(dh0.dtype.element_ty), mask=inside)
    tl.store(du_rows + n, du, mask=inside)


# ---------------------------------------------------------------------- launchers


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common(cell, xg, u, h0, lengths, reverse, reg):
    """The launch arguments both kernels share (inputs contiguous)."""
    from gpurnn import masks

    T, B, H = xg.shape
    acc = _acc(xg.dtype)
    rates = (reg.zoneout, masks.dropout_scale(reg.recurrent_dropout),
             masks.dropout_scale(reg.dropconnect))  # fmt: skip
    scalars = torch.tensor(rates, dtype=acc, device=xg.device)
    dummy = xg.new_empty(1)
    byte = torch.empty(1, dtype=torch.uint8, device=xg.device)
    pointers = (
        u, h0 if h0 is not None else dummy, lengths if lengths is not None else dummy,
        reg.zoneout_h if reg.zoneout_h is not None else byte,
        reg.recurrent_mask if reg.recurrent_mask is not None else byte,
        reg.dropconnect_mask if reg.dropconnect_mask is not None else byte, scalars,
    )  # fmt: skip
    flags = dict(
        RELU=cell == "indrnn_relu", REVERSE=bool(reverse), HAS_H0=h0 is not None,
        HAS_LENGTHS=lengths is not None, ZONEOUT_MASK=reg.zoneout_h is not None,
        ZONEOUT_MIX=reg.zoneout_h is None and reg.zoneout > 0,
        HAS_RMASK=reg.recurrent_mask is not None, HAS_UMASK=reg.dropconnect_mask is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=_BLOCK,
    )  # fmt: skip
    sizes = (T, B, H, (H + 7) // 8)
    grid = (triton.cdiv(B * H, _BLOCK),)
    return pointers, sizes, flags, grid


def forward(cell, xg, u, h0, lengths, reverse, reg):
    """(y, h_T) of an IndRNN layer in one direction; reg is a gpurnn Regularization
    (zoneout, recurrent dropout, DropConnect; no LayerNorm)."""
    T, B, H = xg.shape
    y = torch.zeros_like(xg)
    h_T = xg.new_empty(B, H)
    if B * H == 0:
        return y, h_T
    pointers, sizes, flags, grid = _common(cell, xg, u, h0, lengths, reverse, reg)
    _indrnn_fwd_kernel[grid](xg, *pointers, y, h_T, *sizes, **flags)
    return y, h_T


def backward(cell, xg, u, h0, lengths, reverse, reg, y, dy, dh_T):
    """(dxg, du, dh0) of `forward`: du (H,) the gradient of u itself (DropConnect's mask
    and scale applied), summed over the batch on the host in a fixed order."""
    from gpurnn import masks

    T, B, H = xg.shape
    dxg = torch.zeros_like(xg)
    dh0 = xg.new_empty(B, H)
    du_rows = torch.zeros(B, H, dtype=_acc(xg.dtype), device=xg.device)
    if B * H:
        pointers, sizes, flags, grid = _common(cell, xg, u, h0, lengths, reverse, reg)
        _indrnn_bwd_kernel[grid](xg, *pointers, y, dy, dh_T, dxg, du_rows, dh0, *sizes, **flags)
    du = du_rows.sum(0)
    if reg.dropconnect_mask is not None:
        du = du * masks.dropout_factors(reg.dropconnect_mask, H, reg.dropconnect, du.dtype)
    return dxg, du.to(u.dtype), dh0
