"""What a torch.nn user does around a recurrent layer without thinking about it, on every
CPU backend ("torch" native layers, "torch-loop" the explicit loop, "numpy" the reference,
"triton" the kernels under the interpreter): random layouts against torch.nn with empty
batches and in-place ops on the outputs, poisoned padding, torch.func.vmap / grad,
threads, shared modules in `convert`, and the errors torch.nn gives.

torch.func.vmap and grad are in test_func_transforms.py, ONNX export without extra
arguments in test_export.py, very long sequences in test_long_sequences.py.
"""

from __future__ import annotations

import contextvars
import itertools
import threading

import pytest
import torch

import gpurnn
from gpurnn import native
from gpurnn.cells import GATES
from tests.conftest import seeded_generator
from tests.helpers import assert_close, make_torch_module, module_kwargs, run_torch_style

GPURNN = {"rnn_tanh": gpurnn.RNN, "rnn_relu": gpurnn.RNN, "lstm": gpurnn.LSTM, "gru": gpurnn.GRU}
F64 = torch.float64
BACKENDS = ["torch", "torch-loop", "numpy", "triton"]
# the backends whose backward reads the y it returned (see Backend.backward_uses_y): an
# in-place op on y then raises autograd's version-counter error in backward, as torch.nn
# does on cuDNN and oneDNN; the others accept it, as torch.nn does in float64 on CPU
KEEPS_Y = {"triton"}
VERSION_ERROR = "modified by an inplace operation"


def each_backend(request):
    """The `backend` fixture's body (test_func_transforms.py uses it too)."""
    if request.param == "torch-loop":
        with native.use_native_layers(False):
            yield "torch-loop"
        return
    if request.param == "triton":
        reason = gpurnn.available_backends()["triton"]
        if reason is not None:
            pytest.skip(f"triton backend unavailable here: {reason}")
    yield request.param


backend = pytest.fixture(params=BACKENDS)(each_backend)


def backend_name(backend: str) -> str:
    return "torch" if backend == "torch-loop" else backend


def make_pair(cell, backend, **kw):
    ref = make_torch_module(cell, **kw)
    ours = GPURNN[cell](**module_kwargs(cell, **kw), dtype=F64, backend=backend_name(backend))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


# ---------------------------------------------------------------------------------------
# random layouts against torch.nn: empty batches and in-place ops on the outputs
# ---------------------------------------------------------------------------------------


def draw_layout(g: torch.Generator, backend: str) -> dict:
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    cell = pick(["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj"])
    small = backend == "triton"  # the interpreter is slow: keep its draws tiny
    return dict(
        cell=cell,
        num_layers=pick([1] if small else [1, 2]),
        bidirectional=pick([False, True]),
        batch_first=pick([False, True]),
        bias=pick([False, True]),
        B=pick([0, 1, 3]),
        T=pick([1, 3] if small else [1, 4, 6]),
        F=pick([2, 3]),
        H=pick([3, 4]),
        packed=pick([False, True]),
        inplace=pick([None, "mul_", "add_", "zero_"]),
    )


def run_layout(layout: dict, backend: str, g: torch.Generator) -> None:
    cell, B, T = layout["cell"], layout["B"], layout["T"]
    proj_size = 2 if cell == "lstm_proj" else 0
    cell = "lstm" if proj_size else cell
    kw = dict(
        input_size=layout["F"],
        hidden_size=layout["H"],
        num_layers=layout["num_layers"],
        bias=layout["bias"],
        bidirectional=layout["bidirectional"],
        batch_first=layout["batch_first"],
        proj_size=proj_size,
    )
    ref, ours = make_pair(cell, backend, **kw)
    shape = (B, T) if layout["batch_first"] else (T, B)
    x = torch.randn(*shape, layout["F"], generator=g, dtype=F64)
    # a PackedSequence needs B >= 1 (torch.nn refuses an empty one)
    lengths = None
    if layout["packed"] and B > 0:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
    results = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        out, hidden = run_torch_style(model, xi, None, lengths, layout["batch_first"])
        states = hidden if cell == "lstm" else (hidden,)
        results.append((xi, out, states, model))
    (x_r, out_r, st_r, ref), (x_o, out_o, st_o, ours) = results
    assert out_o.shape == out_r.shape
    assert_close(out_o, out_r, F64, f"output {layout}")
    for a, b in zip(st_o, st_r):
        assert_close(a, b, F64, f"state {layout}")
    weights = [torch.randn(out_r.shape, generator=g, dtype=F64)]
    weights += [torch.randn(s.shape, generator=g, dtype=F64) for s in st_r]
    op = layout["inplace"]
    raised = {}
    for name, out, states in (("ref", out_r, st_r), ("ours", out_o, st_o)):
        if op is not None and lengths is None:  # (a padded output is already a copy)
            # what a user writes after a layer: scale, shift or clear its output in place
            getattr(out, op)(*((2.0,) if op != "zero_" else ()))
        loss = (out * weights[0]).sum() + sum((s * w).sum() for s, w in zip(states, weights[1:]))
        try:
            loss.backward()
        except RuntimeError as e:
            raised[name] = str(e)
    if "ref" in raised:  # torch.nn refuses: so must we, with the same error
        assert VERSION_ERROR in raised["ref"]
        assert VERSION_ERROR in raised.get("ours", ""), f"no error for {layout}"
        return
    if "ours" in raised and op is not None and backend in KEEPS_Y:
        # the y that backward reads was modified (a bidirectional layer's output is a
        # concatenation, a copy: that one is allowed everywhere)
        assert VERSION_ERROR in raised["ours"], raised
        return
    assert not raised, raised
    assert_close(x_o.grad, x_r.grad, F64, f"grad input {layout}")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_params[name].grad, F64, f"grad {name} {layout}")


