"""Training the way PyTorch users train: second-order gradients, backward in eval mode,
bitwise reproducibility (torch.use_deterministic_algorithms included), on every backend.

"torch" runs PyTorch's native layer functions, "torch-loop" the same backend's explicit
time loop (the primitive), "numpy" the float64 reference, "triton" the Triton kernels
(under the interpreter on CPU: tiny sizes only).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gpurnn
from gpurnn import native
from gpurnn.check import TF32_TOLERANCE
from tests.conftest import seeded_generator
from tests.helpers import (
    assert_close,
    make_torch_module,
    module_kwargs,
    run_torch_style,
    uneven_lengths,
)

GPURNN = {"rnn_tanh": gpurnn.RNN, "rnn_relu": gpurnn.RNN, "lstm": gpurnn.LSTM, "gru": gpurnn.GRU}
F64 = torch.float64
ALL_BACKENDS = ["torch", "torch-loop", "numpy", "triton"]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    if request.param == "torch-loop":
        with native.use_native_layers(False):
            yield "torch"
        return
    if request.param == "triton":
        reason = gpurnn.available_backends()["triton"]
        if reason is not None:
            pytest.skip(f"triton backend unavailable here: {reason}")
    yield request.param


def split(cell):
    """'lstm_proj' -> ('lstm', proj_size); other cells -> (cell, 0)."""
    return ("lstm", 2) if cell == "lstm_proj" else (cell, 0)


def make_pair(cell, backend, dtype=F64, **kw):
    """A torch.nn module and a gpurnn twin with the same weights."""
    ref = make_torch_module(cell, dtype=dtype, **kw)
    ours = GPURNN[cell](**module_kwargs(cell, **kw), dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def random_hx(cell, n, B, H, H_out, generator, dtype=F64):
    h0 = torch.randn(n, B, H_out, generator=generator, dtype=dtype)
    if cell == "lstm":
        return (h0, torch.randn(n, B, H, generator=generator, dtype=dtype))
    return (h0,)


# ----------------------------------------------------------------------------------------
# second-order gradients
# ----------------------------------------------------------------------------------------


def gradient_penalty_grads(cell, model, x, hx, lengths, out_weight):
    """A WGAN-GP style double backward: the gradient of a loss with respect to the input,
    the initial state and W_hh of the first layer, taken with create_graph=True; then the
    gradient of its squared norm with respect to everything. Returns every leaf's grad."""
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    out, hidden = run_torch_style(model, x, hx if cell == "lstm" else hx[0], lengths)
    states = hidden if cell == "lstm" else (hidden,)
    loss = (out * out_weight).sum() + sum((s * s).sum() for s in states)
    firsts = torch.autograd.grad(loss, (x, *hx, model.weight_hh_l0), create_graph=True)
    penalty = sum((g * g).sum() for g in firsts)
    penalty.backward()
    grads = {"x": x.grad, **{f"hx[{k}]": h.grad for k, h in enumerate(hx)}}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return grads


DOUBLE_BACKWARD_CASES = [
    # (cell, packed): two layers, bidirectional, every cell, padded and packed
    (cell, packed)
    for cell in ("rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj")
    for packed in (False, True)
]


