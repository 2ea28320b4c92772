"""torch.func over gpurnn layers, on every CPU backend: vmap over a functional call with
stacked parameters (model ensembles) and vmap(grad(...)) (per-sample gradients), both equal
to the loop over members or samples; and the custom op's batching rule itself.

torch.nn's layers cannot do this (aten's RNN ops have no batching rule); gpurnn's modules
run the primitive under transforms, and the primitive's batching rule runs the members one
after another, each on its backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import gpurnn
from tests.conftest import seeded_generator
from tests.helpers import assert_close, make_torch_module, module_kwargs
from tests.test_torch_nn_habits import (
    BACKENDS,
    F64,
    GPURNN,
    backend_name,
    draw_layout,
    each_backend,
)

backend = pytest.fixture(params=BACKENDS)(each_backend)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_vmap_ensemble_equals_the_loop_over_members(backend, cell):
    """torch.func.vmap over a functional call with stacked parameters (an ensemble),
    forward and the gradient of every member's parameters, equal to each member alone."""
    torch.manual_seed(seeded_generator("ensemble", backend, cell).initial_seed() % 2**31)
    small = backend == "triton"  # the interpreter is slow
    kw = module_kwargs(cell, input_size=3, hidden_size=4, bidirectional=not small)
    members = [GPURNN[cell](**kw, dtype=F64, backend=backend_name(backend))
               for _ in range(2 if small else 3)]  # fmt: skip
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(5, 2, 3, dtype=F64)

    def call(p, b, x):
        out, hidden = functional_call(base, (p, b), (x,))
        return out, hidden[0] if cell == "lstm" else hidden

    out, h_n = vmap(call, in_dims=(0, 0, None))(params, buffers, x)
    (out.pow(2).sum() + h_n.sum()).backward()
    for i, member in enumerate(members):
        out_i, hidden_i = member(x)
        h_i = hidden_i[0] if cell == "lstm" else hidden_i
        assert_close(out[i], out_i, F64, f"member {i} output")
        assert_close(h_n[i], h_i, F64, f"member {i} h_n")
        (out_i.pow(2).sum() + h_i.sum()).backward()
        for name, p in member.named_parameters():
            assert_close(params[name].grad[i], p.grad, F64, f"member {i} grad {name}")


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm"])
def test_per_sample_gradients_equal_the_loop(backend, cell):
    """vmap(grad(loss)) over the samples of a batch: each sample's parameter gradients, as
    torch.func's per-sample-gradient recipe computes them, equal one backward per sample."""
    g = seeded_generator("per-sample", backend, cell)
    ref = make_torch_module(cell, input_size=3, hidden_size=4)
    model = GPURNN[cell](**module_kwargs(cell, input_size=3, hidden_size=4), dtype=F64,
                         backend=backend_name(backend))  # fmt: skip
    model.load_state_dict(ref.state_dict())
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.randn(4, 5, 3, generator=g, dtype=F64)  # 4 samples of T = 5

    def loss(p, x):
        return functional_call(model, p, (x[:, None],))[0].pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        ref.zero_grad()
        ref(xs[i][:, None])[0].pow(2).sum().backward()
        for name, p in ref.named_parameters():
            assert_close(per_sample[name][i], p.grad, F64, f"sample {i} grad {name}")


def test_vmap_of_the_primitive_over_lengths_and_states():
    """The batching rule with every argument vmapped at once (xg, w_hh, h0, c0), lengths
    shared, against one call per member."""
    g = seeded_generator("vmap primitive")
    E, T, B, H = 3, 4, 2, 3
    xg = torch.randn(E, T, B, 4 * H, generator=g, dtype=F64)
    w = torch.randn(E, 4 * H, H, generator=g, dtype=F64) * 0.5
    h0 = torch.randn(E, B, H, generator=g, dtype=F64)
    c0 = torch.randn(E, B, H, generator=g, dtype=F64)
    lengths = torch.tensor([4, 2])
    for name in ("torch", "numpy"):

        def run(xg, w, h0, c0, name=name):
            return gpurnn.recurrence("lstm", xg, w, h0, c0, lengths=lengths, backend=name)

        batched = vmap(run)(xg, w, h0, c0)
        for i in range(E):
            for a, b in zip(batched, run(xg[i], w[i], h0[i], c0[i])):
                assert torch.equal(a[i], b)


