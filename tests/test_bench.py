"""The benchmark harness on CPU: rows, failures, filters, plots and the README table.

The timings themselves mean nothing here (tiny shapes, torch.nn's native CPU kernels);
what is tested is that the harness measures, checks, records and draws what it should.
"""

import argparse
import csv

import pytest
import torch

from gpurnn import bench, plot

SHAPES = "lstm-T8-B2-H16,lstm-T8-B3-H16-packed,lstm-T8-B3-H16-padded"
IMPLS = "torch.nn,gpurnn-torch,cell-loop"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny shapes: a second intra-op thread only adds synchronisation, and on a busy
    # shared machine its spin-waits cost 100x the work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _bench(csv_path, *extra):
    return bench.main(["--shapes", SHAPES, "--backends", IMPLS, "--csv", str(csv_path), *extra])


@pytest.fixture(scope="module")
def smoke_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results.csv"
    assert _bench(path) == 0
    return path


def test_rows_are_complete_and_sane(smoke_csv):
    rows = _rows(smoke_csv)
    # cell-loop runs dense single-layer shapes only: 3 impls x 2 modes + 2 x (2 impls x 2 modes)
    assert len(rows) == 14
    assert {r["impl"] for r in rows} == {"torch.nn", "gpurnn-torch", "cell-loop"}
    assert len({r["run_id"] for r in rows}) == 1
    cpu_blank = {"driver", "cudnn", "cuda", "peak_mem_mb"}  # CUDA-only facts
    cpu_blank |= {"proj_size", "failed_polls"}  # kernel-alone rows' columns
    for r in rows:
        assert r["status"] == "ok", r
        assert r["device"] == "cpu" and r["suite"] == "smoke"
        blank = set(cpu_blank)
        if r["shape"] == "lstm-T8-B2-H16":
            blank.add("varlen")
        if r["mode"] == "fwd":
            blank.add("grad_err")
        for field in bench.FIELDS:
            assert (r[field] == "") == (field in blank), (field, r)
        assert float(r["ms"]) > 0 and float(r["us_per_step"]) > 0 and float(r["tflops"]) > 0
        assert float(r["max_err"]) < 1e-5
        assert float(r["speedup_vs_cudnn"]) > 0
        assert int(r["repeats"]) >= bench.BUDGETS["cpu"].min_repeats
        if r["mode"] == "fwdbwd":
            assert float(r["grad_err"]) < 1e-5
    for r in rows:
        if r["impl"] == "torch.nn" and r["varlen"] != "padded":
            assert float(r["speedup_vs_cudnn"]) == 1.0


def test_padded_runs_are_measured_against_packed_cudnn(smoke_csv):
    rows = {(r["shape"], r["impl"], r["mode"]): r for r in _rows(smoke_csv)}
    packed = rows[("lstm-T8-B3-H16-packed", "torch.nn", "fwd")]
    padded = rows[("lstm-T8-B3-H16-padded", "torch.nn", "fwd")]
    want = float(packed["ms"]) / float(padded["ms"])
    assert float(padded["speedup_vs_cudnn"]) == pytest.approx(want, rel=0.01)


def test_a_failing_implementation_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(self, x):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench.CellLoopRunner, "run", broken)
    path = tmp_path / "r.csv"
    assert _bench(path) == 0
    rows = _rows(path)
    loop = [r for r in rows if r["impl"] == "cell-loop"]
    assert loop and all(r["status"] == "failed: RuntimeError: kernel exploded" for r in loop)
    assert all(r["ms"] == "" for r in loop)
    others = [r for r in rows if r["impl"] != "cell-loop"]
    assert len(others) == 12 and all(r["status"] == "ok" for r in others)
    strict = ["--shapes", "lstm-T8-B2-H16", "--backends", IMPLS, "--no-csv", "--strict"]
    assert bench.main(strict) == 1