@pytest.mark.parametrize("cell,packed", DOUBLE_BACKWARD_CASES)
def test_double_backward_matches_torch_nn(backend, cell, packed):
    cell, proj_size = split(cell)
    if backend == "triton" and (cell == "rnn_relu" or not packed):
        pytest.skip("the interpreter is slow: triton runs the packed case of each cell")
    gen = seeded_generator("double backward", cell, proj_size, packed)
    T, B, F, H = (4, 3, 2, 3) if backend == "triton" else (5, 4, 3, 4)
    layers = 1 if backend == "triton" else 2
    kw = dict(input_size=F, hidden_size=H, num_layers=layers, bidirectional=True)
    ref, ours = make_pair(cell, backend, proj_size=proj_size, **kw)
    x = torch.randn(T, B, F, generator=gen, dtype=F64)
    hx = random_hx(cell, 2 * layers, B, H, proj_size or H, gen)
    lengths = uneven_lengths(B, T, gen) if packed else None
    out_weight = torch.randn(T, B, 2 * (proj_size or H), generator=gen, dtype=F64)
    expected = gradient_penalty_grads(cell, ref, x, hx, lengths, out_weight)
    actual = gradient_penalty_grads(cell, ours, x, hx, lengths, out_weight)
    assert actual.keys() == expected.keys()
    for name, g in expected.items():
        assert_close(actual[name], g, F64, f"second-order grad {name}")


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_double_backward_cells_match_torch_nn(backend, cell):
    torch_cls = {"rnn_tanh": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}
    ours_cls = {"rnn_tanh": gpurnn.RNNCell, "gru": gpurnn.GRUCell, "lstm": gpurnn.LSTMCell}
    gen = seeded_generator("double backward cell", cell)
    ref = torch_cls[cell](3, 4, dtype=F64)
    ours = ours_cls[cell](3, 4, dtype=F64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, generator=gen, dtype=F64)
    hx = tuple(
        torch.randn(2, 4, generator=gen, dtype=F64) for _ in range(2 if cell == "lstm" else 1)
    )
    results = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        hxi = tuple(h.clone().requires_grad_() for h in hx)
        out = model(xi, hxi if cell == "lstm" else hxi[0])
        out = out if cell == "lstm" else (out,)
        loss = sum((o * o * o).sum() for o in out)
        firsts = torch.autograd.grad(
            loss, (xi, model.weight_ih, model.weight_hh), create_graph=True
        )
        sum((g * g).sum() for g in firsts).backward()
        results.append([xi.grad, *(h.grad for h in hxi), *(p.grad for p in model.parameters())])
    for k, (a, b) in enumerate(zip(results[1], results[0])):
        assert_close(a, b, F64, f"second-order grad #{k}")


