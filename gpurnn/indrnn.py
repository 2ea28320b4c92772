"""`gpurnn.IndRNN`: the independently recurrent network of Li et al. 2018,

    h_t = act(x_t W_ihᵀ + b_ih + u ⊙ h_{t-1} + b_hh),   act = tanh or relu,

with torch.nn.RNN's surface: num_layers, bidirectional, batch_first, packed sequences,
hx, inter-layer dropout, unbatched input, and the regularizers zoneout, recurrent_dropout
and dropconnect (gpurnn.regularized; LayerNorm would couple the units it keeps apart).
Parameters per layer k (suffix `_reverse` for the second direction): weight_ih_l{k}
(H, input), weight_hh_l{k} (H,) = u, bias_ih_l{k} and bias_hh_l{k} (H,). Every unit recurs
on itself only, so the recurrence needs no exchange between units at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from gpurnn import regularized
from gpurnn.modules import _check_backend_name, _check_parameters_device, _check_same
from gpurnn.recurrence import check_sequence_length

__all__ = ["IndRNN"]


class IndRNN(nn.Module):
    """IndRNN layers (Li et al. 2018), arguments as torch.nn.RNN's plus the regularizers
    and `backend=`. Initialisation: weight_ih and the biases uniform in ±1/√H as torch.nn.RNN;
    u uniform in [0, 1] (Li et al.: |u| ≤ 1 keeps relu units from exploding, and u near 0
    would forget in a step)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        zoneout: float = 0.0,
        recurrent_dropout: float = 0.0,
        dropconnect: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of "
                "an element being zeroed"
            )
        regularized.check_rates(zoneout, recurrent_dropout, dropconnect)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.nonlinearity, self.bias, self.batch_first = nonlinearity, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        self.zoneout, self.recurrent_dropout = float(zoneout), float(recurrent_dropout)
        self.dropconnect = float(dropconnect)
        self.backend = _check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        for k in range(num_layers):
            for d in range(D):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                in_k = input_size if k == 0 else D * hidden_size
                self.register_parameter(
                    "weight_ih" + sfx, nn.Parameter(torch.empty(hidden_size, in_k, **factory))
                )
                self.register_parameter(
                    "weight_hh" + sfx, nn.Parameter(torch.empty(hidden_size, **factory))
                )
                for name in ("bias_ih", "bias_hh"):
                    p = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
                    self.register_parameter(name + sfx, p)
        self.reset_parameters()

    @property
    def _cell(self) -> str:
        return "indrnn_" + self.nonlinearity

    def _suffixes(self) -> list[str]:
        D = 2 if self.bidirectional else 1
        return [
            f"_l{k}" + ("_reverse" if d else "") for k in range(self.num_layers) for d in range(D)
        ]

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("weight_hh"):
                    p.uniform_(0.0, 1.0)
                else:
                    p.uniform_(-stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("zoneout", 0.0),
                              ("recurrent_dropout", 0.0), ("dropconnect", 0.0)):  # fmt: skip
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")

    def forward(self, input, hx: Tensor | None = None):
        D = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        lengths = sorted_indices = unsorted_indices = None
        if packed:
            sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
            x, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes))
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"IndRNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead"
                )
            is_batched = input.dim() == 3
            x = input if is_batched else input.unsqueeze(1 if not self.batch_first else 0)
            x = x.transpose(0, 1) if self.batch_first else x
            check_sequence_length(x.size(0))
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {x.size(-1)}"
            )
        B = x.size(1)
        expected = (self.num_layers * D, B, self.hidden_size)
        if hx is None:
            h0 = x.new_zeros(expected)
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"IndRNN: hx must be a Tensor, got {type(hx).__name__}")
            want = 3 if is_batched else 2
            if hx.dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor"
                )
            h0 = hx if is_batched else hx.unsqueeze(1)
            if tuple(h0.shape) != expected:
                raise RuntimeError(f"Expected hidden size {expected}, got {list(h0.shape)}")
            _check_same("hidden", h0, x)
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
        _check_parameters_device(self, x)
        weights = [
            tuple(getattr(self, f"{kind}{sfx}") for kind in ("weight_ih", "weight_hh",
                                                              "bias_ih", "bias_hh")) + (None,)
            for sfx in self._suffixes()
        ]  # fmt: skip
        out, h_n, _ = regularized.rnn(
            self._cell, x, h0, None, weights, None, num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=self.dropout, training=self.training,
            lengths=lengths, zoneout=self.zoneout, recurrent_dropout=self.recurrent_dropout,
            dropconnect=self.dropconnect, backend=self.backend,
        )  # fmt: skip
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        if packed:
            data = pack_padded_sequence(out, lengths).data
            return PackedSequence(data, input.batch_sizes, sorted_indices, unsorted_indices), h_n
        if self.batch_first:
            out = out.transpose(0, 1)
        if not is_batched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
        return out, h_n
