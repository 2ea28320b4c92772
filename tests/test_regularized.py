"""Regularized recurrences (gpurnn.regularized): zoneout, recurrent dropout, DropConnect,
LayerNorm, IndRNN, against the float64 reference.

The numpy backend is the reference (gpurnn.reference) behind the custom op; gradcheck on
it checks the reference's BPTT against finite differences, and every other check compares
the torch backend with it under the same seed (so the same masks) in float64: outputs,
final states and every gradient, on stacked, bidirectional, packed, batch_first layers
with hx and inter-layer dropout, in training and in eval. Tiny shapes: the reference loops
in Python.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gpurnn
import gpurnn.inspect
from gpurnn import masks, regularized
from gpurnn.backends import Regularization
from gpurnn.cells import INDRNN_CELLS
from tests.conftest import seeded_generator
from tests.helpers import TOLERANCES, assert_close, uneven_lengths

F64 = torch.float64
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu", "indrnn_tanh", "indrnn_relu")
TRITON_REASON = gpurnn.available_backends()["triton"]
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton: {TRITON_REASON}")
KEYWORDS = {
    "zoneout": dict(zoneout=0.3),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "dropconnect": dict(dropconnect=0.35),
    "layer_norm": dict(layer_norm=True),
    "all": dict(zoneout=0.25, recurrent_dropout=0.3, dropconnect=0.2, layer_norm=True),
}


def _seed(*key) -> int:
    return int(seeded_generator(*key).initial_seed() % 2**31)


def _make(cell, kw, *, dtype=F64, backend=None, **layout):
    kw = dict(kw)
    if cell.startswith("indrnn"):
        if kw.pop("layer_norm", False) and not kw:
            return None  # LayerNorm is not an IndRNN keyword
        return gpurnn.IndRNN(**layout, nonlinearity=cell[7:], dtype=dtype, backend=backend, **kw)
    cls = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU}.get(cell, gpurnn.RNN)
    if cell.startswith("rnn"):
        layout = {**layout, "nonlinearity": cell[4:]}
    return cls(**layout, dtype=dtype, backend=backend, **kw)


def _randomize(module, generator):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=F64).to(p.dtype) * 0.5)
            if name.startswith("weight_hh") and p.dim() == 1:  # IndRNN's u, kept stable
                p.copy_(torch.rand(p.shape, generator=generator, dtype=F64).to(p.dtype))


def _run(module, backend, seed, x, hx, lengths, batch_first):
    """Forward and backward of `module` on `backend` after torch.manual_seed(seed);
    returns {name: tensor} of outputs, final states and every gradient."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    hx = tuple(h.detach().clone().requires_grad_() for h in hx) if hx is not None else None
    torch.manual_seed(seed)
    with gpurnn.use_backend(backend):
        given = hx if hx is None or len(hx) == 2 else hx[0]
        if lengths is None:
            out, hidden = module(x, given)
        else:
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
            out, hidden = module(packed, given)
            out, _ = pad_packed_sequence(
                out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0]
            )
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    g = seeded_generator("cotangents", out.shape)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)).sum()
    for k, h in enumerate(hidden):
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=F64).to(h.dtype)).sum() * (k + 1)
    loss.backward()
    result = {"output": out, **{f"h_n[{k}]": h for k, h in enumerate(hidden)}}
    result["d_input"] = x.grad
    for k, h in enumerate(hx or ()):
        result[f"d_hx[{k}]"] = h.grad
    for name, p in module.named_parameters():
        result[f"d_{name}"] = p.grad
    return result


def _compare(got, expected, dtype):
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] is not None, f"{name}: no gradient"
        assert_close(got[name], expected[name], dtype, name)


def _inputs(cell, T, B, I, H, L, D, key, hx=True, lengths=True, batch_first=False):
    g = seeded_generator(*key)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=F64)
    n_states = 2 if cell == "lstm" else 1
    states = tuple(torch.randn(L * D, B, H, generator=g, dtype=F64) for _ in range(n_states))
    return x, (states if hx else None), (uneven_lengths(B, T, g) if lengths else None)


# ------------------------------------------------------------------ modules, float64


