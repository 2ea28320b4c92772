"""Dropout and zoneout masks of the regularized recurrences, kept as bits.

A mask is drawn from torch's generator on the device it is drawn for (so `torch.manual_seed`
reproduces it, and every backend that receives it sees the very same bits) and kept packed,
eight elements to a byte along its last axis: element j of a row is bit j % 8 (least
significant first, NumPy's bitorder="little") of byte j // 8. A (T, B, H) zoneout mask thus
costs T·B·⌈H/8⌉ bytes between forward and backward. Drawing goes in chunks of rows, so the
uniform draws behind the bits never take more than `DRAW_CHUNK` elements at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

DRAW_CHUNK = 1 << 22  # uniform draws alive at once while drawing a mask


def packed_width(n: int) -> int:
    """Bytes that hold n bits."""
    return (n + 7) // 8


def _shifts(device) -> Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack(bits: Tensor) -> Tensor:
    """bool (..., n) -> uint8 (..., ⌈n/8⌉)."""
    n = bits.shape[-1]
    pad = packed_width(n) * 8 - n
    if pad:
        bits = torch.cat([bits, bits.new_zeros(*bits.shape[:-1], pad)], dim=-1)
    grouped = bits.reshape(*bits.shape[:-1], packed_width(n), 8).to(torch.uint8)
    return (grouped << _shifts(bits.device)).sum(-1, dtype=torch.uint8)


def unpack(packed: Tensor, n: int, dtype: torch.dtype = torch.bool) -> Tensor:
    """uint8 (..., ⌈n/8⌉) -> (..., n) in `dtype` (0/1)."""
    bits = (packed[..., None] >> _shifts(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :n].to(dtype)


def draw(shape: tuple[int, ...], p: float, device) -> Tensor:
    """A packed mask of `shape` whose bits are 1 with probability p each, independently."""
    *rows, n = shape
    count = 1
    for r in rows:
        count *= r
    per_chunk = max(1, DRAW_CHUNK // max(n, 1))
    chunks = [
        pack(torch.rand(min(per_chunk, count - start), n, device=device) < p)
        for start in range(0, count, per_chunk)
    ]
    flat = torch.cat(chunks) if chunks else torch.empty(0, packed_width(n), dtype=torch.uint8)
    return flat.reshape(*rows, packed_width(n)).to(device)


def dropout_scale(p: float) -> float:
    """What a kept element is multiplied by: 1/(1 − p) (0 when everything drops)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_factors(packed: Tensor, n: int, p: float, dtype: torch.dtype) -> Tensor:
    """A packed dropout mask of rate p as the factors it multiplies by: 1/(1 − p) where
    kept, 0 where dropped, (..., n) in `dtype`."""
    return unpack(packed, n, dtype) * dropout_scale(p)