def test_random_layouts_vmapped_match_torch_nn(backend):
    """The random layouts of test_torch_nn_habits (B = 0 included), each as an ensemble of
    two torch.nn modules loaded into one vmapped functional call: every member's output,
    states and parameter gradients equal its torch.nn module's."""
    g = seeded_generator("vmapped layouts", backend)
    for _ in range(2 if backend == "triton" else 6):
        layout = draw_layout(g, backend)
        cell, proj_size = layout["cell"], 0
        if cell == "lstm_proj":
            cell, proj_size = "lstm", 2
        kw = dict(
            input_size=layout["F"], hidden_size=layout["H"], num_layers=layout["num_layers"],
            bias=layout["bias"], bidirectional=layout["bidirectional"],
            batch_first=layout["batch_first"], proj_size=proj_size,
        )  # fmt: skip
        refs = [make_torch_module(cell, **kw) for _ in range(2)]
        ours = GPURNN[cell](**module_kwargs(cell, **kw), dtype=F64, backend=backend_name(backend))
        params, _ = stack_module_state(refs)
        shape = (layout["B"], layout["T"]) if layout["batch_first"] else (layout["T"], layout["B"])
        x = torch.randn(*shape, layout["F"], generator=g, dtype=F64)

        def call(p, x, ours=ours, cell=cell):
            out, hidden = functional_call(ours, p, (x,))
            return out, hidden[0] if cell == "lstm" else hidden

        out, h_n = vmap(call, in_dims=(0, None))(params, x)
        (out.pow(2).sum() + h_n.sum()).backward()
        for i, ref in enumerate(refs):
            out_i, hidden_i = ref(x)
            h_i = hidden_i[0] if cell == "lstm" else hidden_i
            assert_close(out[i], out_i, F64, f"member {i} output {layout}")
            assert_close(h_n[i], h_i, F64, f"member {i} h_n {layout}")
            (out_i.pow(2).sum() + h_i.sum()).backward()
            for name, p in ref.named_parameters():
                assert_close(params[name].grad[i], p.grad, F64, f"member {i} {name} {layout}")


@pytest.mark.gpu
def test_ensemble_of_8_lstms_on_gpu():
    """The benchmark's ensemble (8 LSTMs, H = 256, B = 16) on the triton kernels: vmap over
    the stacked members equals the loop over them, forward and every parameter gradient."""
    dev, E, T, B, H = torch.device("cuda"), 8, 128, 16, 256
    torch.manual_seed(seeded_generator("gpu ensemble").initial_seed() % 2**31)
    members = [gpurnn.LSTM(H, H, backend="triton", device=dev) for _ in range(E)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(T, B, H, device=dev)

    def call(p, b, x):
        return functional_call(base, (p, b), (x,))[0]

    out = vmap(call, in_dims=(0, 0, None))(params, buffers, x)
    out.pow(2).sum().backward()
    for i, member in enumerate(members):
        out_i = member(x)[0]
        out_i.pow(2).sum().backward()
        torch.testing.assert_close(out[i], out_i, rtol=1e-3, atol=1e-3)
        for name, p in member.named_parameters():
            torch.testing.assert_close(params[name].grad[i], p.grad, rtol=1e-2, atol=1e-2)


def test_ensemble_bench_row_runs(tmp_path):
    """The benchmark's ensemble rows (vmapped gpurnn layers against a loop over torch.nn
    layers) run and are right, at the smoke suite's size."""
    import csv

    from gpurnn import bench

    path = tmp_path / "results.csv"
    shape = "lstm-E2-T8-B2-H16"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: a second thread only adds synchronisation
    try:
        bench.main(["--shapes", shape, "--backends", "torch.nn,gpurnn-torch", "--quick",
                    "--csv", str(path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (impl, mode) for impl in ("torch.nn", "gpurnn-torch") for mode in ("fwd", "fwdbwd")
    }
    assert all(r["shape"] == shape and r["status"] == "ok" for r in rows), rows
