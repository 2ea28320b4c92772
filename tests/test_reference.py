"""The NumPy reference against torch.autograd in float64: outputs, states, every gradient."""

import itertools

import numpy as np
import pytest
import torch

from gpurnn import reference
from tests.helpers import assert_close, make_torch_module, run_torch_style, uneven_lengths

CASES = [
    # cell, bias, bidirectional, num_layers, proj_size, packed
    *itertools.product(
        ["rnn_tanh", "rnn_relu", "gru", "lstm"],
        [True, False],
        [False, True],
        [1, 2],
        [0],
        [False, True],
    ),
    *itertools.product(["lstm"], [True, False], [False, True], [1, 2], [3], [False, True]),
]


@pytest.mark.parametrize("cell,bias,bidirectional,num_layers,proj_size,packed", CASES)
def test_module_reference_matches_torch_autograd(
    cell, bias, bidirectional, num_layers, proj_size, packed
):
    T, B, F, H = 5, 3, 4, 6
    model = make_torch_module(
        cell,
        input_size=F,
        hidden_size=H,
        num_layers=num_layers,
        bias=bias,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    D = 2 if bidirectional else 1
    H_out = proj_size or H
    x = torch.randn(T, B, F, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(num_layers * D, B, H_out, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(num_layers * D, B, H, dtype=torch.float64, requires_grad=True)
    hx = (h0, c0) if cell == "lstm" else h0
    lengths = uneven_lengths(B, T) if packed else None

    out, hidden = run_torch_style(model, x, hx, lengths)
    h_n, c_n = hidden if cell == "lstm" else (hidden, None)
    d_out, d_hn = torch.randn_like(out), torch.randn_like(h_n)
    d_cn = torch.randn_like(c_n) if c_n is not None else None
    loss = (out * d_out).sum() + (h_n * d_hn).sum() + ((c_n * d_cn).sum() if c_n is not None else 0)
    loss.backward()

    params = {k: v.detach().numpy() for k, v in model.named_parameters()}
    np_len = lengths.numpy() if lengths is not None else None
    c0_np = c0.detach().numpy() if cell == "lstm" else None
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, lengths=np_len)
    r_out, r_hn, r_cn = reference.rnn_forward(
        cell, x.detach().numpy(), params, h0.detach().numpy(), c0_np, **kw
    )
    assert_close(r_out, out, torch.float64, "output")
    assert_close(r_hn, h_n, torch.float64, "h_n")
    if cell == "lstm":
        assert_close(r_cn, c_n, torch.float64, "c_n")

    dx, dh0, dc0, dparams = reference.rnn_backward(
        cell,
        x.detach().numpy(),
        params,
        h0.detach().numpy(),
        c0_np,
        d_out.numpy(),
        d_hn.numpy(),
        d_cn.numpy() if d_cn is not None else None,
        **kw,
    )
    assert_close(dx, x.grad, torch.float64, "grad input")
    assert_close(dh0, h0.grad, torch.float64, "grad h0")
    if cell == "lstm":
        assert_close(dc0, c0.grad, torch.float64, "grad c0")
    assert set(dparams) == set(params)
    for name, p in model.named_parameters():
        assert_close(dparams[name], p.grad, torch.float64, f"grad {name}")


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj"])
@pytest.mark.parametrize("reverse", [False, True])
def test_primitive_backward_matches_finite_differences(cell, reverse):
    """The primitive alone, with a zero-length sequence and h0/c0 left out (zeros)."""
    rng = np.random.default_rng()
    proj = cell == "lstm_proj"
    cell = "lstm" if proj else cell
    T, B, H, P = 4, 3, 3, 2
    G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[cell]
    H_out = P if proj else H
    inputs = {
        "xg": rng.standard_normal((T, B, G * H)),
        "w_hh": rng.standard_normal((G * H, H_out)),
        "b_hn": rng.standard_normal(H) if cell == "gru" else None,
        "w_hr": rng.standard_normal((P, H)) if proj else None,
    }
    lengths = np.array([T, 0, 2])
    dy = rng.standard_normal((T, B, H_out))
    dh_T = rng.standard_normal((B, H_out))
    dc_T = rng.standard_normal((B, H)) if cell == "lstm" else None

    def loss(**kw):
        y, h_T, c_T = reference.recurrence_forward(cell, lengths=lengths, reverse=reverse, **kw)
        return (
            (y * dy).sum() + (h_T * dh_T).sum() + ((c_T * dc_T).sum() if c_T is not None else 0.0)
        )

    grads = reference.recurrence_backward(
        cell,
        inputs["xg"],
        inputs["w_hh"],
        None,
        None,
        lengths,
        reverse,
        inputs["b_hn"],
        inputs["w_hr"],
        dy,
        dh_T,
        dc_T,
    )
    assert grads["h0"] is None and grads["c0"] is None
    eps = 1e-6
    for name, value in inputs.items():
        if value is None:
            assert grads[name] is None
            continue
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            for sign in (1, -1):
                bumped = value.copy()
                bumped[idx] += sign * eps
                numeric[idx] += sign * loss(**{**inputs, name: bumped}) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, atol=1e-7, rtol=1e-6, err_msg=name)
    # a zero-length sequence gets no gradient into its inputs and writes zeros
    y, h_T, _ = reference.recurrence_forward(cell, lengths=lengths, reverse=reverse, **inputs)
    assert (y[:, 1] == 0).all() and (h_T[1] == 0).all() and (grads["xg"][:, 1] == 0).all()
