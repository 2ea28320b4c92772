"""What a backend implements: the recurrence primitive's forward and backward.

A backend never sees modules, layers or PackedSequences: only one (layer, direction)
recurrence at a time, in the time-major layout of the primitive (see gpurnn.recurrence).
Every backend is reached through the `gpurnn::recurrence` custom op, which owns autograd;
a backend's forward may return one `workspace` tensor of whatever it wants to keep for its
backward (gate activations, cell states), or an empty tensor if it recomputes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor


class Inputs(NamedTuple):
    """The primitive's inputs for one (layer, direction), as every backend receives them
    (see gpurnn.recurrence for their shapes). In `backward`, xg is None when the backend's
    `backward_uses_xg` is False: the custom op need not have kept it."""

    cell: str
    xg: Tensor | None
    w_hh: Tensor
    h0: Tensor | None = None
    c0: Tensor | None = None
    lengths: Tensor | None = None
    reverse: bool = False
    b_hn: Tensor | None = None
    w_hr: Tensor | None = None


class Grads(NamedTuple):
    """Gradients of the primitive's differentiable inputs; None where an input was absent."""

    xg: Tensor
    w_hh: Tensor
    h0: Tensor | None
    c0: Tensor | None
    b_hn: Tensor | None
    w_hr: Tensor | None


class Regularization(NamedTuple):
    """What a regularized recurrence (gpurnn.regularized) adds to Inputs; the formulas are
    gpurnn.reference's. Masks are packed bits (gpurnn.masks), drawn above the backends;
    a rate with no mask is eval mode: zoneout then mixes with weight p, the dropouts are
    the identity."""

    zoneout: float = 0.0
    zoneout_h: Tensor | None = None  # (T, B, ⌈H_out/8⌉): 1 = the unit keeps h_{t-1}
    zoneout_c: Tensor | None = None  # (T, B, ⌈H/8⌉), LSTM: 1 = the unit keeps c_{t-1}
    recurrent_dropout: float = 0.0
    recurrent_mask: Tensor | None = None  # (B, ⌈H_out/8⌉): 1 = h_{t-1} enters W_hh
    dropconnect: float = 0.0
    dropconnect_mask: Tensor | None = None  # w_hh's shape, last axis packed: 1 = kept
    ln_hh_weight: Tensor | None = None  # (G*H,)
    ln_hh_bias: Tensor | None = None
    ln_c_weight: Tensor | None = None  # (H,), LSTM
    ln_c_bias: Tensor | None = None


class LayerNormGrads(NamedTuple):
    """Gradients of a regularized recurrence's LayerNorm parameters; None where absent."""

    ln_hh_weight: Tensor | None = None
    ln_hh_bias: Tensor | None = None
    ln_c_weight: Tensor | None = None
    ln_c_bias: Tensor | None = None


class Backend(ABC):
    name: str = "?"
    # False when `backward` works from the workspace and outputs alone, so the custom op
    # need not keep the (T, B, G*H) input projection alive until backward; xg is then None.
    backward_uses_xg: bool = True
    # False when `backward` never reads y (it then receives None): the custom op keeps no
    # reference to the y it returns, so the caller may modify y in place before backward,
    # as torch.nn's CPU layers allow. Where it is True, doing so raises autograd's
    # version-counter error in backward, as torch.nn's cuDNN (and oneDNN) layers do.
    backward_uses_y: bool = True

    def unavailable_reason(self) -> str | None:
        """None when the backend can run on this machine, else why it cannot."""
        return None

    def check_deferred(self) -> None:
        """Raise an error that launches of this backend flagged on the device but did not
        check yet (gpurnn.functional calls it once per module call); nothing by default."""
        return None

    def unsupported_reason(
        self,
        cell: str,
        device: torch.device,
        dtype: torch.dtype,
        projected: bool,
        hidden_size: int | None = None,
    ) -> str | None:
        """None when the backend runs this case (cell, device, dtype, LSTM projection,
        hidden size where known), else why not. Must depend on nothing else: the choice is
        a constant under torch.compile."""
        return None

    def auto_reason(self, cell: str, projected: bool) -> str | None:
        """None when "auto" may pick this backend for a case it supports, else why not (a
        path that runs when asked for by name but has not yet passed its GPU tests)."""
        return None

    def workspace_spec(
        self, cell: str, T: int, B: int, H: int, dtype: torch.dtype, save: bool
    ) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the workspace `forward` returns (used by the fake kernel too)."""
        return (0,), dtype

    def regularized_unsupported_reason(
        self, cell: str, device: torch.device, dtype: torch.dtype, projected: bool, kinds
    ) -> str | None:
        """As `unsupported_reason`, for a regularized recurrence; `kinds` names what is on
        ("zoneout", "recurrent_dropout", "dropconnect", "layer_norm", "indrnn")."""
        return (
            f"the {self.name} backend does not run regularized recurrences yet "
            f"({', '.join(kinds)}); the torch and numpy backends do"
        )

    def regularized_auto_reason(self, cell: str) -> str | None:
        """As `auto_reason`, for a regularized recurrence it runs."""
        return None

    def regularized_workspace_spec(
        self,
        cell: str,
        T: int,
        B: int,
        H: int,
        dtype: torch.dtype,
        save: bool,
        reg: Regularization | None = None,
    ) -> tuple[tuple[int, ...], torch.dtype]:
        """As `workspace_spec`, for `regularized_forward` with `reg` (none by default:
        backward recomputes)."""
        return (0,), dtype

    def regularized_forward(
        self, inputs: Inputs, reg: Regularization, save: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """`forward` with the regularizers of `reg`. Returns (y, h_T, c_T or None, workspace)."""
        raise NotImplementedError(f"gpurnn backend {self.name!r} has no regularized recurrences")

    def regularized_backward(
        self, inputs: Inputs, reg: Regularization, y, workspace, dy, dh_T, dc_T
    ) -> tuple[Grads, LayerNormGrads]:
        """`backward` of `regularized_forward`."""
        raise NotImplementedError(f"gpurnn backend {self.name!r} has no regularized recurrences")

    @abstractmethod
    def forward(self, inputs: Inputs, save: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Returns (y, h_T, c_T or None, workspace). `save` is False when no backward will run."""

    @abstractmethod
    def backward(
        self,
        inputs: Inputs,
        y: Tensor,
        workspace: Tensor,
        dy: Tensor,
        dh_T: Tensor,
        dc_T: Tensor | None,
    ) -> Grads:
        """Gradients of the inputs, given those of (y, h_T, c_T); dc_T is None unless LSTM,
        y None unless `backward_uses_y`."""
