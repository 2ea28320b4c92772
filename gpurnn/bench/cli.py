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
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gpurnn.bench.harness import Progress, run_cases
from gpurnn.bench.results import DEFAULT_CSV, run_metadata, summary_table
from gpurnn.bench.runners import implementations
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
        help="comma-separated, of " + ",".join(DTYPES) + " (default: all on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--backends",
        help="comma-separated implementations: gpurnn-<backend>, "
        "cudnn (alias torch.nn), cell-loop, flashrnn (default: all that run here)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of fwd,fwdbwd (default: both)"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument(
        "--csv",
        default=str(DEFAULT_CSV),
        help="results file the rows are appended to (default: %(default)s)",
    )
    parser.add_argument("--no-csv", action="store_true", help="append no rows anywhere")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when any row failed or was wrong"
    )


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def plan(args, device: torch.device) -> tuple[list[tuple[Shape, str]], list[str]]:
    """The (shape, dtype) cases the arguments select, and lines to print about the choice."""
    notes = []
    dtypes = _split(args.dtypes) or (list(DTYPES) if device.type == "cuda" else ["fp32"])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtypes {bad}; choose from {', '.join(DTYPES)}")
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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    requested = _split(args.backends)
    # (without CUDA, gpurnn-triton runs only under the interpreter, which `python -m gpurnn
    # bench` switches on by running itself again: TRITON_INTERPRET must be set before
    # triton is first imported, and importing torch's compiler imports it)
    try:
        cases, notes = plan(args, device)
        impls, impl_notes = implementations(device, requested, args.quick)
        modes = _split(args.modes) or list(MODES)
        if any(m not in MODES for m in modes):
            raise ValueError(f"modes must be of {MODES}, got {modes}")
    except ValueError as e:
        print(f"gpurnn bench: {e}", file=sys.stderr)
        return 2
    meta = run_metadata(device)
    csv_path = None if args.no_csv else Path(args.csv)
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
    return 1 if (args.strict and bad) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpurnn bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