# each keyword alone in training (eval: the dropouts are the identity, zoneout and
# LayerNorm are covered by "all"), every cell; all of them together in both modes
LAYER_CASES = [
    (cell, keyword, True)
    for cell in ("lstm", "gru", "rnn_tanh", "indrnn_relu")
    for keyword in ("zoneout", "recurrent_dropout", "dropconnect", "layer_norm")
    if not (cell.startswith("indrnn") and keyword == "layer_norm")
] + [(cell, "all", training) for cell in CELLS for training in (True, False)]


@pytest.mark.parametrize(
    "cell, keyword, training",
    LAYER_CASES,
    ids=[f"{c}-{k}-{'train' if t else 'eval'}" for c, k, t in LAYER_CASES],
)
def test_layers_match_reference(cell, keyword, training):
    """num_layers=2, bidirectional, packed (unsorted lengths), hx, inter-layer dropout:
    the torch backend against the reference, every output and gradient."""
    layout = dict(input_size=3, hidden_size=3, num_layers=2, bidirectional=True, dropout=0.3)
    module = _make(cell, KEYWORDS[keyword], **layout)
    if module is None:
        pytest.skip("layer_norm is not an IndRNN keyword")
    _randomize(module, seeded_generator("params", cell, keyword))
    module.train(training)
    x, hx, lengths = _inputs(cell, 4, 3, 3, 3, 2, 2, ("x", cell, keyword))
    seed = _seed("masks", cell, keyword, training)
    expected = _run(module, "numpy", seed, x, hx, lengths, False)
    got = _run(module, "torch", seed, x, hx, lengths, False)
    _compare(got, expected, F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "indrnn_relu"])
def test_batch_first_unpacked_no_hx(cell):
    kw = dict(KEYWORDS["all"])
    module = _make(cell, kw, input_size=2, hidden_size=4, batch_first=True)
    _randomize(module, seeded_generator("params-bf", cell))
    x, _, _ = _inputs(cell, 3, 2, 2, 4, 1, 1, ("x-bf", cell), batch_first=True)
    expected = _run(module, "numpy", 7, x, None, None, True)
    got = _run(module, "torch", 7, x, None, None, True)
    _compare(got, expected, F64)


