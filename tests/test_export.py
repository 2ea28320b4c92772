"""Models that leave Python: torch.export with a symbolic length and batch size, and ONNX
files that onnxruntime runs without gpurnn, compared with torch.nn at other shapes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpurnn
from gpurnn import functional
from tests.conftest import seeded_generator
from tests.helpers import make_torch_module, module_kwargs

GPURNN = {"rnn_tanh": gpurnn.RNN, "rnn_relu": gpurnn.RNN, "lstm": gpurnn.LSTM, "gru": gpurnn.GRU}
GPURNN_CELLS = {
    "rnn_tanh": gpurnn.RNNCell,
    "rnn_relu": gpurnn.RNNCell,
    "lstm": gpurnn.LSTMCell,
    "gru": gpurnn.GRUCell,
}
TORCH_CELLS = {
    "rnn_tanh": torch.nn.RNNCell,
    "rnn_relu": torch.nn.RNNCell,
    "lstm": torch.nn.LSTMCell,
    "gru": torch.nn.GRUCell,
}
CELLS = list(GPURNN)
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
F, H = 3, 5
# (num_layers, bidirectional, batch_first)
LAYOUTS = [(1, False, False), (2, True, True)]
# the shapes a model is exported with, and the shapes it must then run at
EXPORT_TB = (4, 3)
OTHER_TB = [(9, 2), (1, 1), (6, 5)]
ATOL = 1e-5
Dim = torch.export.Dim

# torch.onnx notes that inputs sharing the batch Dim share its name: true, and harmless
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")


def fill_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """torch.nn's initialisation range, drawn from this session's generator."""
    bound = 1 / H**0.5
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
    return module.eval()


def layer_pair(cell, num_layers, bidirectional, batch_first, key):
    g = seeded_generator(*key)
    kw = dict(input_size=F, hidden_size=H, num_layers=num_layers, bidirectional=bidirectional)
    ref = fill_(make_torch_module(cell, dtype=torch.float32, batch_first=batch_first, **kw), g)
    ours = GPURNN[cell](**module_kwargs(cell, batch_first=batch_first, **kw)).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours, g


def layer_inputs(cell, num_layers, bidirectional, batch_first, T, B, g):
    """(x, h0[, c0]) for a layer module, flattened so that every input is a tensor."""
    x = torch.randn((B, T, F) if batch_first else (T, B, F), generator=g)
    states = [torch.randn(num_layers * (2 if bidirectional else 1), B, H, generator=g)]
    if cell == "lstm":
        states.append(torch.randn(states[0].shape, generator=g))
    return (x, *states)


class WithState(torch.nn.Module):
    """A layer or cell called with its initial state, outputs flattened to tensors."""

    def __init__(self, inner, cell):
        super().__init__()
        self.inner, self.is_lstm = inner, cell == "lstm"
        self.eval()

    def forward(self, x, h0, c0=None):
        out = self.inner(x, (h0, c0) if self.is_lstm else h0)
        if isinstance(self.inner, torch.nn.RNNBase):
            out, state = out
            return (out, *state) if self.is_lstm else (out, state)
        return tuple(out) if self.is_lstm else (out,)


def layer_dynamic_shapes(cell, batch_first):
    T, B = Dim("T", min=1), Dim("B", min=1)
    x = {0: B, 1: T} if batch_first else {0: T, 1: B}
    return (x, {1: B}, {1: B}) if cell == "lstm" else (x, {1: B})


def assert_outputs_close(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        a = a.detach().numpy() if torch.is_tensor(a) else a
        np.testing.assert_allclose(a, e.detach().numpy(), atol=ATOL, rtol=0, err_msg=f"{what} #{i}")


# ----------------------------------------------------------------------------------------
# torch.export
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "L{}-bi{:d}-bf{:d}".format(*v))
@pytest.mark.parametrize("cell", CELLS)
def test_torch_export_runs_at_other_lengths_and_batches(cell, layout):
    ref, ours, g = layer_pair(cell, *layout, key=("torch.export", cell, layout))
    model = WithState(ours, cell)
    args = layer_inputs(cell, *layout, *EXPORT_TB, g)
    program = torch.export.export(model, args, dynamic_shapes=layer_dynamic_shapes(cell, layout[2]))
    for T, B in OTHER_TB:
        args = layer_inputs(cell, *layout, T, B, g)
        with torch.no_grad():
            assert_outputs_close(
                program.module()(*args), WithState(ref, cell)(*args), f"{cell} T={T} B={B}"
            )


@pytest.mark.parametrize("cell", CELLS)
def test_torch_export_cells(cell):
    g = seeded_generator("torch.export cell", cell)
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    ref = fill_(TORCH_CELLS[cell](F, H, **kw), g)
    ours = GPURNN_CELLS[cell](F, H, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    B = Dim("B", min=1)
    shapes = ({0: B}, {0: B}, {0: B}) if cell == "lstm" else ({0: B}, {0: B})

    def inputs(batch):
        n = 2 if cell == "lstm" else 1
        return (torch.randn(batch, F, generator=g), *torch.randn(n, batch, H, generator=g))

    program = torch.export.export(WithState(ours, cell), inputs(3), dynamic_shapes=shapes)
    for batch in (1, 7):
        args = inputs(batch)
        with torch.no_grad():
            assert_outputs_close(program.module()(*args), WithState(ref, cell)(*args), cell)


def test_torch_export_strict():
    """TorchDynamo's tracer (strict=True) takes the same path as the default one."""
    cell, layout = "gru", (2, True, True)
    ref, ours, g = layer_pair(cell, *layout, key=("strict",))
    program = torch.export.export(
        WithState(ours, cell),
        layer_inputs(cell, *layout, *EXPORT_TB, g),
        dynamic_shapes=layer_dynamic_shapes(cell, True),
        strict=True,
    )
    assert "gpurnn.layer" in program.graph_module.code
    for T, B in OTHER_TB:
        args = layer_inputs(cell, *layout, T, B, g)
        with torch.no_grad():
            assert_outputs_close(program.module()(*args), WithState(ref, cell)(*args), "strict")


