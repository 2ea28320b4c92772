"""gpurnn's modules against torch.nn in float64, under every CPU backend.

"torch" runs PyTorch's native layer functions, "torch-loop" the same backend's explicit
time loop and hand-written BPTT (the primitive), "numpy" the float64 reference.
"""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gpurnn
from gpurnn import native
from tests.helpers import (
    assert_close,
    make_torch_module,
    module_kwargs,
    run_torch_style,
    uneven_lengths,
)

GPURNN = {"rnn_tanh": gpurnn.RNN, "rnn_relu": gpurnn.RNN, "lstm": gpurnn.LSTM, "gru": gpurnn.GRU}
CPU_BACKENDS = ["torch", "torch-loop", "numpy"]
F64 = torch.float64


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    if request.param == "torch-loop":
        with native.use_native_layers(False):
            yield "torch"
        return
    yield request.param


def make_pair(cell, backend, **kw):
    """A torch.nn module and a gpurnn twin loaded from its state_dict."""
    ref = make_torch_module(cell, **kw)
    ours = GPURNN[cell](**module_kwargs(cell, **kw), dtype=F64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def random_hx(cell, num_layers, D, B, H, H_out):
    h0 = torch.randn(num_layers * D, B, H_out, dtype=F64)
    if cell == "lstm":
        return h0, torch.randn(num_layers * D, B, H, dtype=F64)
    return h0


def leaves(hx):
    hx = hx if isinstance(hx, tuple) else (hx,)
    return tuple(h.clone().requires_grad_() for h in hx)


def compare_forward_backward(cell, ref, ours, x, hx, lengths, batch_first):
    """Runs both with the same inputs, compares outputs, states and every gradient."""
    results = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        hxi = leaves(hx) if hx is not None else None
        arg = None if hxi is None else (hxi if cell == "lstm" else hxi[0])
        out, hidden = run_torch_style(model, xi, arg, lengths, batch_first)
        states = hidden if cell == "lstm" else (hidden,)
        results.append((xi, hxi, out, states, model))
    (x_r, hx_r, out_r, st_r, _), (x_o, hx_o, out_o, st_o, _) = results
    assert_close(out_o, out_r, F64, "output")
    for k, (a, b) in enumerate(zip(st_o, st_r)):
        assert_close(a, b, F64, f"state {k}")
    torch.manual_seed(1234)
    weights = [torch.randn_like(out_r)] + [torch.randn_like(s) for s in st_r]
    for out, states in ((out_r, st_r), (out_o, st_o)):
        loss = (out * weights[0]).sum() + sum((s * w).sum() for s, w in zip(states, weights[1:]))
        loss.backward()
    assert_close(x_o.grad, x_r.grad, F64, "grad input")
    if hx_r is not None:
        for k, (a, b) in enumerate(zip(hx_o, hx_r)):
            assert_close(a.grad, b.grad, F64, f"grad hx[{k}]")
    ref_params = dict(results[0][4].named_parameters())
    for name, p in results[1][4].named_parameters():
        assert_close(p.grad, ref_params[name].grad, F64, f"grad {name}")


MATRIX = list(
    itertools.product(
        ["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj"],  # cell
        [True, False],  # bias
        [False, True],  # bidirectional
        [False, True],  # batch_first
        [False, True],  # packed with uneven lengths
        [1, 2],  # num_layers
    )
)


@pytest.mark.parametrize("cell,bias,bidirectional,batch_first,packed,num_layers", MATRIX)
def test_matches_torch_nn(backend, cell, bias, bidirectional, batch_first, packed, num_layers):
    proj_size = 3 if cell == "lstm_proj" else 0
    cell = "lstm" if proj_size else cell
    T, B, F, H = 5, 4, 3, 5
    D = 2 if bidirectional else 1
    kw = dict(
        input_size=F,
        hidden_size=H,
        num_layers=num_layers,
        bias=bias,
        bidirectional=bidirectional,
        proj_size=proj_size,
        batch_first=batch_first,
    )
    ref, ours = make_pair(cell, backend, **kw)
    x = torch.randn(*((B, T) if batch_first else (T, B)), F, dtype=F64)
    hx = random_hx(cell, num_layers, D, B, H, proj_size or H)
    lengths = uneven_lengths(B, T) if packed else None
    compare_forward_backward(cell, ref, ours, x, hx, lengths, batch_first)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
@pytest.mark.parametrize("packed", [False, True])
def test_hx_absent(backend, cell, packed):
    ref, ours = make_pair(
        cell, backend, input_size=3, hidden_size=4, num_layers=2, bidirectional=True
    )
    x = torch.randn(6, 3, 3, dtype=F64)
    compare_forward_backward(
        cell, ref, ours, x, None, uneven_lengths(3, 6) if packed else None, False
    )


@pytest.mark.parametrize("cell", ["rnn_relu", "gru", "lstm"])
def test_packed_enforce_sorted(backend, cell):
    ref, ours = make_pair(cell, backend, input_size=3, hidden_size=4, bidirectional=True)
    x = torch.randn(6, 4, 3, dtype=F64)
    lengths = torch.tensor([6, 5, 3, 1])
    outs = []
    for model in (ref, ours):
        out, hidden = model(pack_padded_sequence(x, lengths, enforce_sorted=True))
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        outs.append((pad_packed_sequence(out)[0], hidden))
    assert_close(outs[1][0], outs[0][0], F64, "output")
    h_o, h_r = outs[1][1], outs[0][1]
    for a, b in zip(h_o if cell == "lstm" else (h_o,), h_r if cell == "lstm" else (h_r,)):
        assert_close(a, b, F64, "state")


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm", "lstm_proj"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_input(backend, cell, batch_first, with_hx):
    proj_size = 2 if cell == "lstm_proj" else 0
    cell = "lstm" if proj_size else cell
    ref, ours = make_pair(
        cell,
        backend,
        input_size=3,
        hidden_size=4,
        num_layers=2,
        bidirectional=True,
        proj_size=proj_size,
        batch_first=batch_first,
    )
    x = torch.randn(5, 3, dtype=F64)
    hx = None
    if with_hx:
        hx = random_hx(cell, 2, 2, 1, 4, proj_size or 4)
        hx = tuple(h[:, 0] for h in hx) if cell == "lstm" else hx[:, 0]
    (out_r, hid_r), (out_o, hid_o) = ref(x, hx), ours(x, hx)
    assert out_o.shape == out_r.shape == (5, 2 * (proj_size or 4))
    assert_close(out_o, out_r, F64, "output")
    for a, b in zip(hid_o if cell == "lstm" else (hid_o,), hid_r if cell == "lstm" else (hid_r,)):
        assert a.shape == b.shape
        assert_close(a, b, F64, "state")


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_cells_match_torch_nn(backend, cell, bias, batched, with_hx):
    torch_cls = {
        "rnn_tanh": torch.nn.RNNCell,
        "rnn_relu": torch.nn.RNNCell,
        "lstm": torch.nn.LSTMCell,
        "gru": torch.nn.GRUCell,
    }[cell]
    ours_cls = {
        "rnn_tanh": gpurnn.RNNCell,
        "rnn_relu": gpurnn.RNNCell,
        "lstm": gpurnn.LSTMCell,
        "gru": gpurnn.GRUCell,
    }[cell]
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    ref = torch_cls(3, 5, bias=bias, dtype=F64, **kw)
    ours = ours_cls(3, 5, bias=bias, dtype=F64, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    shape = (4, 3) if batched else (3,)
    x = torch.randn(*shape, dtype=F64)
    n_states = 2 if cell == "lstm" else 1
    hx = tuple(torch.randn(*shape[:-1], 5, dtype=F64) for _ in range(n_states)) if with_hx else None
    results = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        hxi = tuple(h.clone().requires_grad_() for h in hx) if hx is not None else None
        out = model(xi, None if hxi is None else (hxi if cell == "lstm" else hxi[0]))
        out = out if cell == "lstm" else (out,)
        loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=F64).view_as(o)).sum() for o in out)
        loss.backward()
        results.append((out, xi, hxi, model))
    for a, b in zip(results[1][0], results[0][0]):
        assert_close(a, b, F64, "cell output")
    assert_close(results[1][1].grad, results[0][1].grad, F64, "grad input")
    if hx is not None:
        for a, b in zip(results[1][2], results[0][2]):
            assert_close(a.grad, b.grad, F64, "grad hx")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_params[name].grad, F64, f"grad {name}")