DRAWS = {"torch": 12, "torch-loop": 12, "numpy": 12, "triton": 6}


def test_random_layouts_match_torch_nn(backend):
    """Random layouts (cell, layers, direction, batch_first, bias, packed, B = 0 included)
    and an in-place op on the output after the forward, as a user writes them: outputs,
    states and every gradient equal torch.nn's, and where torch.nn refuses the in-place op
    in backward so does gpurnn, with the same autograd error."""
    g = seeded_generator("habits", backend)
    for _ in range(DRAWS[backend]):
        run_layout(draw_layout(g, backend), backend, g)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_empty_batch_forward_and_backward(backend, cell):
    """B = 0: torch.nn returns empty outputs and empty (zero) gradients, and so do we."""
    g = seeded_generator("B=0", backend, cell)
    kw = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    ref, ours = make_pair(cell, backend, **kw)
    x = torch.randn(5, 0, 3, generator=g, dtype=F64)
    grads = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        out, hidden = model(xi)
        h = hidden[0] if cell == "lstm" else hidden
        (out.sum() + h.sum()).backward()
        assert out.shape == (5, 0, 8) and h.shape == (4, 0, 4)
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert a.shape == b.shape and torch.equal(a, b)


class Output(torch.nn.Module):
    """A layer's output without its states, for torch.nn.Sequential."""

    def forward(self, result):
        return result[0]


def test_empty_batch_compiled():
    """B = 0 under torch.compile (the torch loop and the triton kernels through the custom
    op), forward and backward."""
    backends = ["torch"] + (["triton"] if gpurnn.available_backends()["triton"] is None else [])
    for name in backends:
        model = torch.nn.Sequential(gpurnn.LSTM(3, 4, backend=name), Output(),
                                    gpurnn.GRU(4, 4, backend=name), Output())  # fmt: skip
        # aot_eager: the compiled forward and backward graphs, without inductor's codegen
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
        x = torch.randn(5, 0, 3, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        assert out.shape == (5, 0, 4) and x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_inplace_on_output_then_backward(backend):
    """y.mul_(2) then backward, on a layer whose output is the recurrence's own y: torch.nn
    accepts it in float64 on CPU, and so does every backend whose backward does not read
    y; triton's does, and raises autograd's version-counter error as cuDNN's does."""
    ref, ours = make_pair("lstm", backend, input_size=3, hidden_size=4)
    x = torch.randn(5, 2, 3, generator=seeded_generator("in-place", backend), dtype=F64)
    for model in (ref, ours):
        out, _ = model(x)
        out.mul_(2)
        if model is ours and backend in KEEPS_Y:
            with pytest.raises(RuntimeError, match=VERSION_ERROR):
                out.pow(2).sum().backward()
            return
        out.pow(2).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, F64, f"grad {name}")


