"""Building `auto`'s dispatch table (gpurnn/dispatch.json, read by gpurnn.dispatch) from
benchmark rows and GPU test records, and the `python -m gpurnn dispatch` command that
writes it or records a GPU test run. After every GPU run:

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
import json
import math
from collections.abc import Iterable
from pathlib import Path

from gpurnn import dispatch
from gpurnn.arguments import UsageError, names, run_command
from gpurnn.bench.gpu_tests import (
    failed_by_card,
    passed_by_card,
    read_records,
    record_gpu_tests,
)
from gpurnn.bench.results import DEFAULT_CSV, REPO_ROOT
from gpurnn.dispatch import CANDIDATES, key

DEFAULT_GPU_TESTS = REPO_ROOT / "benchmarks" / "gpu_tests.csv"
# bench implementation name -> the backend `auto` would run for it
IMPL_BACKENDS = {
    "gpurnn-triton": "triton",
    "gpurnn-cupy": "cupy",
    "gpurnn-torch": "torch",
    "cudnn": "torch",
}
# bench's dtype names -> torch's, as the table's keys spell them
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
        dtype = DTYPE_NAMES.get(r["dtype"], r["dtype"])
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
    (gpu_tests.FIELDS): "choices" over every card, "by_card", "failed_gpu_tests" and
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


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="benchmark rows")
    parser.add_argument(
        "--gpu-tests",
        default=str(DEFAULT_GPU_TESTS),
        help="record of GPU test runs per card and backend",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help=f"write the table to gpurnn/{dispatch.TABLE_PATH.name} (else print it)",
    )
    parser.add_argument(
        "--record-gpu-tests",
        metavar="BACKEND",
        type=_tested_name,
        help="instead: append this backend's GPU test outcome (from --pytest-log and "
        f"--exit-status) to the --gpu-tests file; one of {', '.join(CANDIDATES)}, or a "
        "variant of one recorded apart (e.g. cupy-ksplit)",
    )
    parser.add_argument("--pytest-log", help="pytest -v -rA output of the GPU tests")
    parser.add_argument("--exit-status", type=int, help="pytest's (or timeout's) exit status")
    parser.add_argument(
        "--reason",
        default="",
        help="with --record-gpu-tests: how the run ended, in the caller's words (e.g. "
        "'skipped: the total limit was spent'), recorded beside what the log shows",
    )


def _tested_name(text: str) -> str:
    """A backend (any case), or a variant of one that its GPU tests record apart: the
    backend's name, a dash, the variant's (cupy-ksplit)."""
    backend, dash, variant = text.strip().lower().partition("-")
    backend = names(CANDIDATES, "backend")(backend)[0]
    if dash and not variant.replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"{text!r}: a variant is backend-name, e.g. cupy-ksplit")
    return backend + dash + variant


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run(args) -> int:
    tests_path = Path(args.gpu_tests)
    if args.record_gpu_tests:
        if args.pytest_log is None or args.exit_status is None:
            raise UsageError("--record-gpu-tests needs --pytest-log and --exit-status")
        if not Path(args.pytest_log).is_file():
            raise UsageError(f"--pytest-log {args.pytest_log}: no such file")
        r = record_gpu_tests(
            args.record_gpu_tests, Path(args.pytest_log), args.exit_status, tests_path, args.reason
        )
        print(
            f"GPU tests of {r['backend']} on {r['card']}: {r['status']} "
            f"({r['passed']} passed, {r['failed']} failed"
            + (f"; {r['reason']}" if r["reason"] else "")
            + f") -> {tests_path}"
        )
        return 0
    path = Path(args.csv)
    if not path.is_file():
        raise UsageError(f"no benchmark rows at {path}: run python -m gpurnn bench on a GPU first")
    table = build(_read_csv(path), read_records(tests_path))
    if not table["choices"]:
        print("no measured case has two candidates to choose between: nothing to write")
        return 1
    source = {"source": _shown(path), "gpu_tests": _shown(tests_path)}
    text = json.dumps({**source, **table}, indent=1, sort_keys=True)
    if args.write:
        dispatch.TABLE_PATH.write_text(text + "\n")
        dispatch.load_table.cache_clear()
        print(f"wrote {len(table['choices'])} buckets to {dispatch.TABLE_PATH}")
    else:
        print(text)
    return 0


def _shown(path: Path) -> str:
    """A path as the table records it: relative to the checkout when inside it."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    return run_command("python -m gpurnn dispatch", __doc__, add_arguments, run, argv)
