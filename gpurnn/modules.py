"""Drop-in replacements for torch.nn.RNN, LSTM, GRU and their cells.

The layer modules subclass `torch.nn.RNNBase` and the cells `torch.nn.RNNCellBase`, so
constructor arguments, defaults, parameter names and shapes, initialisation, `repr`,
`flatten_parameters` and `state_dict` are torch.nn's own; `state_dict`s load both ways.
They deliberately are *not* subclasses of nn.LSTM/GRU/RNN: TorchDynamo refuses to trace
those classes, and tracing gpurnn layers under torch.compile is part of the point.

Each module takes one extra keyword, `backend=` ("auto", "triton", "cupy", "torch",
"numpy"); see gpurnn.backends for how it combines with `use_backend` and GPURNN_BACKEND.

And four regularizers, all off by default (off, a module is exactly torch.nn's, state_dict
included): `zoneout=p`, `recurrent_dropout=p`, `dropconnect=p`, `layer_norm=True`; see
gpurnn.regularized, and gpurnn.reference for the formulas. LayerNorm adds the parameters
layer_norm_{ih,hh}_{weight,bias}_l{k}[_reverse] (G·H each) and, for LSTM,
layer_norm_c_{weight,bias}_l{k}[_reverse] (H); cells name them without the suffix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from gpurnn import functional, native, regularized
from gpurnn.backends import BACKENDS, choose_backend
from gpurnn.cells import MODE_TO_CELL
from gpurnn.recurrence import check_sequence_length, under_func_transform

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]


def _check_backend_name(backend: str | None) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def _check_same(what: str, tensor: Tensor, input: Tensor) -> None:
    """hx must live with the input: same device, and same dtype outside autocast."""
    if tensor.device != input.device:
        raise RuntimeError(
            f"Input and hidden tensors are not at the same device, found input tensor at "
            f"{input.device} and {what} tensor at {tensor.device}"
        )
    if tensor.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
        raise ValueError(
            f"{what} dtype ({tensor.dtype}) does not match input dtype ({input.dtype})"
        )


def _check_parameters_device(module: nn.Module, input: Tensor) -> None:
    param = next(module.parameters(), None)
    if param is not None and param.device != input.device:
        raise RuntimeError(
            f"Input and parameter tensors are not at the same device, found input tensor "
            f"at {input.device} and parameter tensor at {param.device}"
        )


def _compute_dtype(input: Tensor) -> torch.dtype:
    """The dtype the kernels will run in: autocast's where it is on (the input projection
    runs there, and the recurrence follows it), else the input's."""
    if torch.is_autocast_enabled(input.device.type):
        return torch.get_autocast_dtype(input.device.type)
    return input.dtype


def _native_allowed() -> bool:
    # under torch.compile the primitive (a custom op) runs instead: Dynamo traces it; under
    # torch.func transforms too: torch's native RNN ops have no batching rule
    return (
        not torch.compiler.is_compiling()
        and not under_func_transform()
        and native.native_layers_enabled()
    )


def _runs_natively(backend_name: str) -> bool:
    return backend_name == "torch" and _native_allowed()


class _Regularizable:
    """The regularizer keywords shared by layers and cells (gpurnn.regularized)."""

    def _init_regularizers(self, cell, suffixes, zoneout, recurrent_dropout, dropconnect,
                           layer_norm, factory):  # fmt: skip
        regularized.check_rates(zoneout, recurrent_dropout, dropconnect)
        self.zoneout = float(zoneout)
        self.recurrent_dropout = float(recurrent_dropout)
        self.dropconnect = float(dropconnect)
        self.layer_norm = bool(layer_norm)
        if self.layer_norm:
            regularized.add_layer_norm(self, cell, suffixes, self.hidden_size, factory)

    def _regularizers_repr(self) -> str:
        s = "".join(
            f", {name}={getattr(self, name)}"
            for name in ("zoneout", "recurrent_dropout", "dropconnect")
            if getattr(self, name, 0.0) > 0
        )
        return s + (", layer_norm=True" if getattr(self, "layer_norm", False) else "")

    def _regularized_now(self) -> bool:
        """Whether this call needs the regularized recurrence: eval-mode dropouts are the
        identity, so a layer with only those runs the plain kernels in eval."""
        return (
            getattr(self, "layer_norm", False)
            or getattr(self, "zoneout", 0.0) > 0
            or (self.training and (getattr(self, "recurrent_dropout", 0.0) > 0
                                   or getattr(self, "dropconnect", 0.0) > 0))
        )  # fmt: skip

    def _rates(self) -> dict:
        return dict(
            zoneout=getattr(self, "zoneout", 0.0),
            recurrent_dropout=getattr(self, "recurrent_dropout", 0.0),
            dropconnect=getattr(self, "dropconnect", 0.0),
            training=self.training,
        )


