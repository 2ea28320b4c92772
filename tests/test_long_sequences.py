"""Very long sequences: T = 100,000 steps, past cuDNN's limit of 65,535.

On CPU the loop backends run it whole (the cheapest cell, a tiny layer): the torch loop
and the float64 reference agree on every output and gradient, and the native path (what
backend="torch" modules run eagerly) agrees with both. The Triton interpreter costs tens
of milliseconds a step, so 100,000 steps are out of reach there; the `gpu` tests run the
kernels at T = 140,000 with T·B·G·H > 2³¹, where an offset formed in int32 would wrap,
and check the far end of the sequence against a run of that end alone.
"""

from __future__ import annotations

import pytest
import torch

import gpurnn
from tests.conftest import seeded_generator
from tests.helpers import assert_close

F64 = torch.float64
T_LONG = 100_000


def test_100k_steps_on_the_loop_backends():
    g = seeded_generator("T=100k")
    B, H = 2, 2
    lengths = torch.tensor([T_LONG, T_LONG - 7])
    xg = torch.randn(T_LONG, B, H, generator=g, dtype=F64)
    w_hh = torch.randn(H, H, generator=g, dtype=F64) * 0.5
    h0 = torch.randn(B, H, generator=g, dtype=F64)
    dy = torch.randn(T_LONG, B, H, generator=g, dtype=F64)
    results = {}
    for name in ("torch", "numpy"):
        leaves = [t.clone().requires_grad_() for t in (xg, w_hh, h0)]
        y, h_T, _ = gpurnn.recurrence("rnn_tanh", *leaves, lengths=lengths, backend=name)
        grads = torch.autograd.grad([y, h_T], leaves, [dy, torch.ones_like(h_T)])
        results[name] = (y.detach(), h_T.detach(), *grads)
    names = ("y", "h_T", "grad xg", "grad w_hh", "grad h0")
    for what, a, b in zip(names, results["torch"], results["numpy"]):
        assert_close(a, b, F64, f"T={T_LONG} {what}")
    # the native layer (torch.nn's own function) on the full-length sequence
    rnn = gpurnn.RNN(H, H, bias=False, dtype=F64, backend="torch")
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.eye(H, dtype=F64))  # so that xg is the input itself
        rnn.weight_hh_l0.copy_(w_hh)
        out, h_n = rnn(xg[:, :1], h0[None, :1])
    assert_close(out, results["numpy"][0][:, :1], F64, "native output")


# ---------------------------------------------------------------------------------------
# GPU: the kernels at a length where T * B * G * H passes 2**31
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_triton_past_int32_offsets(cell):
    """T = 140,000, B = 16, H = 256 in bf16: xg's last step starts past element 2**31 (an
    int32 offset would wrap). The last K steps of the long run (outputs, and the gradient
    of xg when the loss looks at them alone) equal a run of those steps alone, started from
    the long run's state: the far end was read and written where it belongs."""
    T, B, H, K = 140_000, 16, 256, 64
    G = 4 if cell == "lstm" else 3
    assert T * B * G * H > 2**31
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = seeded_generator("past int32", cell)
    xg = (torch.randn(T, B, G * H, generator=g) * 0.5).to(dev, dt)
    w_hh = (torch.randn(G * H, H, generator=g) / H**0.5).to(dev, dt)
    b_hn = torch.zeros(H, device=dev, dtype=dt) if cell == "gru" else None
    dy = torch.zeros(T, B, H, device=dev, dtype=dt)
    dy[-K:] = torch.randn(K, B, H, generator=g).to(dev, dt)

    def run(xg, h0, c0):
        xg = xg.clone().requires_grad_()
        y, h_T, c_T = gpurnn.recurrence(cell, xg, w_hh, h0, c0, b_hn=b_hn, backend="triton")
        (dxg,) = torch.autograd.grad(y, xg, dy[-xg.shape[0] :])
        return y.detach(), h_T.detach(), dxg

    y, h_T, dxg = run(xg, None, None)
    torch.cuda.synchronize()
    h_start = y[T - K - 1]
    c_start = None
    if cell == "lstm":  # the cell state there: rerun the prefix (its own offsets are small)
        _, _, c_start = gpurnn.recurrence(cell, xg[: T - K], w_hh, backend="triton")
    y_tail, h_tail, dxg_tail = run(xg[T - K :], h_start, c_start)
    for what, a, b in (("y", y[T - K :], y_tail), ("h_T", h_T, h_tail),
                       ("dxg", dxg[T - K :], dxg_tail)):  # fmt: skip
        err = (a.float() - b.float()).abs().max().item()
        scale = max(1.0, b.float().abs().max().item())
        assert err / scale < 4e-2, f"{cell} {what}: error {err:.3g} at T={T}"
    assert torch.isfinite(dxg[: T - K]).all()