@pytest.mark.parametrize("op", ["mul_", "add_"])
def test_inplace_on_output_without_backward(backend, op):
    """An in-place op on the output is always allowed when no backward follows (on triton
    the output used to be a view of the kernels' exchange buffer, which autograd refuses
    to modify in place even then)."""
    ours = gpurnn.LSTM(3, 4, dtype=F64, backend=backend_name(backend))
    x = torch.randn(5, 2, 3, dtype=F64)
    out, _ = ours(x)
    expected = out.detach().clone()
    getattr(out, op)(2.0)
    want = expected * 2 if op == "mul_" else expected + 2
    assert torch.equal(out.detach(), want)


# ---------------------------------------------------------------------------------------
# padding poisoned with NaN / Inf never reaches a gradient
# ---------------------------------------------------------------------------------------


POISON_CASES = list(itertools.product(["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj"],
                                     [False, True]))  # fmt: skip
# the interpreter is slow: each cell once, the directions alternating
INTERPRETED_POISON_CASES = [("rnn_tanh", False), ("rnn_relu", True), ("gru", False),
                            ("lstm", True), ("lstm_proj", False), ("lstm_proj", True)]  # fmt: skip


@pytest.mark.parametrize("cell,reverse", POISON_CASES)
def test_poisoned_padding_reaches_no_gradient(backend, cell, reverse):
    """NaN and Inf in xg past each sequence's end: outputs, final states and every gradient
    equal those of the same call with zero padding (masks select, never multiply)."""
    name = backend_name(backend)
    if name == "triton" and (cell, reverse) not in INTERPRETED_POISON_CASES:
        pytest.skip("interpreter: one direction of this cell is enough")
    proj = cell == "lstm_proj"
    cell = "lstm" if proj else cell
    g = seeded_generator("poison", backend, cell, reverse, proj)
    T, B, H, P = 5, 3, 4, 3
    H_out = P if proj else H
    lengths = torch.tensor([5, 2, 3])
    xg = torch.randn(T, B, GATES[cell] * H, generator=g, dtype=F64)
    pad = torch.arange(T)[:, None] >= lengths[None, :]
    w_hh = torch.randn(GATES[cell] * H, H_out, generator=g, dtype=F64) * 0.5
    h0 = torch.randn(B, H_out, generator=g, dtype=F64)
    c0 = torch.randn(B, H, generator=g, dtype=F64) if cell == "lstm" else None
    b_hn = torch.randn(H, generator=g, dtype=F64) if cell == "gru" else None
    w_hr = torch.randn(P, H, generator=g, dtype=F64) * 0.5 if proj else None
    poison = torch.full_like(xg, float("nan"))
    poison[..., ::2] = float("inf")
    results = []
    for padding in (torch.zeros_like(xg), poison):
        x = torch.where(pad[..., None], padding, xg).requires_grad_()
        leaves = [t.clone().requires_grad_() if t is not None else None
                  for t in (w_hh, h0, c0, b_hn, w_hr)]  # fmt: skip
        y, h_T, c_T = gpurnn.recurrence(
            cell, x, leaves[0], leaves[1], leaves[2], lengths=lengths, reverse=reverse,
            b_hn=leaves[3], w_hr=leaves[4], backend=name,
        )  # fmt: skip
        outs = [y, h_T] + ([c_T] if c_T is not None else [])
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=F64).view_as(o)).sum()
                   for o in outs)  # fmt: skip
        wrt = [x] + [t for t in leaves if t is not None]
        results.append((outs, torch.autograd.grad(loss, wrt)))
    (outs_clean, grads_clean), (outs_poisoned, grads_poisoned) = results
    for a, b in zip(outs_poisoned, outs_clean):
        assert torch.equal(a, b), "padding changed an output"
    for k, (a, b) in enumerate(zip(grads_poisoned, grads_clean)):
        assert torch.isfinite(a).all(), f"gradient {k} not finite"
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_poisoned_padding_double_backward():
    """The graph of the backward (create_graph=True, the torch loop rerun) stays finite too."""
    g = seeded_generator("poison double")
    T, B, H = 4, 2, 3
    lengths = torch.tensor([4, 2])
    xg = torch.randn(T, B, 4 * H, generator=g, dtype=F64)
    xg[2:, 1] = float("nan")
    xg.requires_grad_()
    w_hh = (torch.randn(4 * H, H, generator=g, dtype=F64) * 0.5).requires_grad_()
    y, _, _ = gpurnn.recurrence("lstm", xg, w_hh, lengths=lengths, backend="numpy")
    (dw,) = torch.autograd.grad(y.pow(2).sum(), w_hh, create_graph=True)
    (ddw,) = torch.autograd.grad(dw.pow(2).sum(), w_hh)
    assert torch.isfinite(dw).all() and torch.isfinite(ddw).all()