def test_torch_export_saves_loads_and_trains(tmp_path):
    """The exported program survives torch.export.save/load (importing gpurnn registers its
    ops) and backpropagates like the eager module."""
    cell, layout = "lstm", (2, True, False)
    ref, ours, g = layer_pair(cell, *layout, key=("save-load",))
    args = layer_inputs(cell, *layout, *EXPORT_TB, g)
    program = torch.export.export(
        WithState(ours, cell), args, dynamic_shapes=layer_dynamic_shapes(cell, False)
    )
    torch.export.save(program, tmp_path / "lstm.pt2")
    loaded = torch.export.load(tmp_path / "lstm.pt2").module()
    args = layer_inputs(cell, *layout, 7, 2, g)
    weights = torch.randn(7, 2, 2 * H, generator=g)
    results = []
    for model in (loaded, WithState(ref, cell)):
        leaves = [a.clone().requires_grad_() for a in args]
        out = model(*leaves)
        (out[0] * weights).sum().add(out[1].sum()).add(out[2].square().sum()).backward()
        params = dict(model.named_parameters())
        grads = [params[k].grad for k in sorted(params, key=lambda k: k.split(".")[-1])]
        results.append((out, [leaf.grad for leaf in leaves], grads))
    (out, input_grads, weight_grads), (ref_out, ref_input_grads, ref_weight_grads) = results
    assert_outputs_close(out, ref_out, "outputs")
    assert_outputs_close(input_grads, ref_input_grads, "input gradients")
    assert_outputs_close(weight_grads, ref_weight_grads, "weight gradients")


# ----------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from gpurnn.export import export_onnx  # noqa: E402


def onnx_session(program):
    return ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def run_onnx(session, args):
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: a.numpy() for n, a in zip(names, args)})


def assert_standard_onnx(program, *op_types):
    nodes = list(program.model_proto.graph.node)
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, "non-standard ONNX ops"
    assert {n.op_type for n in nodes} & set(op_types), f"no {op_types} node"
    assert not program.model_proto.functions


ONNX_OP = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "gru": "GRU"}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "L{}-bi{:d}-bf{:d}".format(*v))
@pytest.mark.parametrize("cell", CELLS)
def test_onnx_matches_torch_nn_at_any_length_and_batch(cell, layout):
    ref, ours, g = layer_pair(cell, *layout, key=("onnx", cell, layout))
    args = layer_inputs(cell, *layout, *EXPORT_TB, g)
    program = export_onnx(
        WithState(ours, cell), args, dynamic_shapes=layer_dynamic_shapes(cell, layout[2])
    )
    assert_standard_onnx(program, ONNX_OP[cell])
    # one recurrent node per (layer, direction) on the layer's own weights: no identity GEMM
    recurrent = [n for n in program.model_proto.graph.node if n.op_type == ONNX_OP[cell]]
    assert len(recurrent) == layout[0] * (2 if layout[1] else 1)
    assert not any(
        n.op_type in ("MatMul", "Gemm", "EyeLike") for n in program.model_proto.graph.node
    )
    session = onnx_session(program)
    for T, B in [EXPORT_TB, *OTHER_TB]:
        args = layer_inputs(cell, *layout, T, B, g)
        with torch.no_grad():
            expected = WithState(ref, cell)(*args)
        assert_outputs_close(run_onnx(session, args), expected, f"{cell} T={T} B={B}")


