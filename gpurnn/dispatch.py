"""Which backend `auto` runs per shape on CUDA: a small measured table kept in the package.

The candidates are the GPU kernels (`triton`, `cupy`) and `torch`, which on CUDA runs
torch.nn's own layer functions (cuDNN): a shape where cuDNN measured faster goes to
cuDNN. `auto` ranks the candidates by the table for the case's cell, dtype and size
bucket (training time, forward + backward of a whole layer) and runs the first one that
can run the case; without an entry it keeps its default order (triton first). `torch`
counts only where it means cuDNN, in layers run eagerly: cells, the functional
`gpurnn.recurrence` and torch.compile would run it as a time loop, and take the fastest
kernel of the ranking instead. The table
is `gpurnn/dispatch.json`, regenerated from benchmark rows after every GPU run:

    bash benchmarks/device_check.sh             # on the GPU machine, into $OUT
    tail -n +2 $OUT/results.csv >> benchmarks/results.csv
    tail -n +2 $OUT/gpu_tests.csv >> benchmarks/gpu_tests.csv
    python -m gpurnn dispatch --write

How the table is built:
- for each card and case (cell, dtype, T, B, H; single layer, dense), the latest run that
  measured it, its fwd+bwd rows; bench's `cudnn` and `gpurnn-torch` rows both stand for
  the `torch` backend;
- within that run, each backend's time divided by the fastest correct one's (times from
  different runs are never compared: they drift by tens of percent on one card);
- per bucket, the candidates ranked by the geometric mean of those ratios. A candidate
  with a wrong or failed row anywhere in the bucket is left out of it;
- a backend whose GPU tests failed on a card (its latest conclusive entry in
  `benchmarks/gpu_tests.csv`, written by the device check) wins nothing on that card, and
  `auto` never runs it there. On a card without test entries, a backend that failed on
  any card is left out.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("dispatch.json")
CANDIDATES = ("triton", "cupy", "torch")
# bench implementation name -> the backend `auto` would run for it
IMPL_BACKENDS = {
    "gpurnn-triton": "triton",
    "gpurnn-cupy": "cupy",
    "gpurnn-torch": "torch",
    "cudnn": "torch",
}

# upper edges; a size above the last falls in the last bucket
HIDDEN_BUCKETS = (256, 512, 1024, 2048)
BATCH_BUCKETS = (8, 16, 64, 256)

# the record of GPU test runs: one row per backend and run of its GPU tests
TEST_FIELDS = ("date", "card", "commit", "backend", "status", "passed", "failed", "note")
# statuses that say something about correctness; "incomplete" (cut at its time limit with
# no failure seen) and "skipped" (nothing ran) neither clear nor condemn a backend
CONCLUSIVE = ("passed", "failed")


def _bucket(value: int, edges: tuple[int, ...]) -> str:
    for edge in edges:
        if value <= edge:
            return f"<={edge}"
    return f">{edges[-1]}"


def key(cell: str, dtype: str, hidden_size: int, batch_size: int | None) -> str:
    """Table key; a batch size unknown at dispatch time (torch.compile with dynamic shapes)
    uses the "any" bucket, the ranking over all batch sizes measured at that hidden size."""
    batch = "any" if batch_size is None else _bucket(batch_size, BATCH_BUCKETS)
    return f"{cell}/{dtype}/H{_bucket(hidden_size, HIDDEN_BUCKETS)}/B{batch}"


# ----------------------------------------------------------------------------- at run time


@functools.lru_cache(maxsize=1)
def load_table() -> dict:
    """The table (read once; `load_table.cache_clear()` after rewriting it)."""
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())


@functools.lru_cache(maxsize=8)
def _device_name(index: int | None) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def card_name(device) -> str | None:
    """The CUDA card's name as bench records it, or None where CUDA is not available."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return None
    return _device_name(torch.cuda.current_device() if device.index is None else device.index)


