"""`python -m gpurnn bench`: gpurnn's backends against cuDNN, a Python loop of torch.nn cells
and FlashRNN, timed in one process on the same inputs.

Method (see benchmarks/README.md for the columns):
- Full layers on every side: the input projection is inside every timing.
- CUDA: device events around each run, the L2 cache flushed (a 256 MB buffer zeroed)
  before each, the median over many runs after warm-up, several sets of fresh random
  inputs used in turn. CPU: perf_counter, median, no flush.
- "fwd" is inference (torch.no_grad); "fwdbwd" is a training step: forward, then backward
  from a random upstream gradient into the input and every parameter.
- Beside each timing, the error against torch.nn run in float32 (TF32 off) on the same
  inputs upcast; a row whose error exceeds its dtype's tolerance says "wrong", so a fast
  wrong kernel never reads as a win.
- A failure in one implementation is recorded in its rows ("failed: <error>") and the run
  goes on.

Shapes live in one declarative table (SHAPES); each row's shape id is derived from its
parameters, so rows stay comparable across runs as long as the parameters do.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from gpurnn.arguments import UsageError, device, names, run_command
from gpurnn.bench.harness import Progress, run_cases
from gpurnn.bench.results import DEFAULT_CSV, run_metadata, scratch_csv, summary_table
from gpurnn.bench.runners import IMPLEMENTATION_NAMES, implementations
from gpurnn.bench.shapes import DTYPES, MODES, QUICK, SHAPES, SUITES, Shape, select_shapes
from gpurnn.bench.timing import BUDGETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the target shapes (docs/design.md) with fewer repeats (~2 min on a GPU)",
    )
    parser.add_argument(
        "--shapes",
        help="comma-separated suites ("
        + ",".join(SUITES)
        + ") or shape ids (default: all GPU suites; smoke on CPU)",
    )
    parser.add_argument(
        "--dtypes",
        type=names(DTYPES, "dtype"),
        help="comma-separated, of " + ",".join(DTYPES) + " (default: all on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--backends",
        type=names(IMPLEMENTATION_NAMES, "implementation"),
        help="comma-separated implementations, of "
        + ",".join(IMPLEMENTATION_NAMES)
        + " (cudnn and torch.nn both name torch.nn's layer; default: all that run here)",
    )
    parser.add_argument(
        "--modes",
        type=names(MODES, "mode"),
        default=list(MODES),
        help="comma-separated, of fwd,fwdbwd (default: both)",
    )
    parser.add_argument(
        "--device", type=device, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)"
    )
    parser.add_argument(
        "--csv",
        help=f"results file the rows are appended to (default: {DEFAULT_CSV} for a GPU run; "
        f"a CPU or smoke run's rows go to {scratch_csv()}, never into the tracked results)",
    )
    parser.add_argument("--no-csv", action="store_true", help="append no rows anywhere")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when any row failed or was wrong"
    )


def rows_file(args, device: torch.device, cases: list[tuple[Shape, str]]) -> Path | None:
    """Where the rows go: --csv if given; the tracked history only for a GPU run of real
    shapes; a CPU or smoke run's rows to the scratch file."""
    if args.no_csv:
        return None
    if args.csv:
        return Path(args.csv)
    smoke = all(shape.suite == "smoke" for shape, _ in cases)
    return scratch_csv() if device.type != "cuda" or smoke else DEFAULT_CSV


def plan(args, device: torch.device) -> tuple[list[tuple[Shape, str]], list[str]]:
    """The (shape, dtype) cases the arguments select, and lines to print about the choice."""
    notes = []
    dtypes = args.dtypes or (list(DTYPES) if device.type == "cuda" else ["fp32"])
    if args.shapes:
        return [(s, d) for s in select_shapes(args.shapes, ()) for d in dtypes], notes
    if device.type != "cuda":
        notes.append(
            "no CUDA device: running the smoke suite (tiny shapes); the GPU shapes "
            "would take hours on CPU (pass --shapes to insist)"
        )
        return [(s, d) for s in select_shapes("smoke", ()) for d in dtypes], notes
    if args.quick:
        by_id = {s.id: s for s in SHAPES}
        wanted = set(dtypes) if args.dtypes else set(DTYPES)
        return [(by_id[i], d) for i, d in QUICK if d in wanted], notes
    suites = [s for s in SUITES if s != "smoke"]
    return [(s, d) for s in select_shapes(None, suites) for d in dtypes], notes


def run(args) -> int:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    requested = args.backends
    # (without CUDA, gpurnn-triton runs only under the interpreter, which `python -m gpurnn
    # bench` switches on by running itself again: TRITON_INTERPRET must be set before
    # triton is first imported, and importing torch's compiler imports it)
    try:
        cases, notes = plan(args, device)
        impls, impl_notes = implementations(device, requested, args.quick)
    except ValueError as e:
        raise UsageError(str(e)) from None
    modes = args.modes
    meta = run_metadata(device)
    csv_path = rows_file(args, device, cases)
    budget = BUDGETS["cpu" if device.type != "cuda" else "quick" if args.quick else "full"]
    total = sum(len(modes) for shape, _ in cases for i in impls if i.applies(shape))
    print(
        f"gpurnn bench on {meta['card']} ({meta['device']}), torch {meta['torch']}, "
        f"triton {meta['triton'] or '-'}, cuDNN {meta['cudnn'] or '-'}, "
        f"driver {meta['driver'] or '-'}, commit {meta['commit']}"
    )
    for note in notes + impl_notes:
        print(f"  note: {note}")
    print(
        f"  {len(cases)} shape x dtype cases, implementations: "
        f"{', '.join(i.name for i in impls)}; {total} measurements -> "
        f"{csv_path if csv_path else 'no CSV'}",
        flush=True,
    )
    rows = run_cases(cases, impls, modes, device, budget, meta, csv_path, Progress(total))
    print()
    print(summary_table(rows))
    bad = [r for r in rows if r["status"] != "ok"]
    print(
        f"\n{len(rows)} rows, {len(bad)} not ok (failed or wrong)"
        + (f"; appended to {csv_path}" if csv_path else "")
    )
    if csv_path is not None and csv_path != DEFAULT_CSV and not args.csv:
        print(
            "  (a CPU or smoke run: the rows stay out of benchmarks/results.csv; "
            f"`python -m gpurnn plot --csv {csv_path}` draws them)"
        )
    return 1 if (args.strict and bad) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("python -m gpurnn bench", __doc__, add_arguments, run, argv)