def test_onnx_without_initial_state():
    """A model called with input only: the zero initial state follows the batch size."""
    ref, ours, g = layer_pair("gru", 2, True, True, key=("onnx no hx",))
    x = torch.randn(3, 4, F, generator=g)
    program = export_onnx(ours, (x,), dynamic_shapes=({0: Dim("B"), 1: Dim("T")},))
    session = onnx_session(program)
    for T, B in OTHER_TB:
        x = torch.randn(B, T, F, generator=g)
        with torch.no_grad():
            out, h_n = ref(x)
        assert_outputs_close(run_onnx(session, (x,)), (out, h_n), f"T={T} B={B}")


@pytest.mark.parametrize("cell", CELLS)
def test_onnx_cells(cell):
    g = seeded_generator("onnx cell", cell)
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    ref = fill_(TORCH_CELLS[cell](F, H, **kw), g)
    ours = GPURNN_CELLS[cell](F, H, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    n = 2 if cell == "lstm" else 1

    def inputs(batch):
        return (torch.randn(batch, F, generator=g), *torch.randn(n, batch, H, generator=g))

    B = Dim("B", min=1)
    program = export_onnx(WithState(ours, cell), inputs(3), dynamic_shapes=({0: B},) * (1 + n))
    assert_standard_onnx(program, ONNX_OP[cell])
    session = onnx_session(program)
    for batch in (1, 6):
        args = inputs(batch)
        with torch.no_grad():
            assert_outputs_close(run_onnx(session, args), WithState(ref, cell)(*args), cell)


class Primitive(torch.nn.Module):
    """gpurnn.recurrence called directly, with per-sequence lengths."""

    def __init__(self, cell, reverse, g):
        super().__init__()
        self.cell, self.reverse = cell, reverse
        self.w_hh = torch.nn.Parameter(torch.randn(GATES[cell] * H, H, generator=g) * 0.4)
        self.b_hn = torch.nn.Parameter(torch.randn(H, generator=g)) if cell == "gru" else None

    def forward(self, xg, lengths, h0, c0=None):
        y, h_T, c_T = gpurnn.recurrence(
            self.cell, xg, self.w_hh, h0, c0, lengths=lengths, reverse=self.reverse, b_hn=self.b_hn
        )
        return (y, h_T) if c_T is None else (y, h_T, c_T)


class StackWithLengths(torch.nn.Module):
    """gpurnn.functional.rnn on padded input with per-sequence lengths."""

    def __init__(self, cell, g):
        super().__init__()
        self.cell = cell
        layers = make_torch_module(
            cell, dtype=torch.float32, input_size=F, hidden_size=H, num_layers=2,
            bidirectional=True,
        )  # fmt: skip
        self.layers = fill_(layers, g)

    def forward(self, x, lengths, h0, c0=None):
        out, h_n, c_n = functional.rnn(
            self.cell, x, h0, c0, functional.layer_weights(self.layers),
            num_layers=2, bidirectional=True, lengths=lengths,
        )  # fmt: skip
        return (out, h_n) if c_n is None else (out, h_n, c_n)


def lengths_inputs(cell, stacked, T, B, g):
    """(x or xg, lengths with a 0 among them, h0[, c0]) for Primitive / StackWithLengths."""
    width = F if stacked else GATES[cell] * H
    state = (4, B, H) if stacked else (B, H)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = 0
    states = [torch.randn(state, generator=g) for _ in range(2 if cell == "lstm" else 1)]
    return (torch.randn(T, B, width, generator=g), lengths, *states)


@pytest.mark.parametrize("cell", CELLS)
def test_onnx_lengths_and_direction(cell):
    """Per-sequence lengths (0 included) become sequence_lens, in both directions, for a
    stack of bidirectional layers and for the primitive called directly (forward for two
    cells, reverse for the other two: each export takes a while)."""
    g = seeded_generator("onnx lengths", cell)
    reverse = cell in ("gru", "rnn_relu")
    for model in (Primitive(cell, reverse, g).eval(), StackWithLengths(cell, g).eval()):
        stacked = isinstance(model, StackWithLengths)
        T, B = Dim("T", min=1), Dim("B", min=1)
        state = {1: B} if stacked else {0: B}
        n_states = 2 if cell == "lstm" else 1
        program = export_onnx(
            model,
            lengths_inputs(cell, stacked, *EXPORT_TB, g),
            dynamic_shapes=({0: T, 1: B}, {0: B}, *(state,) * n_states),
        )
        session = onnx_session(program)
        for T, B in OTHER_TB:
            args = lengths_inputs(cell, stacked, T, B, g)
            with torch.no_grad():
                expected = model(*args)
            what = f"{type(model).__name__} T={T} B={B}"
            assert_outputs_close(run_onnx(session, args), expected, what)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_export_onnx_stores_weights_in_onnx_gate_order(cell):
    """Past the optimizer's folding limit too (W_hh here has 4·48·48 > 8192 elements), the
    recurrent nodes read initializers already in ONNX's gate order: no per-run reordering."""
    g = seeded_generator("stored weights", cell)
    hidden = 48
    ref = make_torch_module(cell, dtype=torch.float32, input_size=F, hidden_size=hidden)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / hidden**0.5)
    ours = GPURNN[cell](F, hidden).eval()
    ours.load_state_dict(ref.state_dict())
    program = export_onnx(
        ours, (torch.randn(4, 3, F, generator=g),), dynamic_shapes=({0: Dim("T"), 1: Dim("B")},)
    )
    graph = program.model_proto.graph
    stored = {i.name for i in graph.initializer}
    (node,) = [n for n in graph.node if n.op_type == ONNX_OP[cell]]
    assert all(name in stored for name in node.input[1:4]), list(node.input)
    assert not any(
        n.op_type in ("Gather", "Concat") and n.output[0] in node.input for n in graph.node
    )
    x = torch.randn(7, 2, F, generator=g)
    with torch.no_grad():
        out, state = ref(x)
    expected = (out, *state) if cell == "lstm" else (out, state)
    assert_outputs_close(run_onnx(onnx_session(program), (x,)), expected, cell)