def test_dropout_between_layers_in_training_only(backend):
    ref, ours = make_pair("lstm", backend, input_size=3, hidden_size=8, num_layers=3)
    ref.dropout = ours.dropout = 0.5
    x = torch.randn(6, 2, 3, dtype=F64)
    ref.eval(), ours.eval()
    assert_close(ours(x)[0], ref(x)[0], F64, "eval output with dropout set")
    ours.train()
    torch.manual_seed(0)
    a = ours(x)[0]
    torch.manual_seed(0)
    b = ours(x)[0]
    torch.manual_seed(1)
    c = ours(x)[0]
    assert torch.equal(a, b), "same seed, same dropout mask"
    assert not torch.allclose(a, c), "dropout must be active in training mode"
    assert not torch.allclose(a, ref(x)[0]), "training output must differ from eval output"


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_constructor_parameters_and_init_match_torch_nn(cell):
    kw = module_kwargs(
        cell, 3, 5, num_layers=2, bidirectional=True, proj_size=2 if cell == "lstm" else 0
    )
    torch.manual_seed(7)
    ref = torch_twin(cell, kw)
    torch.manual_seed(7)
    ours = GPURNN[cell](**kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype
        assert torch.equal(p, q), f"{n}: same seed must give the same initial weights"
    assert repr(ours) == repr(ref)


def torch_twin(cell, kw):
    return {"rnn_tanh": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](**kw)


def test_positional_arguments_match_torch_nn():
    ours, ref = gpurnn.RNN(3, 4, 2, "relu", False, True), torch.nn.RNN(3, 4, 2, "relu", False, True)
    assert (ours.nonlinearity, ours.bias, ours.batch_first, ours.num_layers) == (
        ref.nonlinearity,
        ref.bias,
        ref.batch_first,
        ref.num_layers,
    )
    ours = gpurnn.LSTM(3, 4, 1, True, True, 0.0, True, 2)
    assert ours.batch_first and ours.bidirectional and ours.proj_size == 2
    cell = gpurnn.RNNCell(3, 4, False, "relu")
    assert not cell.bias and cell.nonlinearity == "relu"


def test_factory_kwargs():
    m = gpurnn.GRU(3, 4, num_layers=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    m = gpurnn.LSTM(3, 4, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())
    c = gpurnn.LSTMCell(3, 4, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in c.parameters())


@pytest.mark.parametrize("cell", ["rnn_relu", "gru", "lstm"])
def test_state_dict_loads_both_ways(cell):
    kw = module_kwargs(
        cell,
        3,
        5,
        num_layers=2,
        bidirectional=True,
        bias=False,
        proj_size=2 if cell == "lstm" else 0,
    )
    ref = torch_twin("rnn_tanh" if cell == "rnn_relu" else cell, kw)
    ours = GPURNN[cell](**kw)
    ours.load_state_dict(ref.state_dict())
    for (n, p), (_, q) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 2, 3)
    assert_close(ours(x)[0], ref(x)[0], torch.float32, "output after loading ours into torch")
    for (n, p), (_, q) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n


def test_convert_nested_model():
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(3, 5, num_layers=2, batch_first=True, bidirectional=True)
            self.cells = torch.nn.ModuleList(
                [torch.nn.GRUCell(10, 4), torch.nn.RNNCell(4, 4, nonlinearity="relu")]
            )

        def forward(self, x):
            out, _ = self.rnn(x)
            h = self.cells[0](out[:, -1])
            return self.cells[1](h)

    model = torch.nn.Sequential(Encoder(), torch.nn.Sequential(torch.nn.GRU(4, 6))).double()
    model.eval()
    x = torch.randn(2, 7, 3, dtype=F64)
    expected = model[0](x)
    params_before = {n: p for n, p in model.named_parameters()}
    out = gpurnn.convert(model)
    assert out is model
    assert type(model[0].rnn) is gpurnn.LSTM and type(model[1][0]) is gpurnn.GRU
    assert type(model[0].cells[0]) is gpurnn.GRUCell
    assert type(model[0].cells[1]) is gpurnn.RNNCell
    assert model[0].cells[1].nonlinearity == "relu" and model[0].rnn.batch_first
    assert not model[0].rnn.training, "train/eval mode is kept"
    for n, p in model.named_parameters():
        assert p is params_before[n], f"{n}: parameters are shared, not copied"
    assert_close(model[0](x), expected, F64, "output after convert")
    single = gpurnn.convert(torch.nn.GRU(2, 3), backend="numpy")
    assert type(single) is gpurnn.GRU and single.backend == "numpy"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_autocast_runs_the_recurrence_in_the_autocast_dtype(backend, cell):
    """Under torch.autocast the input projection runs in bf16 and gpurnn's recurrence
    follows it, for every cell: bf16 outputs, close to the fp32 model's. (The native torch
    path does exactly what torch.nn does under autocast.)"""
    ref, ours = make_pair(cell, backend, input_size=3, hidden_size=8, num_layers=2)
    ref.float(), ours.float()
    x = torch.randn(6, 2, 3)
    expected, _ = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(x)
        ref_out, _ = ref(x)
    if backend == "torch" and native.native_layers_enabled():
        assert out.dtype == ref_out.dtype
        assert_close(out.float(), ref_out.float(), torch.float32, "native autocast output")
    else:
        assert out.dtype == torch.bfloat16
        assert_close(out.float(), expected, torch.bfloat16, "autocast output")
