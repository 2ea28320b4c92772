"""The primitive under each CPU backend against the float64 reference; the custom op
under gradcheck and torch.compile; backend selection."""

import itertools

import pytest
import torch

import gpurnn
from gpurnn import reference
from gpurnn.backends import choose_backend
from gpurnn.cells import GATES
from tests.helpers import assert_close

CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj"]


def random_case(cell, T, B, H, dtype, *, lengths, with_h0, P=3, requires_grad=True):
    proj = cell == "lstm_proj"
    cell = "lstm" if proj else cell
    G, H_out = GATES[cell], (P if proj else H)

    def rand(*shape, scale=1.0):
        return (
            (scale * torch.randn(*shape, dtype=torch.float64))
            .to(dtype)
            .requires_grad_(requires_grad)
        )

    args = dict(
        xg=rand(T, B, G * H),
        w_hh=rand(G * H, H_out, scale=H**-0.5),
        h0=rand(B, H_out) if with_h0 else None,
        c0=rand(B, H) if (with_h0 and cell == "lstm") else None,
        b_hn=rand(H) if cell == "gru" else None,
        w_hr=rand(P, H, scale=H**-0.5) if proj else None,
    )
    if lengths == "uneven":
        lens = torch.randint(0, T + 1, (B,))
        lens[0] = T
        args["lengths"] = lens
    return cell, args


def run_and_grad(cell, args, reverse, backend, grads_out):
    y, h_T, c_T = gpurnn.recurrence(
        cell,
        args["xg"],
        args["w_hh"],
        args["h0"],
        args["c0"],
        lengths=args.get("lengths"),
        reverse=reverse,
        b_hn=args["b_hn"],
        w_hr=args["w_hr"],
        backend=backend,
    )
    outs = [y, h_T] + ([c_T] if c_T is not None else [])
    torch.autograd.backward(outs, grads_out[: len(outs)])
    return outs


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "cell,reverse,lengths,with_h0",
    list(itertools.product(CELLS, [False, True], [None, "uneven"], [True, False])),
)
def test_primitive_matches_reference(backend, dtype, cell, reverse, lengths, with_h0):
    T, B, H = 7, 5, 6
    cell, args = random_case(cell, T, B, H, dtype, lengths=lengths, with_h0=with_h0)
    H_out = args["w_hh"].shape[1]
    grads_out = [
        torch.randn(T, B, H_out, dtype=dtype),
        torch.randn(B, H_out, dtype=dtype),
        torch.randn(B, H, dtype=dtype),
    ]
    outs = run_and_grad(cell, args, reverse, backend, grads_out)

    def np_(t):
        return None if t is None else t.detach().double().numpy()

    lens = np_(args.get("lengths"))
    ref_in = [np_(args[k]) for k in ("xg", "w_hh", "h0", "c0")]
    expected = reference.recurrence_forward(
        cell, *ref_in, lens, reverse, np_(args["b_hn"]), np_(args["w_hr"])
    )
    for name, got, want in zip(("y", "h_T", "c_T"), outs, expected):
        assert_close(got, want, dtype, name)
    ref_grads = reference.recurrence_backward(
        cell,
        *ref_in,
        lens,
        reverse,
        np_(args["b_hn"]),
        np_(args["w_hr"]),
        *[np_(g) for g in grads_out[:2]],
        np_(grads_out[2]) if cell == "lstm" else None,
    )
    for name in ("xg", "w_hh", "h0", "c0", "b_hn", "w_hr"):
        if args[name] is None:
            assert ref_grads[name] is None
            continue
        assert_close(args[name].grad, ref_grads[name], dtype, f"grad {name}")


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_numpy_backend(cell):
    cell, args = random_case(cell, 3, 2, 2, torch.float64, lengths="uneven", with_h0=True, P=2)
    names = [k for k in ("xg", "w_hh", "h0", "c0", "b_hn", "w_hr") if args[k] is not None]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        y, h, c = gpurnn.recurrence(
            cell,
            kw["xg"],
            kw["w_hh"],
            kw["h0"],
            kw.get("c0"),
            lengths=args["lengths"],
            b_hn=kw.get("b_hn"),
            w_hr=kw.get("w_hr"),
            backend="numpy",
            reverse=True,
        )
        return (y, h) if c is None else (y, h, c)

    assert torch.autograd.gradcheck(fn, [args[k] for k in names])


def test_torch_compile_fullgraph():
    """torch.compile traces through a gpurnn layer with no graph break (fullgraph=True
    raises on any), and the compiled model matches eager, gradients included."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = gpurnn.LSTM(3, 5, num_layers=2, batch_first=True, backend="torch")
            self.head = torch.nn.Linear(5, 2)

        def forward(self, x):
            out, (h, c) = self.rnn(x)
            return self.head(out[:, -1]) + h.sum() + c.sum()

    torch._dynamo.reset()
    model = Model()
    x = torch.randn(2, 4, 3)
    compiled = torch.compile(model, fullgraph=True)
    y_compiled = compiled(x)
    y_compiled.sum().backward()
    grads_compiled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager = model(x)
    y_eager.sum().backward()
    assert_close(y_compiled, y_eager, torch.float32, "compiled output")
    for g, p in zip(grads_compiled, model.parameters()):
        assert_close(g, p.grad, torch.float32, "compiled gradient")


def test_backend_selection(monkeypatch):
    cpu, f32 = torch.device("cpu"), torch.float32
    monkeypatch.delenv("GPURNN_BACKEND", raising=False)
    assert choose_backend(None, "lstm", cpu, f32, False) == "torch", "auto on CPU is torch"
    monkeypatch.setenv("GPURNN_BACKEND", "numpy")
    assert choose_backend(None, "lstm", cpu, f32, False) == "numpy"
    with gpurnn.use_backend("torch"):
        assert choose_backend(None, "gru", cpu, f32, False) == "torch", "context beats env"
        assert choose_backend("numpy", "gru", cpu, f32, False) == "numpy", "keyword beats all"
        with gpurnn.use_backend("numpy"):
            assert choose_backend(None, "gru", cpu, f32, False) == "numpy"
        assert choose_backend(None, "gru", cpu, f32, False) == "torch", "context restored"
    monkeypatch.setenv("GPURNN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend(None, "lstm", cpu, f32, False)
    with pytest.raises(ValueError, match="backend must be one of"):
        with gpurnn.use_backend("cudnn"):
            pass


def test_unavailable_backend_raises_clearly():
    available = gpurnn.available_backends()
    assert set(available) == {"triton", "cupy", "torch", "numpy"}
    assert available["torch"] is None and available["numpy"] is None
    for name, reason in available.items():
        if reason is None:
            continue
        assert isinstance(reason, str) and reason
        with pytest.raises(RuntimeError, match=f"gpurnn backend '{name}' cannot run"):
            gpurnn.LSTM(3, 4, backend=name)(torch.randn(2, 1, 3))


def test_module_uses_requested_backend(monkeypatch):
    """The numpy backend really runs when asked for: count its calls."""
    from gpurnn.backends import get_backend

    calls = []
    numpy_backend = get_backend("numpy")
    original = type(numpy_backend).forward
    monkeypatch.setattr(
        type(numpy_backend), "forward", lambda self, *a: calls.append(1) or original(self, *a)
    )
    model = gpurnn.GRU(3, 4, num_layers=2, bidirectional=True)
    model(torch.randn(5, 2, 3))
    assert calls == []
    with gpurnn.use_backend("numpy"):
        model(torch.randn(5, 2, 3))
    assert len(calls) == 4, "one call per (layer, direction)"