def test_onnx_projection_is_a_clear_error():
    """The plain export of a model with a projected LSTM stops with an error that names the
    layer and the ways out."""
    g = seeded_generator("onnx proj")

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = gpurnn.LSTM(F, H, proj_size=2)

        def forward(self, x):
            return self.encoder(x)[0]

    with pytest.raises(Exception) as raised:
        torch.onnx.export(Tagger().eval(), (torch.randn(4, 3, F, generator=g),), dynamo=True)
    message = "".join(str(e) for e in _chain(raised.value))
    assert "proj_size=2" in message and "module encoder" in message
    assert "torch.export" in message


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_plain_torch_onnx_export(tmp_path):
    """torch.onnx.export(model, args, dynamo=True) as every tutorial writes it, with no
    extra argument, in a fresh Python where onnxscript is not yet imported (gpurnn puts
    its translations in the exporter's registry when the exporter loads it); the file then
    runs in a Python where gpurnn and torch cannot be imported, at other lengths and
    batch sizes."""
    ref, ours, g = layer_pair("lstm", 2, True, True, key=("plain torch.onnx",))
    torch.save(ours.state_dict(), tmp_path / "weights.pt")
    path = tmp_path / "lstm.onnx"
    weights = str(tmp_path / "weights.pt")
    export = (
        "import sys, torch, gpurnn\n"
        "assert 'onnxscript' not in sys.modules  # gpurnn does not import it\n"
        f"model = gpurnn.LSTM({F}, {H}, num_layers=2, bidirectional=True, batch_first=True)\n"
        f"model.load_state_dict(torch.load({weights!r}))\n"
        "Dim = torch.export.Dim\n"
        f"torch.onnx.export(model.eval(), (torch.randn(3, 4, {F}),), {str(path)!r},\n"
        "                  dynamo=True, dynamic_shapes=({0: Dim('B'), 1: Dim('T')},))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", export], check=True, env=env, cwd=os.getcwd())
    inputs = [torch.randn(B, T, F, generator=g) for T, B in OTHER_TB]
    np.savez(tmp_path / "x.npz", *[x.numpy() for x in inputs])
    script = (
        "import sys; sys.modules['gpurnn'] = sys.modules['torch'] = None\n"
        "import numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
        f"xs = np.load({str(tmp_path / 'x.npz')!r})\n"
        "outs = [s.run(None, {s.get_inputs()[0].name: xs[k]})[0] for k in xs.files]\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, *outs)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    outs = np.load(tmp_path / "out.npz")
    for k, x in enumerate(inputs):
        with torch.no_grad():
            expected, _ = ref(x)
        np.testing.assert_allclose(outs[f"arr_{k}"], expected.numpy(), atol=ATOL, rtol=0)


def test_onnx_translation_table_still_works():
    """For callers who pass tables of their own: the table gpurnn gives merges with theirs."""
    ref, ours, g = layer_pair("gru", 1, False, False, key=("onnx table",))
    x = torch.randn(4, 3, F, generator=g)
    program = torch.onnx.export(
        ours, (x,), dynamo=True, custom_translation_table=gpurnn.export.onnx_translation_table()
    )
    assert_standard_onnx(program, "GRU")
    with torch.no_grad():
        expected = ref(x)
    assert_outputs_close(run_onnx(onnx_session(program), (x,)), expected, "table")
