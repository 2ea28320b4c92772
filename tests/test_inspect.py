"""gpurnn.inspect: recorded gates, cell and hidden states against the float64 reference.

The expected gates are recomputed here in float64 NumPy from the module's weights and the
reference's own states: at step t, the gates follow from the layer input x_t and the state
h_prev the step started from (the reference's output at the previous step of that
direction), and the cell state from c_prev; the reference's outputs give h_t directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gpurnn
from gpurnn import demos, inspect
from gpurnn.reference import rnn_forward
from tests.conftest import seeded_generator
from tests.helpers import make_torch_module, uneven_lengths


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def expected_steps(cell, module, x, lengths):
    """{(layer, direction): {name: (T, B, units)}} in float64, NaN past each sequence."""
    params = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    x = x.numpy()
    T, B = x.shape[:2]
    L, D = module.num_layers, 2 if module.bidirectional else 1
    lengths = np.full(B, T) if lengths is None else lengths.numpy()
    H = module.hidden_size
    out = {}
    layer_in = x
    for layer in range(L):
        # the reference runs layer by layer: feed it this layer's input with its params
        sub = {k.replace(f"_l{layer}", "_l0"): v for k, v in params.items() if f"_l{layer}" in k}
        y, _, _ = rnn_forward(cell, layer_in, sub, bidirectional=D == 2, lengths=lengths)
        for d in range(D):
            sfx = "_l0" + ("_reverse" if d else "")
            w_ih, w_hh = sub["weight_ih" + sfx], sub["weight_hh" + sfx]
            b_ih, b_hh = sub.get("bias_ih" + sfx, 0.0), sub.get("bias_hh" + sfx, 0.0)
            w_hr = sub.get("weight_hr" + sfx)
            H_out = w_hh.shape[1]
            h_all = y[..., d * H_out : (d + 1) * H_out]
            rec = {k: np.full((T, B, H), np.nan) for k in ("i", "f", "g", "o", "c", "r", "z", "n")}
            rec["h"] = np.full((T, B, H_out), np.nan)
            for b in range(B):
                n = int(lengths[b])
                order = range(n - 1, -1, -1) if d else range(n)
                h_prev, c_prev = np.zeros(H_out), np.zeros(H)
                for t in order:
                    xw = w_ih @ layer_in[t, b] + b_ih
                    hw = w_hh @ h_prev + b_hh
                    if cell == "lstm":
                        a = xw + hw
                        i, f = _sigmoid(a[:H]), _sigmoid(a[H : 2 * H])
                        g, o = np.tanh(a[2 * H : 3 * H]), _sigmoid(a[3 * H :])
                        c_prev = f * c_prev + i * g
                        for k, v in zip("ifgoc", (i, f, g, o, c_prev)):
                            rec[k][t, b] = v
                        m = o * np.tanh(c_prev)
                        # the recomputed state must be the reference's own
                        np.testing.assert_allclose(
                            w_hr @ m if w_hr is not None else m, h_all[t, b], atol=1e-12
                        )
                    elif cell == "gru":
                        r = _sigmoid(xw[:H] + hw[:H])
                        z = _sigmoid(xw[H : 2 * H] + hw[H : 2 * H])
                        nn_ = np.tanh(xw[2 * H :] + r * hw[2 * H :])
                        for k, v in zip("rzn", (r, z, nn_)):
                            rec[k][t, b] = v
                    rec["h"][t, b] = h_all[t, b]
                    h_prev = h_all[t, b]
            out[(layer, d)] = rec
        layer_in = y
    return out


CASES = [
    # (cell, num_layers, bidirectional, proj_size, packed)
    ("lstm", 1, False, 0, False),
    ("lstm", 1, False, 3, False),
    ("lstm", 2, True, 3, True),
    ("gru", 1, False, 0, False),
    ("gru", 2, True, 0, True),
    ("rnn_tanh", 2, True, 0, False),
    ("rnn_relu", 1, False, 0, True),
    ("lstm", 2, True, 0, True),
]


# triton (interpreted here) records straight from the fused kernels' workspace
BACKEND_CASES = [(backend, *case) for backend in ("torch", "numpy", "triton") for case in CASES]


@pytest.mark.parametrize("backend,cell,layers,bidir,proj,packed", BACKEND_CASES)
def test_recorded_values_match_reference(cell, layers, bidir, proj, packed, backend):
    torch.manual_seed(0)
    T, B, F, H = 7, 3, 4, 5
    module = gpurnn.convert(
        make_torch_module(
            cell,
            input_size=F,
            hidden_size=H,
            num_layers=layers,
            bidirectional=bidir,
            proj_size=proj,
        )
    )
    module.backend = backend
    x = torch.randn(T, B, F, dtype=torch.float64)
    lengths = uneven_lengths(B, T, torch.Generator().manual_seed(1)) if packed else None
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    rec = inspect.record(module, inp)
    expected = expected_steps(cell, module, x, lengths)

    assert set(rec.steps) == set(expected)
    for key, values in rec.steps.items():
        assert set(values) == set(rec.names)
        for name, got in values.items():
            want = torch.from_numpy(expected[key][name])
            assert got.shape == want.shape, (key, name)
            torch.testing.assert_close(
                got,
                want,
                atol=1e-10,
                rtol=1e-10,
                equal_nan=True,
                msg=lambda m, k=key, n=name: f"{k} {n}: {m}",
            )

    # the recording's output is the module's own (whatever backend ran the module)
    with torch.no_grad():
        out, _ = module(inp)
    if packed:
        out = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
    torch.testing.assert_close(rec.output(), out, atol=1e-10, rtol=1e-10)


def test_batch_first_hx_unbatched_and_fp32():
    torch.manual_seed(0)
    module = gpurnn.LSTM(3, 6, num_layers=2, batch_first=True)
    x = torch.randn(2, 9, 3)
    hx = (torch.randn(2, 2, 6), torch.randn(2, 2, 6))
    rec = inspect.record(module, x, hx)
    with torch.no_grad():
        out, _ = module(x, hx)
    torch.testing.assert_close(rec.output(), out.transpose(0, 1))
    assert rec.get("c", layer=1).shape == (9, 2, 6)

    rec1 = inspect.record(module, x[0], (hx[0][:, 0], hx[1][:, 0]))  # unbatched
    torch.testing.assert_close(rec1.get("f", 1)[:, 0], rec.get("f", 1)[:, 0])


def test_torch_nn_module_and_bad_name():
    torch.manual_seed(0)
    module = torch.nn.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    rec = inspect.record(module, x)
    with torch.no_grad():
        torch.testing.assert_close(rec.output(), module(x)[0])
    with pytest.raises(KeyError, match="'c' not recorded for gru"):
        rec.get("c")


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    module = gpurnn.LSTM(3, 4, bidirectional=True)
    x = torch.randn(6, 2, 3)
    lengths = torch.tensor([6, 4])
    rec = inspect.record(module, pack_padded_sequence(x, lengths))
    for what in rec.names:
        path = inspect.plot_heatmap(
            rec,
            what,
            direction=1,
            batch_index=1,
            path=tmp_path / f"{what}.png",
            xticklabels="abcdef",
        )
        assert path.stat().st_size > 1000
    path = inspect.plot_gate_saturation(rec, tmp_path / "sat.png")
    assert path.stat().st_size > 1000
    fractions = inspect.saturation(rec)
    assert set(fractions) == {(0, 0), (0, 1)}
    assert all(0 <= lo <= 1 and 0 <= hi <= 1 for g in fractions.values() for lo, hi in g.values())

    rnn = inspect.record(gpurnn.RNN(3, 4), x)  # no gates: saturation of h
    assert inspect.plot_gate_saturation(rnn, tmp_path / "rnn.png").stat().st_size > 1000


def test_cli_demo_trains_and_writes_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    try:
        result = demos.depth_tracking(depth_args(tmp_path))
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    names = {p.name for p in result["paths"]}
    assert names == {f"{name}.png" for name in ("i", "f", "g", "o", "c", "h", "saturation")}


def depth_args(out):
    import argparse

    parser = argparse.ArgumentParser()
    demos.add_depth_arguments(parser)
    return parser.parse_args(f"--steps 60 --length 20 --hidden 8 --device cpu --out {out}".split())


# bf16 is wrong inside the Triton interpreter (its tl.dot multiplies raw bits), so triton
# records fp16 here and bf16 only on a GPU; its dtype promise is the same for both
DTYPE_CASES = [
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
    ("numpy", torch.float16),
    ("numpy", torch.bfloat16),
    ("triton", torch.float16),
    pytest.param("triton", torch.bfloat16, marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend,dtype", DTYPE_CASES)
def test_16bit_recordings_are_fp32_on_every_backend(backend, dtype, cell):
    """A 16-bit model's recording is fp32 whichever backend computed it, and it agrees
    with the fp32 recording of the same weights to 16-bit rounding."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = seeded_generator("inspect-dtype", backend, str(dtype), cell)
    T, B, F, H = 6, 2, 4, 16
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    module = gpurnn.convert(make_torch_module(cell, input_size=F, hidden_size=H))
    module = module.to(device, torch.float32)
    module.backend = backend
    x = torch.randn(T, B, F, generator=gen).to(device)
    want = inspect.record(module, x, backend="torch")
    got = inspect.record(module.to(dtype), x.to(dtype))
    for name in got.names:
        assert got.get(name).dtype == torch.float32, (name, got.get(name).dtype)
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(got.get(name), want.get(name), atol=tol, rtol=tol)
