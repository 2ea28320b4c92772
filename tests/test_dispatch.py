"""auto's per-shape choice among triton, cupy and torch (cuDNN), from measured rows."""

import csv
import json

import pytest
import torch

from gpurnn import backends, dispatch
from gpurnn.backends import choose_backend

H100 = "NVIDIA H100 80GB HBM3"


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
    date="2026-11-27T08:00:00Z",
    card="H200",
    mode="fwdbwd",
    layers="1",
    bidirectional="0",
    varlen="",
    device="cuda",
    T=1024,
):
    return dict(
        impl=impl,
        H=str(H),
        B=str(B),
        T=str(T),
        ms=str(ms),
        cell=cell,
        dtype=dtype,
        status=status,
        run_id=run_id,
        date=date,
        card=card,
        mode=mode,
        layers=layers,
        bidirectional=bidirectional,
        varlen=varlen,
        device=device,
    )


def test_build_ranks_every_candidate_within_each_run():
    rows = [
        row("gpurnn-triton", 768, 4, 9.0),
        row("gpurnn-cupy", 768, 4, 6.0),
        row("cudnn", 768, 4, 12.0),
        row("gpurnn-triton", 768, 64, 7.0),
        row("gpurnn-cupy", 768, 64, 8.0),
        row("cudnn", 768, 64, 3.5),
        # older runs of a case are superseded; other modes, stacks and CPU rows ignored
        row("gpurnn-cupy", 768, 64, 1.0, run_id="r1", date="2026-11-27T07:00:00Z"),
        row("gpurnn-cupy", 768, 64, 1.0, mode="fwd"),
        row("gpurnn-cupy", 768, 64, 1.0, layers="2"),
        row("gpurnn-cupy", 768, 64, 1.0, device="cpu"),
    ]
    choices = dispatch.build(rows)["choices"]
    assert choices[dispatch.key("lstm", "bfloat16", 768, 4)] == ["cupy", "triton", "torch"]
    assert choices[dispatch.key("lstm", "bfloat16", 768, 64)] == ["torch", "triton", "cupy"]
    # unknown batch size: geometric mean over B=4 and B=64 of time / the case's fastest:
    # torch (2 * 1)^.5 = 1.41 < cupy (1 * 8/3.5)^.5 = 1.51 < triton (1.5 * 2)^.5 = 1.73
    assert choices[dispatch.key("lstm", "bfloat16", 768, None)] == ["torch", "cupy", "triton"]


def test_a_wrong_or_failed_candidate_never_wins_its_bucket():
    rows = [
        row("gpurnn-triton", 256, 16, 1.0, status="wrong: max_err 0.3"),
        row("gpurnn-cupy", 256, 16, 5.0),
        row("cudnn", 256, 16, 4.0),
        # a failure at one size of the bucket keeps cupy out of all of it
        row("gpurnn-triton", 256, 4, 1.0),
        row("gpurnn-cupy", 256, 4, 0.5, status="failed: illegal address"),
        row("gpurnn-triton", 256, 2, 2.0),
        row("gpurnn-cupy", 256, 2, 1.0),
    ]
    choices = dispatch.build(rows)["choices"]
    assert choices[dispatch.key("lstm", "bfloat16", 256, 16)] == ["torch", "cupy"]
    assert choices[dispatch.key("lstm", "bfloat16", 256, 4)] == ["triton"]


def test_times_of_different_runs_are_never_compared():
    # each case measured in its own run; cuDNN drifted between them
    rows = [
        row("cudnn", 768, 16, 20.0, run_id="a", date="2026-11-27T07:00:00Z"),
        row("gpurnn-triton", 768, 16, 10.0, run_id="a", date="2026-11-27T07:00:00Z"),
        row("cudnn", 768, 16, 5.0, run_id="b", date="2026-11-27T06:00:00Z"),
    ]
    assert dispatch.build(rows)["choices"][dispatch.key("lstm", "bfloat16", 768, 16)] == [
        "triton",
        "torch",
    ]


