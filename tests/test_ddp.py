"""gpurnn models under torch.distributed on CPU: two processes, the gloo backend.

Under DistributedDataParallel a gpurnn model trains exactly like the same torch.nn model
under DDP (same losses, same parameters after several steps, on every CPU backend); under
FSDP (`fully_shard`) likewise; and nothing warns about `flatten_parameters`.
All cases run in one spawn of two workers, since starting the processes dominates.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import gpurnn
from gpurnn import native

WORLD = 2
STEPS = 4
ROOT = Path(__file__).resolve().parent.parent


class Net(torch.nn.Module):
    """A recurrent layer and a linear head reading every step."""

    def __init__(self, cell, hidden):
        super().__init__()
        kw = dict(num_layers=2, bidirectional=True)
        if cell == "lstm":
            self.rnn = torch.nn.LSTM(3, hidden, proj_size=2, **kw)
            width = 4
        else:
            self.rnn = torch.nn.GRU(3, hidden, **kw)
            width = 2 * hidden
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out).squeeze(-1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(seed, rank, step):
    """Each rank's own data for a step (the ranks see different batches, as in DDP)."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank * 100 + step)
    return (
        torch.randn(6, 4, 3, generator=gen, dtype=torch.float64),
        torch.randn(6, 4, generator=gen, dtype=torch.float64),
    )


def train(model, seed, rank, params_of):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    losses = []
    for step in range(STEPS):
        x, target = batch(seed, rank, step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), params_of(model)


def ddp_params(model):
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


def fsdp_params(model):
    # sharded parameters are DTensors: gather the whole tensor to compare
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def check_same(what, got, expected):
    losses, params = got
    ref_losses, ref_params = expected
    torch.testing.assert_close(losses, ref_losses, atol=1e-10, rtol=1e-10, msg=f"{what}: losses")
    assert params.keys() == ref_params.keys(), what
    for name, p in params.items():
        torch.testing.assert_close(
            p, ref_params[name], atol=1e-10, rtol=1e-10, msg=f"{what}: parameter {name}"
        )


def worker(rank, port, seed, run_fsdp, results_path):
    """Trains every case in this process; rank 0 writes what it found to results_path as
    JSON: case -> None (trained exactly like torch.nn) or the mismatch."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    torch.set_num_threads(1)
    results = {}

    def run(case, fn):
        try:
            fn()
            results[case] = None
        except Exception as e:  # reported by the test for this case
            results[case] = f"{type(e).__name__}: {e}"

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for cell in ("lstm", "gru"):
                torch.manual_seed(seed)
                initial = Net(cell, hidden=5).double()
                expected = train(DDP(copy.deepcopy(initial)), seed, rank, ddp_params)
                for backend in ("torch", "torch-loop", "numpy"):

                    def ddp_case(backend=backend, cell=cell, initial=initial, expected=expected):
                        name = "torch" if backend == "torch-loop" else backend
                        ours = gpurnn.convert(copy.deepcopy(initial), backend=name)
                        with native.use_native_layers(backend != "torch-loop"):
                            got = train(DDP(ours), seed, rank, ddp_params)
                        check_same(f"DDP {cell} {backend}", got, expected)

                    run(f"ddp-{cell}-{backend}", ddp_case)
                    if not run_fsdp or backend == "torch-loop":
                        continue

                    def fsdp_case(backend=backend, cell=cell, initial=initial, expected=expected):
                        from torch.distributed.fsdp import fully_shard

                        ours = gpurnn.convert(copy.deepcopy(initial), backend=backend)
                        fully_shard(ours.rnn)
                        fully_shard(ours)
                        got = train(ours, seed, rank, fsdp_params)
                        check_same(f"FSDP {cell} {backend}", got, expected)

                    run(f"fsdp-{cell}-{backend}", fsdp_case)
        messages = [str(w.message) for w in caught]
        results["warnings"] = [
            m for m in messages if "flatten_parameters" in m or "contiguous chunk" in m
        ]
        if rank == 0:
            Path(results_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def fsdp_unsupported_reason():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return (
            f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard "
            f"(public from torch 2.6)"
        )
    return None


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """Every case, trained once in one spawn of two gloo workers (starting them dominates)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo process group")
    seed = int(os.environ.get("GPURNN_TEST_SEED", "0")) % 10_000
    path = tmp_path_factory.mktemp("ddp") / "results.json"
    run_fsdp = fsdp_unsupported_reason() is None
    mp.spawn(worker, args=(free_port(), seed, run_fsdp, str(path)), nprocs=WORLD)
    return json.loads(path.read_text())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["torch", "torch-loop", "numpy"])
def test_ddp_trains_like_torch_nn(distributed_results, cell, backend):
    """Losses of every step and the parameters after them equal torch.nn's under DDP
    (float64, 1e-10): LSTM with proj_size and GRU, 2 layers, bidirectional."""
    failure = distributed_results[f"ddp-{cell}-{backend}"]
    assert failure is None, failure


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_fsdp_trains_like_torch_nn_under_ddp(distributed_results, cell, backend):
    """fully_shard (FSDP2) on the recurrent layer and the model: same losses and
    parameters (gathered) as the torch.nn model under DDP."""
    reason = fsdp_unsupported_reason()
    if reason is not None:
        pytest.skip(reason)
    failure = distributed_results[f"fsdp-{cell}-{backend}"]
    assert failure is None, failure


def test_no_flatten_parameters_warnings(distributed_results):
    assert distributed_results["warnings"] == []


def test_ddp_example_runs_under_torchrun(tmp_path):
    """examples/ddp.py at a tiny size under torchrun with two CPU processes."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo process group")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port",
            str(free_port()),
            str(ROOT / "examples" / "ddp.py"),
            "--steps",
            "40",
            "--hidden",
            "16",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "flatten_parameters" not in result.stderr
    assert "loss went down" in result.stdout, result.stdout
    assert "difference between processes: 0.0e+00" in result.stdout, result.stdout