def test_projected_lstm_all_regularizers():
    module = gpurnn.LSTM(3, 4, proj_size=2, num_layers=2, dtype=F64, **KEYWORDS["all"])
    _randomize(module, seeded_generator("params-proj"))
    x, hx, lengths = _inputs("lstm", 4, 3, 3, 2, 2, 1, ("x-proj",))
    hx = (hx[0], torch.randn(2, 3, 4, generator=seeded_generator("c0-proj"), dtype=F64))
    expected = _run(module, "numpy", 3, x, hx, lengths, False)
    _compare(_run(module, "torch", 3, x, hx, lengths, False), expected, F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cells_match_reference(cell, training):
    cls = {"lstm": gpurnn.LSTMCell, "gru": gpurnn.GRUCell}.get(cell, gpurnn.RNNCell)
    extra = {"nonlinearity": "relu"} if cell == "rnn_relu" else {}
    module = cls(3, 4, dtype=F64, **extra, **KEYWORDS["all"]).train(training)
    assert {n for n, _ in module.named_parameters()} >= {
        "layer_norm_ih_weight", "layer_norm_ih_bias", "layer_norm_hh_weight", "layer_norm_hh_bias"
    }  # fmt: skip
    _randomize(module, seeded_generator("cell", cell))
    g = seeded_generator("cell-x", cell)
    x = torch.randn(2, 3, generator=g, dtype=F64)
    states = [torch.randn(2, 4, generator=g, dtype=F64) for _ in range(2 if cell == "lstm" else 1)]
    results = {}
    for backend in ("numpy", "torch"):
        module.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        hs = [s.clone().requires_grad_() for s in states]
        torch.manual_seed(11)
        with gpurnn.use_backend(backend):
            out = module(xs, tuple(hs) if cell == "lstm" else hs[0])
        out = out if isinstance(out, tuple) else (out,)
        sum(o.sin().sum() * (k + 1) for k, o in enumerate(out)).backward()
        results[backend] = {
            **{f"out{k}": o for k, o in enumerate(out)},
            "d_x": xs.grad,
            **{f"d_h{k}": h.grad for k, h in enumerate(hs)},
            **{f"d_{n}": p.grad for n, p in module.named_parameters()},
        }
    _compare(results["torch"], results["numpy"], F64)


# ------------------------------------------------------------------ the primitive


def _primitive_case(cell, key, T=3, B=2, H=2, training=True):
    g = seeded_generator(*key)
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    ind = cell.startswith("indrnn")

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_()

    w_hh = (
        torch.rand(H, generator=g, dtype=F64).requires_grad_() if ind else rand(G * H, H, scale=0.5)
    )
    args = dict(
        xg=rand(T, B, G * H), w_hh=w_hh, h0=rand(B, H),
        c0=rand(B, H) if cell == "lstm" else None, b_hn=rand(H) if cell == "gru" else None,
    )  # fmt: skip
    ln = (None,) * 4
    if not ind:
        ln = (rand(G * H), rand(G * H)) + ((rand(H), rand(H)) if cell == "lstm" else (None, None))
    torch.manual_seed(_seed("primitive", *key))
    reg = regularized.draw(cell, T, B, H, H, w_hh, 0.3, 0.3, 0.3, training, ln)
    return args, reg


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_numpy(cell):
    """The reference's BPTT against finite differences, all regularizers on, through the op
    (first and second order), packed lengths, reverse direction."""
    args, reg = _primitive_case(cell, ("gradcheck", cell))
    names = [n for n, v in args.items() if v is not None]
    ln_names = [
        n
        for n in ("ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias")
        if getattr(reg, n) is not None
    ]
    lengths = torch.tensor([3, 2])

    def f(*tensors):
        given = dict(zip(names + ln_names, tensors))
        r = reg._replace(**{n: given[n] for n in ln_names if n in given})
        y, h, c = regularized.regularized_recurrence(
            cell, *(given.get(n) for n in ("xg", "w_hh", "h0", "c0")), lengths=lengths,
            reverse=True, b_hn=given.get("b_hn"), reg=r, backend="numpy",
        )  # fmt: skip
        return (y, h) if c is None else (y, h, c)

    values = [args[n] for n in names] + [getattr(reg, n) for n in ln_names]
    assert torch.autograd.gradcheck(f, values, fast_mode=True)
    if cell in ("lstm", "indrnn_tanh"):  # second order: the gated cell with most, and IndRNN
        assert torch.autograd.gradgradcheck(f, values[:2], fast_mode=True)


@pytest.mark.parametrize("cell", ["lstm"])
def test_second_order_through_modules(cell):
    """create_graph=True through a stacked module with every regularizer: the torch (and
    triton: its first backward from the kernels) backend's double backward equals the numpy
    backend's (whose op-level double backward is gradgradchecked above)."""
    results = {}
    for backend in ("numpy", "torch", *(("triton",) if TRITON_REASON is None else ())):
        module = _make(cell, KEYWORDS["all"], input_size=2, hidden_size=2, num_layers=2)
        _randomize(module, seeded_generator("second-order", cell))
        x = torch.randn(3, 2, 2, generator=seeded_generator("x2", cell), dtype=F64).requires_grad_()
        torch.manual_seed(5)
        with gpurnn.use_backend(backend):
            out, _ = module(x)
            (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
            gx.pow(2).sum().backward()
        results[backend] = {"gx": gx, **{n: p.grad for n, p in module.named_parameters()}}
    for backend in results:
        _compare(results[backend], results["numpy"], F64)


# ------------------------------------------------------------------ randomness


def test_same_seed_same_masks_across_backends_and_runs():
    """Zoneout copies a unit's previous value exactly, so the set of units that did so is
    the mask itself: equal on both backends; and a second run is bit-identical."""
    module = gpurnn.GRU(3, 8, dtype=F64, zoneout=0.5, recurrent_dropout=0.3, dropconnect=0.3)
    x = torch.randn(6, 4, 3, generator=seeded_generator("seed-x"), dtype=F64)
    outs = {}
    triton = ("triton",) if TRITON_REASON is None else ()
    for backend in ("numpy", "torch", "torch", *triton):
        torch.manual_seed(1234)
        with gpurnn.use_backend(backend), torch.no_grad():
            outs.setdefault(backend, []).append(module(x)[0])
    kept = {b: (o[0][1:] == o[0][:-1]) for b, o in outs.items()}
    for backend in kept:
        assert torch.equal(kept[backend], kept["numpy"]), backend
    assert 0.3 < kept["torch"].double().mean() < 0.7
    assert torch.equal(outs["torch"][0], outs["torch"][1])
    torch.manual_seed(1235)
    with torch.no_grad():
        assert not torch.equal(module(x)[0], outs["torch"][0])


def test_deterministic_algorithms():
    module = gpurnn.LSTM(3, 4, dtype=F64, **KEYWORDS["all"])
    x = torch.randn(5, 2, 3, dtype=F64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(9)
            out, _ = module(x)
            out.sum().backward()
            runs.append((out.detach(), module.weight_hh_l0.grad.clone()))
            module.zero_grad()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_rates():
    """Measured over many units, each rate within 4 standard deviations of p: zoneout's
    kept units in the output, DropConnect's zero gradients, the recurrent-dropout mask."""
    p = 0.3
    module = gpurnn.LSTM(2, 32, dtype=torch.float32, zoneout=p)
    torch.manual_seed(0)
    with torch.no_grad():
        y, _ = module(torch.randn(40, 8, 2))
    same = (y[1:] == y[:-1]).double()
    assert abs(same.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / same.numel())

    module = gpurnn.GRU(2, 32, dtype=torch.float32, dropconnect=p)
    module(torch.randn(5, 4, 2))[0].sum().backward()
    zero = (module.weight_hh_l0.grad == 0).double()
    assert abs(zero.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / zero.numel()) + 0.01

    bits = masks.unpack(masks.draw((64, 100), 1 - p, "cpu"), 100, torch.float64)
    assert abs((1 - bits.mean()).item() - p) < 4 * math.sqrt(p * (1 - p) / bits.numel())


def test_masks_are_bits():
    torch.manual_seed(3)
    packed = masks.draw((5, 3, 13), 0.5, "cpu")
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 2)
    bits = masks.unpack(packed, 13)
    assert torch.equal(masks.pack(bits), packed)
    torch.manual_seed(3)
    assert torch.equal(bits, torch.rand(5 * 3, 13).reshape(5, 3, 13) < 0.5)


# ------------------------------------------------------------------ off, eval, dtypes


def test_off_is_torch_nn():
    for cls, ref in ((gpurnn.LSTM, torch.nn.LSTM), (gpurnn.GRU, torch.nn.GRU)):
        ours, theirs = cls(3, 4, num_layers=2), ref(3, 4, num_layers=2)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert repr(ours) == repr(theirs)
    cell = gpurnn.LSTMCell(3, 4)
    assert list(cell.state_dict()) == list(torch.nn.LSTMCell(3, 4).state_dict())
    converted = gpurnn.convert(torch.nn.Sequential(torch.nn.LSTM(3, 4)))[0]
    assert converted.zoneout == 0 and not converted.layer_norm
    assert list(converted.state_dict()) == list(torch.nn.LSTM(3, 4).state_dict())


def test_eval_dropouts_are_identity_and_zoneout_mixes():
    torch.manual_seed(0)
    plain = gpurnn.LSTM(3, 4, dtype=F64)
    dropped = gpurnn.LSTM(3, 4, dtype=F64, recurrent_dropout=0.5, dropconnect=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(x)[0], dropped(x)[0])
    # zoneout in eval: h_t = p h_{t-1} + (1 - p) h̃_t, the reference's own arrays
    module = gpurnn.GRU(3, 4, dtype=F64, zoneout=0.4).eval()
    xg = torch.nn.functional.linear(
        x,
        module.weight_ih_l0,
        module.bias_ih_l0 + torch.cat([module.bias_hh_l0[:8], torch.zeros(4, dtype=F64)]),
    )
    y, _, _ = gpurnn.reference.regularized_forward(
        "gru", xg.detach().numpy(), module.weight_hh_l0.detach().numpy(),
        b_hn=module.bias_hh_l0[8:].detach().numpy(),
        zoneout_h=torch.full((5, 2, 4), 0.4, dtype=F64).numpy(),
    )  # fmt: skip
    assert_close(module(x)[0], y, F64, "eval zoneout")


def test_layer_norm_parameters_and_init():
    module = gpurnn.LSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=True)
    names = dict(module.named_parameters())
    for sfx in ("_l0", "_l1", "_l0_reverse", "_l1_reverse"):
        for kind, size in (("ih", 16), ("hh", 16), ("c", 4)):
            assert names[f"layer_norm_{kind}_weight{sfx}"].shape == (size,)
            assert torch.equal(names[f"layer_norm_{kind}_weight{sfx}"], torch.ones(size))
            assert torch.equal(names[f"layer_norm_{kind}_bias{sfx}"], torch.zeros(size))
    module.reset_parameters()
    assert torch.equal(module.layer_norm_hh_weight_l1, torch.ones(16))
    assert "layer_norm_c_weight_l0" not in dict(
        gpurnn.GRU(3, 4, layer_norm=True).named_parameters()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_against_reference(dtype):
    module = gpurnn.LSTM(3, 8, bidirectional=True, dtype=F64, **KEYWORDS["all"])
    _randomize(module, seeded_generator("dtype"))
    x, hx, lengths = _inputs("lstm", 3, 3, 3, 8, 1, 2, ("x-dtype",))
    expected = _run(module, "numpy", 21, x, hx, lengths, False)
    low = _make(
        "lstm",
        KEYWORDS["all"],
        dtype=dtype,
        input_size=3,
        hidden_size=8,
        bidirectional=True,
    )
    low.load_state_dict(module.state_dict())
    got = _run(low, "torch", 21, x.to(dtype), tuple(h.to(dtype) for h in hx), lengths, False)
    for name in expected:
        assert got[name].dtype == dtype, name
    # the same masks whatever the dtype: the per-dtype tolerances, bf16's loosened for
    # the steps its 8-bit mantissa compounds over
    tol = {
        torch.float32: TOLERANCES[torch.float32],
        torch.bfloat16: (0.1, 0.1),
        torch.float16: (2e-2, 2e-2),
    }[dtype]
    for name in expected:
        torch.testing.assert_close(
            got[name].double(), expected[name], atol=tol[0], rtol=tol[1], msg=name
        )


def test_autocast():
    module = gpurnn.LSTM(3, 8, dtype=torch.float32, **KEYWORDS["all"])
    x = torch.randn(4, 2, 3)
    torch.manual_seed(2)
    ref, _ = module(x)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = module(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)
    out.float().sum().backward()
    assert module.layer_norm_hh_weight_l0.grad is not None


def test_torch_compile_fullgraph():
    """One graph, no breaks, the same masks as eagerly under the same seed (aot_eager keeps
    torch's RNG ops as they are), and the backward through the compiled graph."""
    module = gpurnn.LSTM(3, 4, dtype=F64, **KEYWORDS["all"])
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 3, dtype=F64)
    torch.manual_seed(8)
    out, _ = compiled(x)
    torch.manual_seed(8)
    torch.testing.assert_close(out, module(x)[0])
    out.sum().backward()
    assert module.layer_norm_c_weight_l0.grad is not None


# ------------------------------------------------------------------ refusals, bad input


def test_cupy_refuses_by_name_and_auto_routes_to_torch(monkeypatch):
    """The cupy kernels have no regularizers: they say so, naming what is on; auto (which
    keeps the interpreted triton kernels out, and on a GPU the regularized ones until their
    GPU tests pass) sends a regularized layer to torch."""
    from gpurnn.backends import get_backend

    reason = get_backend("cupy").regularized_unsupported_reason(
        "lstm", torch.device("cpu"), F64, True, ("zoneout", "layer_norm")
    )
    assert "cupy" in reason and "zoneout, layer_norm" in reason
    monkeypatch.setenv("GPURNN_BACKEND", "auto")
    assert (
        regularized.choose_backend(None, "lstm", torch.device("cpu"), F64, False, ("zoneout",))
        == "torch"
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="zoneout"):
        gpurnn.LSTM(3, 4, zoneout=1.5)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        gpurnn.GRUCell(3, 4, recurrent_dropout=-0.1)
    with pytest.raises(TypeError):
        gpurnn.IndRNN(3, 4, layer_norm=True)
    xg, w = torch.randn(2, 1, 8), torch.randn(8, 2)
    bad = Regularization(zoneout=0.1, zoneout_h=torch.zeros(2, 1, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="zoneout_h must have shape"):
        regularized.regularized_recurrence("lstm", xg, w, reg=bad)
    with pytest.raises(ValueError, match="w_hh of indrnn_tanh"):
        regularized.regularized_recurrence("indrnn_tanh", torch.randn(2, 1, 3), torch.randn(3, 3))
    with pytest.raises(RuntimeError, match="input_size"):
        gpurnn.IndRNN(3, 4)(torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match="regularized layers"):
        gpurnn.inspect.record(gpurnn.LSTM(3, 4, layer_norm=True), torch.randn(2, 1, 3))
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        gpurnn.IndRNN(3, 4)(torch.randn(2, 1, 3), torch.randn(2, 1, 4))


# ------------------------------------------------------------------ the Triton kernels

MASKS = dict(zoneout=0.3, recurrent_dropout=0.3, dropconnect=0.3)
ALL = dict(MASKS, layer_norm=True)
_PLAIN_CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# (cell, training, keywords): every regularizer at once on each cell of the plain kernels,
# each alone (each its own compile-time switch, or none), eval, and IndRNN's kernels (which
# have no LayerNorm)
TRITON_CASES = (
    [(cell, True, "all") for cell in _PLAIN_CELLS]
    + [(cell, True, "layer_norm") for cell in ("lstm", "gru", "rnn_tanh")]
    + [("lstm", True, k) for k in ("zoneout", "recurrent_dropout", "dropconnect")]
    + [(cell, False, "all") for cell in ("lstm", "gru")]
    + [(cell, t, "masks") for cell in ("indrnn_tanh", "indrnn_relu") for t in (True, False)]
    + [("lstm", True, "masks")]
)
_TRITON_KEYWORDS = {**KEYWORDS, "all": ALL, "masks": MASKS}


@needs_triton
@pytest.mark.parametrize(
    "cell, training, keywords", TRITON_CASES,
    ids=[f"{c}-{'train' if t else 'eval'}-{k}" for c, t, k in TRITON_CASES],
)  # fmt: skip
def test_triton_layers_match_reference(cell, training, keywords):
    """The fused kernels (interpreted on CPU): LSTM, GRU, RNN in the plain kernels with
    zoneout, recurrent dropout and LayerNorm in the step and DropConnect's masked W_hh;
    IndRNN in its own. 2 layers, bidirectional, packed, hx, inter-layer dropout, every
    output and gradient (LayerNorm's parameters too) against the reference."""
    layout = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, dropout=0.2)
    module = _make(cell, _TRITON_KEYWORDS[keywords], **layout)
    _randomize(module, seeded_generator("triton-reg", cell))
    module.train(training)
    x, hx, lengths = _inputs(cell, 4, 3, 3, 5, 2, 2, ("x-triton-reg", cell))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module, x, hx = module.to(device), x.to(device), tuple(h.to(device) for h in hx)
    expected = _run(module, "numpy", 23, x, hx, lengths, False)
    _compare(_run(module, "triton", 23, x, hx, lengths, False), expected, F64)


@needs_triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_projected_regularized(training):
    """proj_size with zoneout, recurrent dropout, DropConnect and LayerNorm runs the
    projected kernels: 2 layers, bidirectional, packed, hx, inter-layer dropout, every
    output and gradient (LayerNorm's parameters and W_hr's too) against the reference."""
    kw = dict(zoneout=0.3, dropconnect=0.3, recurrent_dropout=0.3, layer_norm=True)
    module = gpurnn.LSTM(3, 5, proj_size=3, num_layers=2, bidirectional=True, dropout=0.2,
                         dtype=F64, **kw)  # fmt: skip
    _randomize(module, seeded_generator("triton-proj-reg"))
    module.train(training)
    x, hx, lengths = _inputs("lstm", 4, 3, 3, 3, 2, 2, ("x-triton-proj-reg",))
    hx = (hx[0], torch.randn(4, 3, 5, generator=seeded_generator("c0-proj-reg"), dtype=F64))
    expected = _run(module, "numpy", 29, x, hx, lengths, False)
    _compare(_run(module, "triton", 29, x, hx, lengths, False), expected, F64)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cell", ["gru", "indrnn_tanh"])
def test_triton_regularized_dtypes(cell, dtype):
    keywords = MASKS if cell in INDRNN_CELLS else ALL
    module = _make(cell, keywords, input_size=4, hidden_size=16, batch_first=True)
    _randomize(module, seeded_generator("triton-reg-dtype", cell))
    x, hx, lengths = _inputs(cell, 6, 3, 4, 16, 1, 1, ("x-triton-reg-dt", cell), batch_first=True)
    expected = _run(module, "numpy", 5, x, hx, lengths, True)
    module = module.to(dtype)
    got = _run(module, "triton", 5, x.to(dtype), tuple(h.to(dtype) for h in hx), lengths, True)
    for name in expected:
        assert got[name].dtype == dtype
        assert_close(got[name], expected[name], dtype, name)


@needs_triton
def test_triton_regularized_compiles_fullgraph():
    """torch.compile sees the kernels' workspace (the op's fake asks the backend for its
    shape; LayerNorm's is wider and fp32): one graph, the same outputs and gradients as
    eagerly under the same seed."""
    module = gpurnn.LSTM(3, 4, dtype=F64, backend="triton", **ALL)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    torch.manual_seed(9)
    out, _ = compiled(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.manual_seed(9)
    eager, _ = module(x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, torch.autograd.grad(eager.sum(), x)[0])


_GPU_KEYWORDS = {
    "masks": dict(zoneout=0.1, recurrent_dropout=0.25, dropconnect=0.2),
    "ln": dict(layer_norm=True),
    "indrnn": dict(zoneout=0.1, recurrent_dropout=0.25),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cell, keywords, proj", [
    ("lstm", "masks", 0), ("lstm", "ln", 0), ("gru", "ln", 0), ("indrnn_tanh", "indrnn", 0),
    ("lstm", "masks", 256), ("lstm", "ln", 256),
])  # fmt: skip
def test_triton_regularized_gpu_real_size(cell, keywords, proj, dtype):
    """H=768, B=16, T=1024 on a GPU with zoneout, recurrent dropout and DropConnect, or
    LayerNorm (its statistics exchanged between 96 programs), also with proj_size=256 (the
    projected kernels): the kernels against the torch loop in float64, the same masks."""
    kw = _GPU_KEYWORDS[keywords]
    layout = dict(input_size=768, hidden_size=768, **({"proj_size": proj} if proj else {}))
    module = _make(cell, kw, **layout, dtype=torch.float32).cuda()
    x = torch.randn(1024, 16, 768, device="cuda")
    results = {}
    for backend, dt in (("torch", F64), ("triton", dtype)):
        m = module.to(dt)
        m.zero_grad(set_to_none=True)
        xs = x.to(dt).requires_grad_()
        torch.manual_seed(0)
        with gpurnn.use_backend(backend):
            out, hidden = m(xs)
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        (out.float().sin().sum() + sum(h.float().sum() for h in hidden)).backward()
        results[backend] = [out, *hidden, xs.grad, m.weight_hh_l0.grad, m.weight_ih_l0.grad]
    tol = {torch.float32: 1e-3, torch.bfloat16: 6e-2}[dtype]
    for got, want in zip(results["triton"], results["torch"]):
        scale = want.abs().max().item() or 1.0
        assert (got.double() - want).abs().max().item() / scale < tol


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_empty_batch(backend):
    """B = 0 (torch.nn allows it): empty outputs, zero gradients, masks of no rows."""
    module = gpurnn.LSTM(3, 4, num_layers=2, **KEYWORDS["all"], backend=backend)
    x = torch.randn(5, 0, 3, requires_grad=True)
    out, (h, c) = module(x)
    assert out.shape == (5, 0, 4) and h.shape == c.shape == (2, 0, 4)
    out.sum().backward()
    assert torch.equal(module.weight_hh_l0.grad, torch.zeros(16, 4))