def test_a_case_that_cannot_be_set_up_fails_its_rows_only(tmp_path, monkeypatch):
    original = bench.compute_reference

    def out_of_memory_for_gru(shape, base, inputs):
        if shape.cell == "gru":
            raise RuntimeError("CUDA out of memory (pretend)")
        return original(shape, base, inputs)

    monkeypatch.setattr(bench.harness, "compute_reference", out_of_memory_for_gru)
    path = tmp_path / "r.csv"
    shapes = "gru-T8-B2-H16,rnn_tanh-T8-B2-H16"
    assert bench.main(["--shapes", shapes, "--backends", IMPLS, "--csv", str(path)]) == 0
    rows = _rows(path)
    assert len(rows) == 12
    for r in rows:
        if r["cell"] == "gru":
            assert r["status"].startswith("failed: setting up the case: RuntimeError: CUDA out")
        else:
            assert r["status"] == "ok"


def test_a_fast_wrong_result_is_marked_wrong(tmp_path, monkeypatch):
    original = bench.CellLoopRunner.run

    def off(self, x):
        out, h, c = original(self, x)
        return out + 0.1, h, c

    monkeypatch.setattr(bench.CellLoopRunner, "run", off)
    path = tmp_path / "r.csv"
    assert bench.main(["--shapes", "lstm-T8-B2-H16", "--backends", IMPLS, "--csv", str(path)]) == 0
    for r in _rows(path):
        if r["impl"] == "cell-loop":
            assert r["status"].startswith("wrong: max_err"), r
            assert float(r["max_err"]) == pytest.approx(0.1, rel=0.01)
        else:
            assert r["status"] == "ok"


def test_shape_filters():
    assert {s.suite for s in bench.select_shapes("cells", ())} == {"cells"}
    assert len(bench.select_shapes("cells", ())) == 4
    (fastrnns,) = bench.select_shapes("lstm-T100-B64-H512", ())
    assert (fastrnns.suite, fastrnns.T, fastrnns.B) == ("fastrnns", 100, 64)
    assert fastrnns.input_size == fastrnns.H == 512
    both = bench.select_shapes("stack,lstm-T1024-B1-H768", ())
    assert [s.id for s in both] == ["lstm-T1024-B1-H768", "lstm-L2-bi-T512-B64-H512"]
    with pytest.raises(ValueError, match="unknown shapes"):
        bench.select_shapes("nope", ())


def test_shape_table_is_consistent():
    ids = [(s.suite, s.id) for s in bench.SHAPES]
    assert len(ids) == len(set(ids))
    known = {s.id for s in bench.SHAPES}
    assert all(shape_id in known for shape_id, _ in bench.QUICK)
    flashrnn = [s for s in bench.SHAPES if s.suite == "flashrnn"]
    assert sorted(s.B for s in flashrnn if s.H == 768) == [1, 4, 16, 64, 256]
    (varlen,) = [s for s in bench.SHAPES if s.suite == "varlen" and s.varlen == "packed"]
    lengths = varlen.lengths()
    assert lengths.min() >= varlen.T // 4 and lengths.max() == varlen.T
    assert (lengths == varlen.lengths()).all(), "the same lengths on every run"


def test_flops_count_input_and_recurrent_gemms():
    (shape,) = bench.select_shapes("fastrnns", ())
    per_step = 2 * shape.B * 4 * shape.H * (shape.input_size + shape.H)
    assert bench.flops(shape, "fwd") == shape.T * per_step
    assert bench.flops(shape, "fwdbwd") == 3 * shape.T * per_step
    (stack,) = bench.select_shapes("stack", ())
    layer0 = 2 * 2 * stack.T * stack.B * 4 * stack.H * (stack.input_size + stack.H)
    layer1 = 2 * 2 * stack.T * stack.B * 4 * stack.H * (2 * stack.H + stack.H)
    assert bench.flops(stack, "fwd") == layer0 + layer1


def _args(**kw):
    defaults = dict(shapes=None, dtypes=None, quick=False)
    return argparse.Namespace(**{**defaults, **kw})


def test_plan_defaults_and_dtype_filter():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cases, notes = bench.plan(_args(), cpu)
    assert {s.suite for s, _ in cases} == {"smoke"} and {d for _, d in cases} == {"fp32"}
    assert "smoke suite" in notes[0]
    cases, _ = bench.plan(_args(quick=True), cuda)
    assert [(s.id, d) for s, d in cases] == bench.QUICK
    cases, _ = bench.plan(_args(quick=True, dtypes="fp16"), cuda)
    assert [(s.id, d) for s, d in cases] == [("lstm-T1024-B16-H768", "fp16")]
    cases, _ = bench.plan(_args(dtypes="bf16,fp32"), cuda)
    assert {s.suite for s, _ in cases} == set(bench.SUITES) - {"smoke"}
    assert len(cases) == 2 * sum(s.suite != "smoke" for s in bench.SHAPES)
    with pytest.raises(ValueError, match="unknown dtypes"):
        bench.plan(_args(dtypes="fp8"), cpu)