def _ranking(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def preferred(
    cell: str, dtype, hidden_size: int | None, batch_size: int | None, card: str | None = None
) -> tuple[str, ...]:
    """The measured candidates for this case, fastest first (empty when not measured):
    the card's own measurements where it has them, else those of every card."""
    if hidden_size is None:
        return ()
    dtype_name = str(dtype).replace("torch.", "")
    k = key(cell, dtype_name, hidden_size, batch_size)
    table = load_table()
    own = table.get("by_card", {}).get(card, {})
    if k in own:
        return _ranking(own[k])
    return _ranking(table.get("choices", {}).get(k, ()))


def failed_gpu_tests(card: str | None) -> frozenset[str]:
    """Backends `auto` must not run on this card: their GPU tests failed on it (on a card
    without test records, failed on any card)."""
    failed = load_table().get("failed_gpu_tests", {})
    if card in failed:
        return frozenset(failed[card])
    return frozenset(b for backends in failed.values() for b in backends)


def gpu_tests_passed(name: str, card: str | None) -> bool:
    """Whether the GPU tests recorded under `name` (a backend, or a variant of one such as
    "cupy-ksplit") passed on this card at their latest conclusive run there."""
    return name in load_table().get("passed_gpu_tests", {}).get(card, ())


# ----------------------------------------------------------------------------- building


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _latest_conclusive(records: Iterable[dict]) -> dict[tuple[str, str], str]:
    """(card, backend) -> status of its latest conclusive GPU test record."""
    latest: dict[tuple[str, str], tuple[str, str]] = {}
    for r in records:
        if r.get("status") not in CONCLUSIVE:
            continue
        k = (r["card"], r["backend"])
        if r["date"] >= latest.get(k, ("", ""))[0]:
            latest[k] = (r["date"], r["status"])
    return {k: status for k, (_, status) in latest.items()}


def failed_by_card(records: Iterable[dict]) -> dict[str, set[str]]:
    """card -> backends whose latest conclusive GPU test record on that card failed
    (every card with a conclusive record is a key, with an empty set if nothing failed)."""
    failed: dict[str, set[str]] = {}
    for (card, backend), status in _latest_conclusive(records).items():
        failed.setdefault(card, set())
        if status == "failed":
            failed[card].add(backend)
    return failed


def passed_by_card(records: Iterable[dict]) -> dict[str, set[str]]:
    """card -> backends (or variants) whose latest conclusive GPU test record there passed."""
    passed: dict[str, set[str]] = {}
    for (card, backend), status in _latest_conclusive(records).items():
        if status == "passed":
            passed.setdefault(card, set()).add(backend)
    return passed


def _cases(rows: Iterable[dict]) -> dict[tuple, tuple[dict[str, float], set[str]]]:
    """(card, cell, dtype, T, B, H) -> ({backend: ms of its correct rows}, {backends with a
    wrong or failed row}), from the latest run that measured the case on that card."""
    measured: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in rows:
        if (
            r.get("mode") != "fwdbwd"
            or r.get("device", "cuda") != "cuda"
            or r.get("impl") not in IMPL_BACKENDS
            or r.get("layers") != "1"
            or r.get("bidirectional") != "0"
            or r.get("varlen")
        ):
            continue
        dtype = _DTYPE_NAMES.get(r["dtype"], r["dtype"])
        case = (r["card"], r["cell"], dtype, int(r["T"]), int(r["B"]), int(r["H"]))
        run = (r.get("date", ""), r["run_id"])
        measured.setdefault(case, {}).setdefault(run, []).append(r)
    cases = {}
    for case, runs in measured.items():
        latest = runs[max(runs)]
        times: dict[str, list[float]] = {}
        bad = set()
        for r in latest:
            backend = IMPL_BACKENDS[r["impl"]]
            if r["status"] == "ok" and r.get("ms"):
                times.setdefault(backend, []).append(float(r["ms"]))
            else:
                bad.add(backend)
        ok = {b: sum(t) / len(t) for b, t in times.items() if b not in bad}
        if len(ok) + len(bad) >= 2 and ok:  # something to choose between
            cases[case] = (ok, bad)
    return cases


def _rank(cases: list[tuple[dict[str, float], set[str]]], excluded: set[str]) -> list[str]:
    """Candidates fastest first by the geometric mean of time / fastest time per case."""
    bad = set(excluded).union(*(b for _, b in cases))
    logs: dict[str, list[float]] = {}
    for ok, _ in cases:
        allowed = {b: ms for b, ms in ok.items() if b not in bad}
        if not allowed:
            continue
        fastest = min(allowed.values())
        for b, ms in allowed.items():
            logs.setdefault(b, []).append(math.log(ms / fastest))
    score = {b: sum(v) / len(v) for b, v in logs.items()}
    return sorted(score, key=lambda b: (score[b], CANDIDATES.index(b)))


def _table(cases: dict[tuple, tuple], excluded: set[str]) -> dict[str, list[str]]:
    buckets: dict[str, list[tuple]] = {}
    for (_card, cell, dtype, _T, B, H), result in cases.items():
        for k in (key(cell, dtype, H, B), key(cell, dtype, H, None)):
            buckets.setdefault(k, []).append(result)
    table = {}
    for k, results in sorted(buckets.items()):
        ranking = _rank(results, excluded)
        if ranking:
            table[k] = ranking
    return table


def build(rows: Iterable[dict], test_records: Iterable[dict] = ()) -> dict:
    """The table from benchmark CSV rows (bench.FIELDS) and GPU test records
    (TEST_FIELDS): "choices" over every card, "by_card", "failed_gpu_tests" and
    "passed_gpu_tests"."""
    test_records = list(test_records)
    failed = failed_by_card(test_records)
    cases = _cases(rows)
    cards = sorted({case[0] for case in cases})
    by_card = {card: {} for card in cards}
    for card in cards:
        own = {c: r for c, r in cases.items() if c[0] == card}
        by_card[card] = _table(own, failed.get(card, set()))
    anywhere = set().union(*failed.values()) if failed else set()
    return {
        "choices": _table(cases, anywhere),
        "by_card": by_card,
        "failed_gpu_tests": {card: sorted(b) for card, b in sorted(failed.items())},
        "passed_gpu_tests": {
            card: sorted(b) for card, b in sorted(passed_by_card(test_records).items())
        },
    }


# ----------------------------------------------------------------------------- GPU test records

_PYTEST_LINE = re.compile(
    r"^(?:(?P<id>\S+::\S+) (?P<outcome>PASSED|FAILED|ERROR)\b"
    r"|(?P<outcome2>PASSED|FAILED|ERROR) (?P<id2>\S+::\S+))"
)


def pytest_outcomes(log_text: str) -> tuple[set[str], set[str]]:
    """(passed, failed) test ids in pytest `-v` / `-rA` output (an ERROR counts as failed),
    as far as the log got: a run stopped at its time limit still says what finished."""
    passed, failed = set(), set()
    for line in log_text.splitlines():
        m = _PYTEST_LINE.match(line.strip())
        if not m:
            continue
        test = m["id"] or m["id2"]
        (passed if (m["outcome"] or m["outcome2"]) == "PASSED" else failed).add(test)
    return passed - failed, failed


_COLLECT_ERROR = re.compile(r"ERROR collecting (\S+)")


def harness_errors(log_text: str, exit_status: int) -> list[str]:
    """Why a pytest run said nothing about the kernels, where it did not: files that failed
    to collect (an import or syntax error), pytest's own errors (exit 2 interrupted, 3
    internal error, 4 usage error), a stop at the time limit. A backend is never condemned
    for these: its record says incomplete, with the reason."""
    why = [f"collection error in {f}" for f in dict.fromkeys(_COLLECT_ERROR.findall(log_text))]
    if exit_status in (124, 137):  # `timeout`'s exit statuses
        why.append("stopped at its time limit")
    elif exit_status in (2, 3, 4):
        why.append({2: "interrupted", 3: "pytest internal error", 4: "pytest usage error"}[
            exit_status] + f" (exit {exit_status})")  # fmt: skip
    return why


def run_status(exit_status: int, passed: set[str], failed: set[str], harness=()) -> str:
    """passed / failed (a test failed) / incomplete (stopped, or a harness error before a
    test could say anything: `harness_errors`) / skipped (nothing ran)."""
    if failed:
        return "failed"
    if harness or exit_status in (2, 3, 4, 124, 137):
        return "incomplete"
    if exit_status == 5 or (exit_status == 0 and not passed):
        return "skipped"  # nothing ran: no CUDA, or the backend is not installed
    return "passed" if exit_status == 0 else "failed"


def record_gpu_tests(backend: str, log_path: Path, exit_status: int, out: Path) -> dict:
    """Appends one record of a GPU test run (parsed from its pytest log) to `out`."""
    import datetime

    import torch

    from gpurnn import bench

    log_text = Path(log_path).read_text(errors="replace")
    passed, failed = pytest_outcomes(log_text)
    harness = harness_errors(log_text, exit_status)
    status = run_status(exit_status, passed, failed, harness)
    on_cuda = torch.cuda.is_available()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    note = f"pytest exit {exit_status}"
    if harness:
        note += "; " + "; ".join(harness)[:300]
    if failed:
        note += "; failed: " + " ".join(sorted(t.split("::")[-1] for t in failed))[:300]
    record = {
        "date": now.isoformat().replace("+00:00", "Z"),
        "card": torch.cuda.get_device_name() if on_cuda else bench.cpu_name(),
        "commit": bench.project_commit(),
        "backend": backend,
        "status": status,
        "passed": len(passed),
        "failed": len(failed),
        "note": note,
    }
    out = Path(out)
    new = not out.exists() or out.stat().st_size == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, TEST_FIELDS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(record)
    return record


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpurnn dispatch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", default="benchmarks/results.csv", help="benchmark rows")
    parser.add_argument(
        "--gpu-tests",
        default="benchmarks/gpu_tests.csv",
        help="record of GPU test runs per card and backend (default: %(default)s)",
    )
    parser.add_argument(
        "--write", action="store_true", help=f"write the table to {TABLE_PATH.name} (else print it)"
    )
    parser.add_argument(
        "--record-gpu-tests",
        metavar="BACKEND",
        help="instead: append this backend's GPU test outcome (from --pytest-log and "
        "--exit-status) to the --gpu-tests file",
    )
    parser.add_argument("--pytest-log", help="pytest -v output of the GPU tests")
    parser.add_argument("--exit-status", type=int, help="pytest's (or timeout's) exit status")


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run(args) -> int:
    tests_path = Path(args.gpu_tests)
    if args.record_gpu_tests:
        if args.pytest_log is None or args.exit_status is None:
            print("gpurnn dispatch: --record-gpu-tests needs --pytest-log and --exit-status")
            return 2
        r = record_gpu_tests(
            args.record_gpu_tests, Path(args.pytest_log), args.exit_status, tests_path
        )
        print(
            f"GPU tests of {r['backend']} on {r['card']}: {r['status']} "
            f"({r['passed']} passed, {r['failed']} failed) -> {tests_path}"
        )
        return 0
    path = Path(args.csv)
    if not path.exists():
        print(f"no benchmark rows at {path}: run python -m gpurnn bench on a GPU first")
        return 2
    table = build(_read_csv(path), _read_csv(tests_path))
    if not table["choices"]:
        print("no measured case has two candidates to choose between: nothing to write")
        return 1
    source = {"source": str(path), "gpu_tests": str(tests_path)}
    text = json.dumps({**source, **table}, indent=1, sort_keys=True)
    if args.write:
        TABLE_PATH.write_text(text + "\n")
        load_table.cache_clear()
        print(f"wrote {len(table['choices'])} buckets to {TABLE_PATH}")
    else:
        print(text)
    return 0