def test_failed_gpu_tests_keep_a_backend_out_on_that_card():
    rows = [
        row("gpurnn-triton", 768, 16, 9.0, card=H100),
        row("gpurnn-cupy", 768, 16, 6.0, card=H100),
        row("cudnn", 768, 16, 12.0, card=H100),
        row("gpurnn-triton", 768, 16, 9.0),
        row("gpurnn-cupy", 768, 16, 6.0),
    ]
    records = [
        dict(date="2026-11-27", card=H100, backend="cupy", status="failed"),
        dict(date="2026-11-27", card=H100, backend="triton", status="failed"),
        # a later pass on the card clears it; an incomplete run says nothing
        dict(date="2026-11-28", card=H100, backend="triton", status="passed"),
        dict(date="2026-11-29", card=H100, backend="triton", status="incomplete"),
        dict(date="2026-11-28", card="H200", backend="cupy", status="passed"),
    ]
    table = dispatch.build(rows, records)
    k = dispatch.key("lstm", "bfloat16", 768, 16)
    assert table["failed_gpu_tests"] == {H100: ["cupy"], "H200": []}
    assert table["by_card"][H100][k] == ["triton", "torch"]
    assert table["by_card"]["H200"][k] == ["cupy", "triton"]
    # over every card (for cards without their own rows): failed somewhere is out
    assert table["choices"][k] == ["triton", "torch"]


def test_passed_gpu_tests_record_the_latest_conclusive_pass(monkeypatch):
    """What a variant's gate (the cupy K-split one: `auto` only after its GPU tests passed on
    the card) reads: the latest conclusive record per card, a later failure revoking it."""
    records = [
        dict(date="2026-12-01", card=H100, backend="cupy-ksplit", status="passed"),
        dict(date="2026-12-02", card=H100, backend="cupy-ksplit", status="incomplete"),
        dict(date="2026-12-01", card="H200", backend="cupy-ksplit", status="passed"),
        dict(date="2026-12-02", card="H200", backend="cupy-ksplit", status="failed"),
        dict(date="2026-12-01", card="A100", backend="cupy-ksplit", status="skipped"),
    ]
    table = dispatch.build([row("gpurnn-triton", 768, 16, 9.0), row("cudnn", 768, 16, 12.0)],
                           records)  # fmt: skip
    assert table["passed_gpu_tests"] == {H100: ["cupy-ksplit"]}
    monkeypatch.setattr(dispatch, "load_table", lambda: table)
    assert dispatch.gpu_tests_passed("cupy-ksplit", H100)
    assert not dispatch.gpu_tests_passed("cupy-ksplit", "H200")
    assert not dispatch.gpu_tests_passed("cupy-ksplit", "A100")
    assert not dispatch.gpu_tests_passed("cupy-ksplit", None)


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
def both_kernels(monkeypatch):
    """triton and cupy 'run' every case, as on a CUDA machine; the card is an H100."""
    monkeypatch.delenv("GPURNN_BACKEND", raising=False)
    for name in ("triton", "cupy"):
        monkeypatch.setitem(backends._instances, name, _Runs(name))
        monkeypatch.delitem(backends._import_errors, name, raising=False)
    monkeypatch.setattr(dispatch, "card_name", lambda device: H100)
    dispatch.load_table.cache_clear()
    yield
    dispatch.load_table.cache_clear()


@pytest.fixture
def table_file(both_kernels, monkeypatch, tmp_path):
    table = tmp_path / "dispatch.json"
    monkeypatch.setattr(dispatch, "TABLE_PATH", table)
    dispatch.load_table.cache_clear()

    def write(content):
        table.write_text(json.dumps(content))
        dispatch.load_table.cache_clear()

    return write


CUDA, BF16 = torch.device("cuda"), torch.bfloat16


def test_a_bucket_measured_faster_on_cudnn_runs_on_torch(table_file):
    # nothing measured: the default order, triton first
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 64, torch_native=True) == "triton"
    rows = [
        row("gpurnn-triton", 768, 64, 36.4, card=H100),
        row("cudnn", 768, 64, 19.3, card=H100),
        row("gpurnn-triton", 768, 16, 6.5, card=H100),
        row("cudnn", 768, 16, 14.9, card=H100),
    ]
    table_file(dispatch.build(rows))
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 64, torch_native=True) == "torch"
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 16, torch_native=True) == "triton"
    # where torch would be the explicit time loop (the primitive, torch.compile), cuDNN's
    # time says nothing: the next measured candidate
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 64) == "triton"
    # a name asked for is never overridden, and CPU tensors never get GPU kernels
    assert choose_backend("triton", "lstm", CUDA, BF16, False, 768, 64) == "triton"
    assert choose_backend(None, "lstm", torch.device("cpu"), BF16, False, 768, 16) == "torch"