# ---------------------------------------------------------------------------------------
# threads, use_backend, convert, errors
# ---------------------------------------------------------------------------------------


def test_threads_give_the_serial_results(backend):
    """Three threads calling one module at once (the triton interpreter included, whose
    launches take turns) get what serial calls get, forward and backward."""
    torch.manual_seed(0)
    model = gpurnn.GRU(3, 4, dtype=F64, backend=backend_name(backend))
    inputs = [torch.randn(4, 2, 3, dtype=F64) for _ in range(3)]

    def run(x):  # (the fixture's native-layers switch is process-wide: threads see it)
        x = x.clone().requires_grad_()
        out, _ = model(x)
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x)
        return out.detach(), gx

    serial = [run(x) for x in inputs]
    results, errors = [None] * len(inputs), []

    def work(i):
        try:
            results[i] = run(inputs[i])
        except Exception as e:  # reported below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (out, gx), (out_s, gx_s) in zip(results, serial):
        assert torch.equal(out, out_s) and torch.equal(gx, gx_s)


def test_use_backend_is_per_thread_and_follows_contextvars():
    """use_backend is a contextvars setting: a thread started inside the block does not see
    it (threads start from an empty context), one run in a copy of the context does."""
    from gpurnn.backends import requested_backend

    seen = {}
    with gpurnn.use_backend("numpy"):
        plain = threading.Thread(target=lambda: seen.update(plain=requested_backend()))
        context = contextvars.copy_context()
        copied = threading.Thread(
            target=lambda: context.run(lambda: seen.update(copied=requested_backend()))
        )
        for t in (plain, copied):
            t.start()
            t.join()
    assert seen == {"plain": requested_backend(), "copied": "numpy"}


def test_convert_keeps_shared_modules_shared():
    """A module reachable from several places (two names in one parent, a child of two
    parents) becomes one gpurnn module in all of them; tied weights stay tied."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.LSTM(3, 4)
            self.also_encoder = self.encoder
            self.branch = torch.nn.Sequential(self.encoder)
            self.cell = torch.nn.GRUCell(3, 4)
            self.other = torch.nn.GRUCell(3, 4)
            self.other.weight_hh = self.cell.weight_hh  # tied

    model = Model()
    encoder_weight = model.encoder.weight_hh_l0
    gpurnn.convert(model)
    assert isinstance(model.encoder, gpurnn.LSTM)
    assert model.also_encoder is model.encoder and model.branch[0] is model.encoder
    assert model.encoder.weight_hh_l0 is encoder_weight
    assert model.other is not model.cell and model.other.weight_hh is model.cell.weight_hh
    assert len(list(model.parameters())) == len(set(map(id, model.parameters())))


@pytest.mark.parametrize("hx", ["tensor", "triple"])
def test_lstm_cell_hx_errors_like_torch_nn(hx):
    ref, ours = torch.nn.LSTMCell(3, 4), gpurnn.LSTMCell(3, 4)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    bad = h if hx == "tensor" else (h, h, h)
    with pytest.raises(Exception) as expected:
        ref(x, bad)
    with pytest.raises(expected.type, match="hx" if hx == "tensor" else "two hidden states"):
        ours(x, bad)
    assert expected.type is (TypeError if hx == "tensor" else RuntimeError)


def test_triton_interpret_set_after_import_is_a_clear_error(monkeypatch):
    """TRITON_INTERPRET=1 read too late (the kernels are already compiled-mode objects)
    names the variable and what to do, instead of Triton's "0 active drivers"."""
    from gpurnn.backends import triton as triton_backend

    if triton_backend._launch is None:
        pytest.skip("triton not installed")
    # in this process the kernels were defined as the environment says
    monkeypatch.setattr(triton_backend, "_kernels_interpreted", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after"):
        gpurnn.LSTM(3, 4, backend="triton")(torch.randn(2, 1, 3))
    monkeypatch.setattr(triton_backend, "_kernels_interpreted", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="imported under TRITON_INTERPRET=1"):
        gpurnn.LSTM(3, 4, backend="triton")(torch.randn(2, 1, 3))


def test_kernels_know_how_they_were_defined():
    from gpurnn.backends import triton as triton_backend

    if triton_backend._launch is None:
        pytest.skip("triton not installed")
    interpreting = triton_backend._interpreting()
    assert triton_backend._kernels_interpreted() == interpreting