class _RNNBase(_Regularizable, nn.RNNBase):
    """The forward shared by RNN, LSTM and GRU (torch.nn writes it out three times)."""

    def __init__(
        self,
        mode: str,
        *args,
        backend: str | None = None,
        zoneout: float = 0.0,
        recurrent_dropout: float = 0.0,
        dropconnect: float = 0.0,
        layer_norm: bool = False,
        **kwargs,
    ):
        super().__init__(mode, *args, **kwargs)
        self.backend = _check_backend_name(backend)
        factory = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        self._init_regularizers(
            MODE_TO_CELL[mode], self._suffixes(), zoneout, recurrent_dropout, dropconnect,
            layer_norm, factory,
        )  # fmt: skip

    def _suffixes(self) -> list[str]:
        D = 2 if self.bidirectional else 1
        layers = range(self.num_layers)
        return [f"_l{k}" + ("_reverse" if d else "") for k in layers for d in range(D)]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        regularized.reset_layer_norm(self)

    def extra_repr(self) -> str:
        s = super().extra_repr() + self._regularizers_repr()
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")

    def forward(self, input, hx=None):
        cell = MODE_TO_CELL[self.mode]
        is_lstm = cell == "lstm"
        name = type(self).__name__
        D = 2 if self.bidirectional else 1
        orig_input = input
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = orig_input
            is_batched = True
            max_batch_size = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead"
                )
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)

        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = torch.zeros(
                self.num_layers * D,
                max_batch_size,
                real_hidden,
                dtype=input.dtype,
                device=input.device,
            )
            c0 = None
            if is_lstm:
                c0 = torch.zeros(
                    self.num_layers * D,
                    max_batch_size,
                    self.hidden_size,
                    dtype=input.dtype,
                    device=input.device,
                )
        else:
            h0, c0 = self._split_hx(hx, is_batched, name)
            _check_same("hidden" if not is_lstm else "hx[0]", h0, input)
            if is_lstm:
                _check_same("hx[1]", c0, input)
        self.check_forward_args(input, (h0, c0) if is_lstm else h0, batch_sizes)
        _check_parameters_device(self, input)
        if batch_sizes is None:  # (a PackedSequence cannot hold an empty sequence)
            check_sequence_length(input.size(1 if self.batch_first else 0))
        if sorted_indices is not None and hx is not None:
            # each row of hx belongs to the sequence the user passed in that row
            h0 = h0.index_select(1, sorted_indices)
            c0 = c0.index_select(1, sorted_indices) if c0 is not None else None

        compiling = torch.compiler.is_compiling()
        if self._regularized_now():
            backend = None
        else:
            backend = choose_backend(
                self.backend, cell, input.device, _compute_dtype(input), self.proj_size > 0,
                self.hidden_size, None if compiling else max_batch_size,
                torch_native=_native_allowed(),
            )  # fmt: skip
        if backend is None:
            output, h_n, c_n = self._forward_primitive(cell, input, batch_sizes, h0, c0, None)
        elif _runs_natively(backend):
            self._update_flat_weights()
            output, h_n, c_n = native.native_rnn(
                cell,
                input,
                batch_sizes,
                (h0, c0) if is_lstm else h0,
                self._flat_weights,
                self.bias,
                self.num_layers,
                self.dropout,
                self.training,
                self.bidirectional,
                self.batch_first,
            )
        else:
            output, h_n, c_n = self._forward_primitive(cell, input, batch_sizes, h0, c0, backend)

        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices) if c_n is not None else None
        if isinstance(orig_input, PackedSequence):
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        elif not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return output, ((h_n, c_n) if is_lstm else h_n)

    def _split_hx(self, hx, is_batched: bool, name: str):
        """(h0, c0) from hx with torch.nn's rank checks; unbatched hx gets a batch dim."""
        want = 3 if is_batched else 2
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        if self.mode == "LSTM":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            h0, c0 = hx
            if h0.dim() != want or c0.dim() != want:
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                )
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
            h0, c0 = hx, None
            if h0.dim() != want:
                raise RuntimeError(
                    f"For {kind} input, hx should also be {want}-D but got {h0.dim()}-D tensor"
                )
        if not is_batched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        return h0, c0

    def _forward_primitive(self, cell, input, batch_sizes, h0, c0, backend_name):
        """The layers through gpurnn's primitive: padded time-major in, same layout out."""
        lengths = None
        if batch_sizes is not None:
            # sorted order (longest first), as the packed data is; kernels skip the padding
            x, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        if backend_name is None:  # regularized: each layer chooses its backend
            ln = None
            if self.layer_norm:
                ln = regularized.layer_norm_weights(self, cell, self._suffixes())
            out, h_n, c_n = regularized.rnn(
                cell, x, h0, c0, functional.layer_weights(self), ln,
                num_layers=self.num_layers, bidirectional=self.bidirectional,
                dropout=self.dropout, lengths=lengths, backend=self.backend, **self._rates(),
            )  # fmt: skip
        else:
            out, h_n, c_n = functional.rnn(
                cell,
                x,
                h0,
                c0,
                functional.layer_weights(self),
                num_layers=self.num_layers,
                bidirectional=self.bidirectional,
                dropout=self.dropout,
                training=self.training,
                lengths=lengths,
                backend=backend_name,
            )
        if batch_sizes is not None:
            out = pack_padded_sequence(out, lengths).data
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, h_n, c_n