def test_auto_never_runs_a_backend_whose_gpu_tests_failed(table_file, monkeypatch):
    k = dispatch.key("lstm", "bfloat16", 768, 4)
    table_file({"choices": {k: ["cupy", "triton"]}, "failed_gpu_tests": {H100: ["cupy"]}})
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 4) == "triton"
    # nor as the default order's fallback: here triton cannot run the case
    monkeypatch.setitem(backends._instances, "triton", None)
    monkeypatch.setitem(backends._import_errors, "triton", "not installed")
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 4) == "torch"
    # on another card, with no test records of its own, a backend failed anywhere stays out
    monkeypatch.setattr(dispatch, "card_name", lambda device: "H200")
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 4) == "torch"
    table_file({"choices": {k: ["cupy", "triton"]}, "failed_gpu_tests": {"H200": []}})
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 4) == "cupy"


def test_the_shipped_table_routes_to_cudnn_where_it_measured_faster(both_kernels):
    """gpurnn/dispatch.json as committed, on the H100 it was measured on."""
    fp16 = torch.float16

    def auto(dtype, H, B):
        return choose_backend(None, "lstm", CUDA, dtype, False, H, B, torch_native=True)

    # B=64 went to cuDNN with the first kernels (0.49x); the 64-row batch tiles measured
    # 1.76x faster than cuDNN for training (probe rows of 2026-11-27)
    assert auto(BF16, 768, 64) == "triton"
    assert auto(BF16, 1024, 256) == "torch"
    assert auto(fp16, 768, 16) == "torch"
    assert auto(BF16, 768, 16) == "triton"
    assert auto(BF16, 768, 1) == "triton"
    assert choose_backend(None, "gru", CUDA, BF16, False, 768, 16, torch_native=True) == "triton"
    # cupy failed its GPU tests on the H100: never chosen there
    assert "cupy" in dispatch.failed_gpu_tests(H100)


def test_layers_tell_auto_they_run_torch_as_cudnn(monkeypatch):
    """Only eager layers run backend "torch" as torch.nn's own (cuDNN) layer, the path the
    table measured; cells run it as a loop."""
    import gpurnn
    from gpurnn import modules

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("torch_native", False))
        return choose_backend(*args, **kwargs)

    monkeypatch.setattr(modules, "choose_backend", spy)
    x = torch.randn(3, 2, 4)
    gpurnn.LSTM(4, 5)(x)
    gpurnn.GRUCell(4, 5)(x[0])
    assert seen == [True, False]


def _write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_write_from_csv(table_file, tmp_path, monkeypatch):
    rows = [row("gpurnn-triton", 512, 16, 3.0), row("gpurnn-cupy", 512, 16, 2.0)]
    results, tests = tmp_path / "results.csv", tmp_path / "gpu_tests.csv"
    _write_csv(results, rows)
    args = ["--csv", str(results), "--gpu-tests", str(tests), "--write"]
    assert dispatch.main(args) == 0
    written = json.loads(dispatch.TABLE_PATH.read_text())
    assert written["choices"] == {
        "lstm/bfloat16/H<=512/B<=16": ["cupy", "triton"],
        "lstm/bfloat16/H<=512/Bany": ["cupy", "triton"],
    }
    _write_csv(tests, [dict(date="2026-11-28", card="H200", backend="cupy", status="failed")])
    assert dispatch.main(args) == 0
    written = json.loads(dispatch.TABLE_PATH.read_text())
    assert written["choices"]["lstm/bfloat16/H<=512/B<=16"] == ["triton"]
    assert dispatch.main(["--csv", str(tmp_path / "missing.csv")]) == 2


