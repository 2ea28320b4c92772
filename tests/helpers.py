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


def relu_clear_of_zero(xg, w_hh, h0, lengths, reverse, margin=2e-2):
    """An RNN-relu input whose float64 pre-activations all sit at least `margin` away from 0.

    relu's derivative is a step: where a pre-activation is within a 16-bit rounding of 0,
    a kernel computing correctly in 16 bits may land on the other side of it than the
    float64 reference and pass (or block) that whole gradient, which then flows on through
    W_hh into earlier steps. Nudging xg step by step (and re-rounding to its dtype) removes
    that ambiguity from the test instead of loosening its tolerance. Returns a new xg.
    """
    dt, dev = xg.dtype, xg.device
    x = xg.detach().double().cpu().numpy().copy()
    w = w_hh.detach().double().cpu().numpy()
    T, B, H = x.shape
    h = np.zeros((B, H)) if h0 is None else h0.detach().double().cpu().numpy().copy()
    L = np.full(B, T) if lengths is None else lengths.detach().cpu().numpy()
    for t in reversed(range(T)) if reverse else range(T):
        valid = (t < L)[:, None]
        for _ in range(4):  # re-rounding can move a value back inside the margin
            pre = x[t] + h @ w.T
            near = valid & (np.abs(pre) < margin)
            if not near.any():
                break
            x[t] += np.where(near, np.where(pre >= 0, 2 * margin, -2 * margin), 0.0)
            x[t] = torch.from_numpy(x[t]).to(dt).double().numpy()
        pre = x[t] + h @ w.T
        h = np.where(valid, np.maximum(pre, 0.0), h)
    return torch.from_numpy(x).to(dt).to(dev)