def test_bad_arguments_exit_2(tmp_path):
    assert bench.main(["--dtypes", "fp8", "--no-csv"]) == 2
    assert bench.main(["--backends", "nope", "--no-csv"]) == 2
    assert bench.main(["--shapes", "nope", "--no-csv"]) == 2


def test_backend_filter_and_no_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--shapes", "gru-T8-B2-H16", "--backends", "cudnn", "--modes", "fwd", "--no-csv"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "[1/1] smoke/gru-T8-B2-H16 fp32 torch.nn fwd" in out  # "cudnn" is torch.nn on CPU
    assert "1 rows, 0 not ok" in out
    assert not list(tmp_path.iterdir())


def test_append_keeps_old_rows_when_columns_change(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("run_id,ms,old_column\nold,1.5,x\n")
    bench.append_rows(path, [{"run_id": "new", "ms": "2"}])
    rows = _rows(path)
    assert [r["run_id"] for r in rows] == ["old", "new"]
    assert rows[0]["old_column"] == "x" and rows[1]["old_column"] == ""
    assert set(bench.FIELDS) <= set(rows[0])
    bench.append_rows(path, [{"run_id": "third"}])
    assert [r["run_id"] for r in _rows(path)] == ["old", "new", "third"]


def test_plot_writes_pngs_from_cpu_rows(smoke_csv, tmp_path, capsys):
    out = tmp_path / "plots"
    assert plot.main(["--csv", str(smoke_csv), "--out", str(out)]) == 0
    for name in ("speedup_vs_batch.png", "speedup_vs_hidden.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped memory.png" in capsys.readouterr().out  # no CUDA, no peak memory

    rows = _rows(smoke_csv)
    for r in rows:  # as a CUDA run would have them
        r["peak_mem_mb"] = "12.5" if r["mode"] == "fwdbwd" else ""
    with_memory = tmp_path / "with_memory.csv"
    with with_memory.open("w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    assert plot.main(["--csv", str(with_memory), "--out", str(out)]) == 0
    assert (out / "memory.png").stat().st_size > 0


def test_plot_uses_the_latest_run_per_card():
    rows = [
        {"card": "A", "date": "2026-01-01T00:00:00Z", "run_id": "1"},
        {"card": "A", "date": "2026-02-01T00:00:00Z", "run_id": "2"},
        {"card": "B", "date": "2026-01-15T00:00:00Z", "run_id": "3"},
    ]
    latest = plot.latest_runs(rows)
    assert {card: [r["run_id"] for r in rs] for card, rs in latest.items()} == {
        "A": ["2"],
        "B": ["3"],
    }


def test_readme_table_is_regenerated_between_markers(smoke_csv, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{plot.START}\nstale table\n{plot.END}\nafter\n")
    out = tmp_path / "benchmarks" / "plots"
    args = ["--csv", str(smoke_csv), "--out", str(out), "--readme", str(readme)]
    assert plot.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{plot.END}\nafter\n")
    assert "stale table" not in text
    row = _rows(smoke_csv)[0]
    assert f"**{row['card']}**" in text and f"measured {row['date'][:10]}" in text
    assert "| lstm-T8-B2-H16 | fp32 | gpurnn-torch *auto* |" in text  # CPU: auto is torch
    assert "](benchmarks/plots/speedup_vs_batch.png)" in text
    assert plot.main(args) == 0 and readme.read_text() == text  # idempotent

    readme.write_text("# no markers\n")
    assert plot.main(args) == 1


def _cuda_row(run_id, date, shape_B, impl, mode, ms, speedup, status="ok", dtype="bf16"):
    return {
        "run_id": run_id, "date": date, "commit": "abc1234", "device": "cuda", "card": "H100",
        "driver": "580", "torch": "2.11", "triton": "3.6", "cudnn": "91900", "cuda": "13.0",
        "gpurnn": "0.1.0", "suite": "flashrnn", "shape": f"lstm-T1024-B{shape_B}-H768",
        "cell": "lstm", "T": "1024", "B": str(shape_B), "H": "768", "input_size": "768",
        "layers": "1", "bidirectional": "0", "varlen": "", "dtype": dtype, "impl": impl,
        "mode": mode, "status": status, "ms": str(ms), "speedup_vs_cudnn": str(speedup),
        "max_err": "3e-03",
    }  # fmt: skip


def test_readme_table_says_where_gpurnn_wins_and_where_auto_runs_cudnn(tmp_path):
    rows = []
    for mode in ("fwd", "fwdbwd"):
        # an older run at B=64 where triton was faster is superseded by the newer one
        rows += [
            _cuda_row("old", "2026-11-26T00:00:00Z", 64, "cudnn", mode, 20, 1),
            _cuda_row("old", "2026-11-26T00:00:00Z", 64, "gpurnn-triton", mode, 10, 2),
            _cuda_row("new", "2026-11-27T00:00:00Z", 16, "cudnn", mode, 40, 1),
            _cuda_row("new", "2026-11-27T00:00:00Z", 16, "gpurnn-triton", mode, 25, 1.6),
            _cuda_row("new", "2026-11-27T00:00:00Z", 64, "cudnn", mode, 20, 1),
            _cuda_row("new", "2026-11-27T00:00:00Z", 64, "gpurnn-triton", mode, 40, 0.5),
        ]
    text = plot.markdown_table(rows, None, tmp_path)
    assert "**H100** (cuda), measured 2026-11-27, commit `abc1234`" in text
    assert "| lstm-T1024-B16-H768 | bf16 | gpurnn-triton *auto* | 25 | 1.6 | 25 | 1.6 |" in text
    assert "| lstm-T1024-B64-H768 | bf16 | cudnn *auto* | 20 | 1 | 20 | 1 |" in text
    assert "| lstm-T1024-B64-H768 | bf16 | gpurnn-triton | 40 | 0.5 |" in text
    assert "| 10 |" not in text  # only the latest run of each case
    assert "faster than cuDNN in training (fwd+bwd) at: lstm-T1024-B16-H768 bf16 (gpurnn-" in text
    assert "cuDNN is still faster at: lstm-T1024-B64-H768 bf16 (gpurnn-triton 0.5×)" in text
    # a backend whose GPU tests failed on the card is not what auto runs
    failed = [{"date": "2026-11-27", "card": "H100", "backend": "triton", "status": "failed"}]
    text = plot.markdown_table(rows, None, tmp_path, failed)
    assert "| lstm-T1024-B16-H768 | bf16 | cudnn *auto* |" in text
    assert "gpurnn is faster" not in text


def _git(cwd, *args):
    import subprocess

    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def _repo(path):
    path.mkdir(parents=True)
    _git(path, "init", "-q")
    (path / "f.txt").write_text("one\n")
    _git(path, "add", "f.txt")
    _git(path, "commit", "-q", "-m", "first")
    return _git(path, "rev-parse", "--short", "HEAD")


def test_commit_is_the_packages_own_checkout_or_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("GPURNN_COMMIT", raising=False)
    # the package's parent is the top of a repository: that repository's commit
    own = tmp_path / "project"
    head = _repo(own)
    assert bench.project_commit(own) == head
    (own / "f.txt").write_text("changed\n")
    assert bench.project_commit(own) == head + "+dirty"
    # a copy of the package inside some other repository (a vendored folder, a home
    # directory under git): not that repository's commit
    outer = tmp_path / "outer"
    _repo(outer)
    vendored = outer / "vendor" / "project"
    vendored.mkdir(parents=True)
    assert bench.project_commit(vendored) == "unknown"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert bench.project_commit(plain) == "unknown"
    # and that is what a run records
    monkeypatch.setattr(bench.results, "REPO_ROOT", vendored)
    meta = bench.run_metadata(torch.device("cpu"))
    assert meta["commit"] == "unknown" and meta["run_id"].endswith("-unknown")
    monkeypatch.setattr(bench.results, "REPO_ROOT", own)
    assert bench.run_metadata(torch.device("cpu"))["commit"] == head + "+dirty"
    # a copied tree without .git (the GPU machines get one) is told its commit
    monkeypatch.setenv("GPURNN_COMMIT", "abc1234")
    assert bench.project_commit(plain) == "abc1234"
    monkeypatch.setattr(bench.results, "REPO_ROOT", plain)
    assert bench.run_metadata(torch.device("cpu"))["commit"] == "abc1234"


def test_device_check_dry_run(tmp_path):
    """benchmarks/device_check.sh with DRY_RUN=1 on this CPU machine: every stage with
    tiny cases, a stand-in nvidia-smi on PATH, and one test file that fails to collect.
    Checks the script itself (order, a budget that fits the total, every stage bounded,
    progress lines, the commit it is given, what lands in $OUT, a harness failure recorded
    as incomplete and not as failed), not the GPU."""
    import os
    import re
    import stat
    import subprocess
    import sys

    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "stand-in nvidia-smi $*"\n')
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    broken = tmp_path / "test_broken_gpu.py"
    broken.write_text("import pytest\npytestmark = pytest.mark.gpu\ndef test_x(:\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env = {k: v for k, v in env.items() if not k.endswith("_LIMIT")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=sys.executable, OUT=str(out),
        DRY_RUN="1", GPURNN_COMMIT="abc1234",
        TRITON_TESTS=f"tests/test_triton_gpu.py {broken}",
    )  # fmt: skip
    script = bench.REPO_ROOT / "benchmarks" / "device_check.sh"
    done = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    log = done.stdout
    stage_lines = "\n".join(line for line in log.splitlines() if line.startswith("=="))
    # the broken file fails the triton stage (and the run), and nothing else
    assert "device check: FAILED stages: triton tests(1) (" in log, f"{stage_lines}\n{log[-2000:]}"
    assert done.returncode == 1, done.stderr[-2000:]
    assert "stand-in nvidia-smi" in log and "commit abc1234" in log.splitlines()[0]
    # most important first, and the limits add up to at most the total
    starts = re.findall(r"^== (.+?) \(limit (\d+)s, at (\d+)s\)$", log, re.M)
    assert [name for name, _, _ in starts] == [
        "header", "smoke", "l2 ping-pong", "warm-up", "step timing", "bench", "triton tests",
        "record triton", "cupy tests", "record cupy", "k-split tests", "record cupy-ksplit",
        "plot",
    ]  # fmt: skip
    budget = re.search(r"^== budget: (.*) = (\d+)s of (\d+)s$", log, re.M)
    planned = dict(re.findall(r"([a-z][a-z0-9 -]*?) (\d+)(?: \+|$)", budget.group(1)))
    assert int(budget.group(2)) == sum(map(int, planned.values())) <= int(budget.group(3))
    for name, limit, _ in starts:  # every stage under a limit within its budget
        assert 0 < int(limit) <= int(planned[name]), (name, limit, planned)
    # a line per case as it finishes, in every stage
    assert "test_exchange_kinds[polled] SKIPPED" in log  # smoke, pytest -v
    assert "warm-up: no GPU here, nothing to compile" in log
    assert "test_real_size_vs_reference[lstm-bfloat16] SKIPPED" in log  # triton tests
    assert "[1/1] lstm-fp32-H16-B2" in log  # step timing
    assert "[1/4] smoke/lstm-T8-B2-H16 fp32 torch.nn fwd" in log  # bench
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8
    assert {"device_check.log", "gpu_tests.csv", "results.csv", "step_timing.jsonl"} <= set(files)
    assert (out / "device_check.log").read_text() == log
    records = _rows(out / "gpu_tests.csv")
    # no GPU: the cupy tests were all skipped (which clears and condemns nothing); the triton
    # stage lost a file to a collection error: incomplete, with why, never "failed"
    assert [(r["backend"], r["status"]) for r in records] == [
        ("triton", "incomplete"), ("cupy", "skipped"), ("cupy-ksplit", "skipped")
    ]  # fmt: skip
    assert "collect" in records[0]["note"]
    assert {r["commit"] for r in records} == {"abc1234"}
    rows = _rows(out / "results.csv")
    assert {r["commit"] for r in rows} == {"abc1234"}
    assert [r["impl"] for r in rows if r["suite"] == "kernel"] == ["triton-kernel"] * 2
    assert [r["impl"] for r in rows if r["suite"] != "kernel"] == ["torch.nn"] * 2 + [
        "gpurnn-torch"
    ] * 2
