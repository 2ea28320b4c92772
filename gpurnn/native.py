"""The modules' fast path for backend="torch": PyTorch's native RNN functions.

Run eagerly with backend="torch", gpurnn's layers and cells call the functions
`torch.nn.LSTM` & co. call themselves (`torch._VF.lstm` & co.: cuDNN on a GPU, oneDNN/ATen
on a CPU) instead of the recurrence primitive, so gpurnn costs nothing over torch.nn there.
Under torch.compile the primitive runs instead (Dynamo traces the custom op, not these).

`use_native_layers(False)` turns the fast path off for a block, so that the same modules
run through the torch backend's explicit loop (tests compare the two).
"""

from __future__ import annotations

import contextlib

import torch

_native_layers = True


def native_layers_enabled() -> bool:
    """Whether eager modules with backend="torch" take PyTorch's native functions."""
    return _native_layers


@contextlib.contextmanager
def use_native_layers(enabled: bool):
    """Turn the native fast path on or off for the block (restored on the way out).

    The setting is process-wide, like torch.backends.cudnn.enabled, not per thread."""
    global _native_layers
    previous = _native_layers
    _native_layers = bool(enabled)
    try:
        yield
    finally:
        _native_layers = previous


_NATIVE_LAYERS = {
    "lstm": torch._VF.lstm,
    "gru": torch._VF.gru,
    "rnn_tanh": torch._VF.rnn_tanh,
    "rnn_relu": torch._VF.rnn_relu,
}
_NATIVE_CELLS = {
    "lstm": torch._VF.lstm_cell,
    "gru": torch._VF.gru_cell,
    "rnn_tanh": torch._VF.rnn_tanh_cell,
    "rnn_relu": torch._VF.rnn_relu_cell,
}


def native_may_use_cudnn(
    device: torch.device, training: bool, needs_grad: bool, dropout_active: bool
) -> bool:
    """Whether an eager layer may let PyTorch's native RNN function run cuDNN. cuDNN's RNN
    cannot backpropagate in eval mode ("cudnn RNN backward can only be called in training
    mode"), draws its dropout masks from a state of its own that torch.manual_seed does not
    reset (same seed, different masks), and is documented as nondeterministic on some
    cuDNN/CUDA versions. PyTorch's other native path (fused cell kernels and GEMMs, what
    torch.nn runs with cuDNN disabled) has none of these limits, so those cases go there."""
    if torch.device(device).type != "cuda":
        return True  # cuDNN is CUDA only: nothing to route
    if needs_grad and not training:
        return False
    if dropout_active or torch.are_deterministic_algorithms_enabled():
        return False
    return True


@contextlib.contextmanager
def cudnn_disabled():
    """cuDNN off for the block (the flag is global; restored on the way out)."""
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled


def native_rnn(
    cell,
    input,
    batch_sizes,
    hx,
    flat_weights,
    bias,
    num_layers,
    dropout,
    training,
    bidirectional,
    batch_first,
):
    """torch.nn's own call: returns (output, h_n, c_n or None). On CUDA, with cuDNN only
    where `native_may_use_cudnn` allows it."""
    fn = _NATIVE_LAYERS[cell]
    states = hx if isinstance(hx, tuple) else (hx,)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, *states, *flat_weights)
    )
    dropout_active = training and dropout > 0 and num_layers > 1
    may_use_cudnn = native_may_use_cudnn(input.device, training, needs_grad, dropout_active)
    with contextlib.nullcontext() if may_use_cudnn else cudnn_disabled():
        if batch_sizes is None:
            result = fn(
                input, hx, flat_weights, bias, num_layers, dropout, training, bidirectional,
                batch_first,
            )  # fmt: skip
        else:
            result = fn(
                input, batch_sizes, hx, flat_weights, bias, num_layers, dropout, training,
                bidirectional,
            )  # fmt: skip
    if cell == "lstm":
        return result[0], result[1], result[2]
    return result[0], result[1], None


def native_cell(cell, input, hx, w_ih, w_hh, b_ih, b_hh):
    return _NATIVE_CELLS[cell](input, hx, w_ih, w_hh, b_ih, b_hh)