# (triton is left out: numerical Jacobians take minutes of the interpreter; its second-order
# route is the same code, checked above through the layers)
@pytest.mark.parametrize("prim_backend", ["torch", "numpy"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_primitive_gradgradcheck(prim_backend, cell):
    """The primitive itself (xg given directly, no projection to rebuild it from) is
    twice differentiable in every input, checked numerically, lengths and reverse included."""
    gen = seeded_generator("gradgradcheck", prim_backend, cell)
    G = {"rnn_tanh": 1, "gru": 3, "lstm": 4}[cell]
    T, B, H = 3, 2, 2
    xg = torch.randn(T, B, G * H, generator=gen, dtype=F64).requires_grad_()
    w_hh = (0.5 * torch.randn(G * H, H, generator=gen, dtype=F64)).requires_grad_()
    h0 = torch.randn(B, H, generator=gen, dtype=F64).requires_grad_()
    c0 = torch.randn(B, H, generator=gen, dtype=F64).requires_grad_() if cell == "lstm" else None
    b_hn = torch.randn(H, generator=gen, dtype=F64).requires_grad_() if cell == "gru" else None
    lengths = torch.tensor([3, 2])

    def f(xg, w_hh, h0, *rest):
        c0 = rest[0] if cell == "lstm" else None
        b_hn = rest[0] if cell == "gru" else None
        y, h_T, c_T = gpurnn.recurrence(
            cell, xg, w_hh, h0, c0, lengths=lengths, reverse=True, b_hn=b_hn,
            backend=prim_backend,
        )  # fmt: skip
        return (y, h_T) if c_T is None else (y, h_T, c_T)

    inputs = (xg, w_hh, h0) + tuple(t for t in (c0, b_hn) if t is not None)
    assert torch.autograd.gradgradcheck(f, inputs)


# ----------------------------------------------------------------------------------------
# backward in eval mode
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_backward_in_eval_mode(backend, cell):
    """eval() with dropout set: the backward runs and equals training mode's with dropout 0."""
    gen = seeded_generator("eval backward", cell)
    small = backend == "triton"
    T, B, F, H = (3, 2, 2, 3) if small else (5, 3, 3, 4)
    kw = dict(input_size=F, hidden_size=H, num_layers=2, bidirectional=not small)
    ref, model = make_pair(cell, backend, **kw)
    model.dropout = 0.5
    x = torch.randn(T, B, F, generator=gen, dtype=F64)
    weight = torch.randn(T, B, H * (1 if small else 2), generator=gen, dtype=F64)
    grads = {}
    for mode in ("eval", "train"):
        if mode == "eval":
            model.eval()
        else:
            model.train()
            model.dropout = 0.0
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out, _ = model(xi)
        (out * weight).sum().backward()
        grads[mode] = [xi.grad] + [p.grad.clone() for p in model.parameters()]
    for k, (a, b) in enumerate(zip(grads["eval"], grads["train"])):
        assert_close(a, b, F64, f"eval-mode grad #{k}")


def test_cudnn_routing_decision():
    """Eager torch-backend layers let cuDNN run only where it can do what was asked."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    may = native.native_may_use_cudnn
    assert may(cuda, training=True, needs_grad=True, dropout_active=False)
    assert may(cuda, training=False, needs_grad=False, dropout_active=False), "eval inference"
    assert not may(cuda, training=False, needs_grad=True, dropout_active=False), "eval backward"
    assert not may(cuda, training=True, needs_grad=True, dropout_active=True), "cuDNN dropout"
    assert may(cpu, training=False, needs_grad=True, dropout_active=True), "no cuDNN on CPU"
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not may(cuda, training=True, needs_grad=True, dropout_active=False)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_native_call_runs_with_cudnn_off_when_routed_away(monkeypatch):
    """native_rnn turns cuDNN off around PyTorch's call where the decision says so, passes
    it the layer's own training flag and needs-grad, and restores the flag afterwards."""
    seen = []
    real_lstm = native._NATIVE_LAYERS["lstm"]

    def recording_lstm(*args):
        seen.append(torch.backends.cudnn.enabled)
        return real_lstm(*args)

    decisions = []

    def decide(device, training, needs_grad, dropout_active):
        decisions.append((training, needs_grad, dropout_active))
        return False

    monkeypatch.setitem(native._NATIVE_LAYERS, "lstm", recording_lstm)
    monkeypatch.setattr(native, "native_may_use_cudnn", decide)
    model = gpurnn.LSTM(2, 3, num_layers=2, dropout=0.25, backend="torch").eval()
    before = torch.backends.cudnn.enabled
    model(torch.randn(4, 1, 2, requires_grad=True))
    with torch.no_grad():
        model.train()(torch.randn(4, 1, 2))
    assert seen == [False, False]
    assert decisions == [(False, True, False), (True, False, True)]
    assert torch.backends.cudnn.enabled == before


# ----------------------------------------------------------------------------------------
# bitwise determinism
# ----------------------------------------------------------------------------------------


def run_once(model, x, hx, seed):
    """One training step's output, final states and every gradient, from a fixed seed."""
    torch.manual_seed(seed)
    model.zero_grad()
    xi = x.clone().requires_grad_()
    out, hidden = model(xi, hx)
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    (out.square().sum() + sum(s.sum() for s in states)).backward()
    return [out.detach(), *(s.detach() for s in states), xi.grad] + [
        p.grad.clone() for p in model.parameters()
    ]


def assert_bitwise_reproducible(model, x, hx):
    first, second = run_once(model, x, hx, seed=11), run_once(model, x, hx, seed=11)
    for k, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor #{k} differs between two runs with the same seed"
    other = run_once(model, x, hx, seed=12)
    assert not torch.equal(first[0], other[0]), "dropout must depend on the seed"


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bitwise_reproducible_with_dropout(backend, cell, deterministic):
    """Same inputs and seed, three layers with dropout between them, in training: outputs,
    states and every gradient equal bit for bit, under use_deterministic_algorithms(True)."""
    gen = seeded_generator("determinism", cell)
    T, B, F, H = (3, 2, 2, 3) if backend == "triton" else (6, 4, 3, 8)
    model = GPURNN[cell](F, H, num_layers=3, dropout=0.5, backend=backend)
    x = torch.randn(T, B, F, generator=gen)
    lengths = uneven_lengths(B, T, gen)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    assert_bitwise_reproducible(model, x, None)
    # packed input: the same, through the length-aware path
    first = run_packed(model, packed, 5)
    second = run_packed(model, packed, 5)
    for k, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"packed: tensor #{k} differs"


def run_packed(model, packed, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    out, _ = model(packed)
    out.data.square().sum().backward()
    return [out.data.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["torch", "triton", "cupy"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bitwise_reproducible_on_gpu(gpu_backend, cell, monkeypatch, deterministic):
    """The same check at a real size on CUDA, in bfloat16 (what such a model trains in)."""
    dtype = torch.bfloat16
    reason = gpurnn.available_backends()[gpu_backend]
    if reason is not None:
        pytest.skip(f"{gpu_backend} unavailable: {reason}")
    # cuBLAS is deterministic only with a fixed workspace; torch refuses to run without it
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    gen = seeded_generator("determinism gpu", cell)
    T, B, F, H = 128, 32, 64, 256
    model = GPURNN[cell](F, H, num_layers=3, dropout=0.3, backend=gpu_backend)
    model = model.to("cuda", dtype)
    x = torch.randn(T, B, F, generator=gen).to("cuda", dtype)
    assert_bitwise_reproducible(model, x, None)


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["torch", "triton", "cupy"])
def test_backward_in_eval_mode_on_gpu(gpu_backend):
    """On CUDA, where torch.nn's cuDNN path raises in eval mode, every backend backprops."""
    reason = gpurnn.available_backends()[gpu_backend]
    if reason is not None:
        pytest.skip(f"{gpu_backend} unavailable: {reason}")
    gen = seeded_generator("eval gpu", gpu_backend)
    model = gpurnn.LSTM(16, 64, num_layers=2, dropout=0.2, backend=gpu_backend).cuda().eval()
    x = torch.randn(20, 8, 16, generator=gen).cuda().requires_grad_()
    out, _ = model(x)
    out.sum().backward()
    ref = torch.nn.LSTM(16, 64, num_layers=2).cuda()
    ref.load_state_dict(model.state_dict())
    with torch.backends.cudnn.flags(enabled=False):  # torch.nn's own eval-mode backward
        xr = x.detach().clone().requires_grad_()
        ref.eval()(xr)[0].sum().backward()
    gpu_close(x.grad, xr.grad, "eval-mode input grad on CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["triton", "cupy"])
def test_double_backward_on_gpu(gpu_backend):
    reason = gpurnn.available_backends()[gpu_backend]
    if reason is not None:
        pytest.skip(f"{gpu_backend} unavailable: {reason}")
    gen = seeded_generator("double backward gpu", gpu_backend)
    ref = torch.nn.GRU(8, 32, num_layers=2, bidirectional=True).cuda()
    ours = gpurnn.GRU(8, 32, num_layers=2, bidirectional=True, backend=gpu_backend).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 4, 8, generator=gen).cuda()
    weight = torch.randn(16, 4, 64, generator=gen).cuda()
    h0 = torch.randn(4, 4, 32, generator=gen).cuda()
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN has no double backward
        expected = gradient_penalty_grads("gru", ref, x, (h0,), None, weight)
    actual = gradient_penalty_grads("gru", ours, x, (h0,), None, weight)
    for name, g in expected.items():
        gpu_close(actual[name], g, f"second-order grad {name} on CUDA")


def gpu_close(actual, expected, what):
    # fp32 GEMMs may run on TF32 tensor cores on a GPU
    atol, rtol = TF32_TOLERANCE
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=what)