PYTEST_LOG = """\
tests/test_triton_gpu.py::test_real_size_vs_reference[bfloat16-lstm] PASSED     [  7%]
tests/test_triton_gpu.py::test_real_size_vs_reference[bfloat16-gru] FAILED      [ 14%]
tests/test_triton_gpu.py::test_tf32_default[lstm] PASSED                        [ 21%]
=========================== short test summary info ============================
PASSED tests/test_triton_gpu.py::test_real_size_vs_reference[bfloat16-lstm]
PASSED tests/test_triton_gpu.py::test_tf32_default[lstm]
FAILED tests/test_triton_gpu.py::test_real_size_vs_reference[bfloat16-gru] - Assert
ERROR tests/test_triton_gpu.py::test_barrier_timeout_raises - RuntimeError
"""


def test_gpu_test_outcomes_from_a_pytest_log():
    passed, failed = dispatch.pytest_outcomes(PYTEST_LOG)
    assert passed == {
        "tests/test_triton_gpu.py::test_real_size_vs_reference[bfloat16-lstm]",
        "tests/test_triton_gpu.py::test_tf32_default[lstm]",
    }
    assert failed == {
        "tests/test_triton_gpu.py::test_real_size_vs_reference[bfloat16-gru]",
        "tests/test_triton_gpu.py::test_barrier_timeout_raises",
    }
    status = dispatch.run_status
    assert status(1, passed, failed) == "failed"
    assert status(124, passed, failed) == "failed"  # cut at its limit after a failure
    assert status(124, passed, set()) == "incomplete"
    assert status(0, passed, set()) == "passed"
    assert status(5, set(), set()) == "skipped"
    assert status(0, set(), set()) == "skipped"
    # a harness problem says nothing about the kernels: incomplete, never failed
    assert status(2, set(), set()) == "incomplete"  # e.g. the test module does not import
    assert status(4, set(), set()) == "incomplete"


COLLECTION_ERROR_LOG = """\
tests/test_triton_gpu.py::test_tf32_default[lstm] PASSED                  [ 50%]
==================================== ERRORS ====================================
______________ ERROR collecting tests/test_triton_proj_gpu.py _______________
E   ImportError: cannot import name 'launch'
=========================== short test summary info ============================
PASSED tests/test_triton_gpu.py::test_tf32_default[lstm]
ERROR tests/test_triton_proj_gpu.py
"""


def test_a_collection_error_is_incomplete_with_its_reason():
    passed, failed = dispatch.pytest_outcomes(COLLECTION_ERROR_LOG)
    assert failed == set()
    why = dispatch.harness_errors(COLLECTION_ERROR_LOG, 1)
    assert why == ["collection error in tests/test_triton_proj_gpu.py"]
    assert dispatch.run_status(1, passed, failed, why) == "incomplete"
    assert dispatch.harness_errors("", 124) == ["stopped at its time limit"]


def test_record_gpu_tests_appends_a_row(tmp_path, capsys):
    log, out = tmp_path / "triton.log", tmp_path / "gpu_tests.csv"
    log.write_text(PYTEST_LOG)
    args = ["--record-gpu-tests", "triton", "--pytest-log", str(log), "--gpu-tests", str(out)]
    assert dispatch.main([*args, "--exit-status", "1"]) == 0
    assert dispatch.main([*args, "--exit-status", "0"]) == 0
    with out.open(newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert records[0]["backend"] == "triton" and records[0]["failed"] == "2"
    assert "test_barrier_timeout_raises" in records[0]["note"]
    assert "GPU tests of triton" in capsys.readouterr().out
    assert dispatch.main(["--record-gpu-tests", "triton", "--gpu-tests", str(out)]) == 2


def test_auto_leaves_projections_to_torch_until_gpu_checked(both_kernels, monkeypatch):
    """The triton projection kernels run when asked for by name; "auto" on CUDA does not
    pick them before their GPU tests have passed."""
    from gpurnn.backends.triton import TritonBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    be = TritonBackend()
    assert be.auto_reason("lstm", True) is not None
    assert be.auto_reason("lstm", False) is None
    # the stand-in triton says what the real one says about auto
    monkeypatch.setattr(backends._instances["triton"], "auto_reason", be.auto_reason)
    assert choose_backend(None, "lstm", CUDA, BF16, True, 768, 16, torch_native=True) != "triton"
    assert choose_backend(None, "lstm", CUDA, BF16, False, 768, 16, torch_native=True) == "triton"
    assert choose_backend("triton", "lstm", CUDA, BF16, True, 768, 16) == "triton"
