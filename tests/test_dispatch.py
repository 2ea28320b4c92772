"""auto's per-shape choice between the two GPU kernel backends, from measured rows."""

import csv
import json

import pytest
import torch

from gpurnn import backends, dispatch
from gpurnn.backends import choose_backend


def row(
    impl,
    H,
    B,
    ms,
    *,
    cell="lstm",
    dtype="bf16",
    status="ok",
    run_id="r2",
    card="H200",
    mode="fwdbwd",
    layers="1",
    bidirectional="0",
    varlen="",
):
    return dict(
        impl=impl,
        H=str(H),
        B=str(B),
        ms=str(ms),
        cell=cell,
        dtype=dtype,
        status=status,
        run_id=run_id,
        card=card,
        mode=mode,
        layers=layers,
        bidirectional=bidirectional,
        varlen=varlen,
    )


def test_build_keeps_the_faster_ok_backend_per_bucket():
    rows = [
        row("gpurnn-triton", 768, 4, 9.0),
        row("gpurnn-cupy", 768, 4, 6.0),
        row("gpurnn-triton", 768, 64, 7.0),
        row("gpurnn-cupy", 768, 64, 8.0),
        # a wrong kernel never wins, however fast
        row("gpurnn-triton", 256, 16, 1.0, status="wrong: max_err 0.3"),
        row("gpurnn-cupy", 256, 16, 5.0),
        row("gpurnn-triton", 256, 16, 6.0, run_id="r1"),
        # older runs, other modes and stacked shapes are ignored
        row("gpurnn-cupy", 768, 64, 1.0, run_id="r1"),
        row("gpurnn-cupy", 768, 64, 1.0, mode="fwd"),
        row("gpurnn-cupy", 768, 64, 1.0, layers="2"),
        row("cudnn", 768, 64, 0.5),
    ]
    choices = dispatch.build(rows)
    assert choices[dispatch.key("lstm", "bfloat16", 768, 4)] == "cupy"
    assert choices[dispatch.key("lstm", "bfloat16", 768, 64)] == "triton"
    # the "any batch" bucket averages over batch sizes: (9+7)/2 < (6+8)/2 is false
    assert choices[dispatch.key("lstm", "bfloat16", 768, None)] == "cupy"
    # H=256 has only cupy ok in the latest run: nothing to choose between
    assert dispatch.key("lstm", "bfloat16", 256, 16) not in choices


def test_buckets():
    assert dispatch.key("gru", "float16", 1, 1) == "gru/float16/H<=256/B<=8"
    assert dispatch.key("gru", "float16", 768, 9) == "gru/float16/H<=1024/B<=16"
    assert dispatch.key("gru", "float16", 4096, 1000) == "gru/float16/H>2048/B>256"


class _Runs(backends.Backend):
    """Stands for a kernel backend that can run everything (no GPU needed to choose)."""

    def __init__(self, name):
        self.name = name

    def forward(self, *args):
        raise AssertionError("not run: only chosen")

    def backward(self, *args):
        raise AssertionError("not run: only chosen")


@pytest.fixture
def both_kernels(monkeypatch, tmp_path):
    monkeypatch.delenv("GPURNN_BACKEND", raising=False)
    for name in ("triton", "cupy"):
        monkeypatch.setitem(backends._instances, name, _Runs(name))
        monkeypatch.delitem(backends._import_errors, name, raising=False)
    table = tmp_path / "dispatch.json"
    monkeypatch.setattr(dispatch, "TABLE_PATH", table)
    dispatch.load_table.cache_clear()
    yield table
    dispatch.load_table.cache_clear()


def test_auto_follows_the_table_on_cuda(both_kernels):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    # nothing measured: the default order, triton first
    assert choose_backend(None, "lstm", cuda, bf16, False, 768, 4) == "triton"
    both_kernels.write_text(json.dumps({"choices": {
        dispatch.key("lstm", "bfloat16", 768, 4): "cupy",
        dispatch.key("lstm", "bfloat16", 768, None): "triton",
    }}))  # fmt: skip
    dispatch.load_table.cache_clear()
    assert choose_backend(None, "lstm", cuda, bf16, False, 768, 4) == "cupy"
    assert choose_backend(None, "lstm", cuda, bf16, False, 768, 64) == "triton"
    assert choose_backend(None, "lstm", cuda, bf16, False, 768, None) == "triton"
    # a name asked for is never overridden, and CPU tensors never get GPU kernels
    assert choose_backend("triton", "lstm", cuda, bf16, False, 768, 4) == "triton"
    assert choose_backend(None, "lstm", torch.device("cpu"), bf16, False, 768, 4) == "torch"


def test_write_from_csv(both_kernels, tmp_path, capsys):
    rows = [row("gpurnn-triton", 512, 16, 3.0), row("gpurnn-cupy", 512, 16, 2.0)]
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert dispatch.main(["--csv", str(path), "--write"]) == 0
    written = json.loads(both_kernels.read_text())["choices"]
    assert written == {"lstm/bfloat16/H<=512/B<=16": "cupy", "lstm/bfloat16/H<=512/Bany": "cupy"}
    assert dispatch.main(["--csv", str(tmp_path / "missing.csv")]) == 2