class RNN(_RNNBase):
    """Drop-in for torch.nn.RNN (Elman RNN, tanh or relu), plus `backend=`."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        mode = "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, *args, backend=backend, **kwargs)


class LSTM(_RNNBase):
    """Drop-in for torch.nn.LSTM (with proj_size), plus `backend=`."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__("LSTM", *args, backend=backend, **kwargs)

    # torch.nn.LSTM's hidden-state checks and permutation handle the (h, c) pair
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_RNNBase):
    """Drop-in for torch.nn.GRU, plus `backend=`."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, backend=backend, **kwargs)


# ----------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------


class _CellBase(_Regularizable, nn.RNNCellBase):
    """A cell's regularizers act on its one step: a call is a sequence of length one, so
    recurrent_dropout and dropconnect draw their masks at every call (a layer keeps them
    for the whole sequence)."""

    _cell: str

    def __init__(
        self, input_size, hidden_size, bias, num_chunks, device=None, dtype=None, backend=None,
        zoneout=0.0, recurrent_dropout=0.0, dropconnect=0.0, layer_norm=False, cell=None,
    ):  # fmt: skip
        super().__init__(input_size, hidden_size, bias, num_chunks, device=device, dtype=dtype)
        self.backend = _check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self._init_regularizers(
            cell, [""], zoneout, recurrent_dropout, dropconnect, layer_norm, factory
        )

    def reset_parameters(self) -> None:
        super().reset_parameters()
        regularized.reset_layer_norm(self)

    def extra_repr(self) -> str:
        s = super().extra_repr() + self._regularizers_repr()
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")

    def forward(self, input: Tensor, hx=None):
        name = type(self).__name__
        cell = self._cell
        is_lstm = cell == "lstm"
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            # torch.nn's errors (its C++ argument parser's TypeError), not a confusing
            # split of a Tensor along its first dimension
            if is_lstm and not isinstance(hx, (tuple, list)):
                raise TypeError(
                    f"{name}: hx must be a tuple of Tensors (h_0, c_0), not {type(hx).__name__}"
                )
            if not is_lstm and not isinstance(hx, Tensor):
                raise TypeError(f"{name}: hx must be a Tensor, not {type(hx).__name__}")
            if is_lstm and len(hx) != 2:
                raise RuntimeError(f"{name}: expects two hidden states (h_0, c_0), got {len(hx)}")
        states = () if hx is None else (tuple(hx) if is_lstm else (hx,))
        for idx, value in enumerate(states):
            if value.dim() not in (1, 2):
                what = f"hx[{idx}]" if is_lstm else "hidden"
                raise ValueError(
                    f"{name}: Expected {what} to be 1D or 2D, got {value.dim()}D instead"
                )
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
            states = tuple(s.unsqueeze(0) for s in states)
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"{name}: input has inconsistent input_size: got "
                f"{input.size(1)}, expected {self.input_size}"
            )
        if not states:
            zeros = torch.zeros(
                input.size(0), self.hidden_size, dtype=input.dtype, device=input.device
            )
            states = (zeros, zeros) if is_lstm else (zeros,)
        for idx, state in enumerate(states):
            what = f"hx[{idx}]" if is_lstm else "hx"
            expected = (input.size(0), self.hidden_size)
            if tuple(state.shape) != expected:
                raise RuntimeError(
                    f"{name}: {what} must have shape {expected} (batch size of "
                    f"input, hidden_size), got {tuple(state.shape)}"
                )
            _check_same(what, state, input)
        if input.dtype != self.weight_ih.dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(
                f"{name}: input dtype ({input.dtype}) does not match weight dtype "
                f"({self.weight_ih.dtype})"
            )
        _check_parameters_device(self, input)

        h, c = states[0], (states[1] if is_lstm else None)
        if self._regularized_now():
            ln = regularized.layer_norm_weights(self, cell, [""])[0] if self.layer_norm else None
            weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
            h_new, c_new = regularized.cell_step(
                cell, input, h, c, weights, ln, backend=self.backend, **self._rates()
            )
            if not is_batched:
                h_new = h_new.squeeze(0)
                c_new = c_new.squeeze(0) if c_new is not None else None
            return (h_new, c_new) if is_lstm else h_new
        backend = choose_backend(
            self.backend, cell, input.device, _compute_dtype(input), False, self.hidden_size,
            None if torch.compiler.is_compiling() else input.size(0),
        )  # fmt: skip
        if _runs_natively(backend):
            out = native.native_cell(
                cell,
                input,
                (h, c) if is_lstm else h,
                self.weight_ih,
                self.weight_hh,
                self.bias_ih,
                self.bias_hh,
            )
            h_new, c_new = out if is_lstm else (out, None)
        else:
            h_new, c_new = functional.cell_step(
                cell,
                input,
                h,
                c,
                self.weight_ih,
                self.weight_hh,
                self.bias_ih,
                self.bias_hh,
                backend=backend,
            )
        if not is_batched:
            h_new = h_new.squeeze(0)
            c_new = c_new.squeeze(0) if c_new is not None else None
        return (h_new, c_new) if is_lstm else h_new


class RNNCell(_CellBase):
    """Drop-in for torch.nn.RNNCell, plus `backend=`."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
        *,
        backend=None,
        **regularizers,
    ):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}")
        super().__init__(
            input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype,
            backend=backend, cell="rnn_" + nonlinearity, **regularizers,
        )  # fmt: skip
        self.nonlinearity = nonlinearity

    @property
    def _cell(self) -> str:
        return "rnn_" + self.nonlinearity


class LSTMCell(_CellBase):
    """Drop-in for torch.nn.LSTMCell, plus `backend=`."""

    _cell = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend=None,
        **regularizers,
    ):
        super().__init__(
            input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype,
            backend=backend, cell="lstm", **regularizers,
        )  # fmt: skip


class GRUCell(_CellBase):
    """Drop-in for torch.nn.GRUCell, plus `backend=`."""

    _cell = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend=None,
        **regularizers,
    ):
        super().__init__(
            input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype,
            backend=backend, cell="gru", **regularizers,
        )  # fmt: skip
