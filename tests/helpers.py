"""Shared test helpers: random models and inputs, running them, comparing with tolerances."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# (atol, rtol) per dtype against the float64 reference: the table `python -m gpurnn check` uses
from gpurnn.check import TOLERANCES  # noqa: F401 (re-exported for the tests)

TORCH_MODULES = {
    "rnn_tanh": torch.nn.RNN,
    "rnn_relu": torch.nn.RNN,
    "lstm": torch.nn.LSTM,
    "gru": torch.nn.GRU,
}


def module_kwargs(
    cell,
    input_size,
    hidden_size,
    num_layers=1,
    bias=True,
    bidirectional=False,
    proj_size=0,
    batch_first=False,
):
    kw = dict(
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        bias=bias,
        bidirectional=bidirectional,
        batch_first=batch_first,
    )
    if cell.startswith("rnn"):
        kw["nonlinearity"] = cell[4:]
    if proj_size:
        kw["proj_size"] = proj_size
    return kw


def make_torch_module(cell, *, dtype=torch.float64, **kw):
    return TORCH_MODULES[cell](**module_kwargs(cell, **kw), dtype=dtype)


def uneven_lengths(B, T, generator=None):
    """Lengths in [1, T], unsorted, with T present so that the padded length is T."""
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[torch.randint(0, B, (1,), generator=generator)] = T
    return lengths


def run_torch_style(model, x, hx, lengths, batch_first=False):
    """Runs `model` (torch.nn or gpurnn) on padded x, packed if lengths is given.
    Returns (padded output, hidden state(s))."""
    if lengths is None:
        return model(x, hx)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, hidden = model(packed, hx)
    total = x.shape[1 if batch_first else 0]
    out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=total)
    return out, hidden


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    actual = np.asarray(actual.detach().double().cpu() if torch.is_tensor(actual) else actual)
    expected = np.asarray(
        expected.detach().double().cpu() if torch.is_tensor(expected) else expected
    )
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)
