"""Compile every Triton kernel a GPU run is about to launch, in parallel, without launching.

A cold GPU machine spends most of a short run compiling: each Triton variant costs seconds
of one host core, and a run launches dozens of them one after another. This warms Triton's
on-disk cache (and CuPy's, for the cupy backend's NVRTC builds) first, in as many processes
as the machine has cores: each process runs the run's own commands (the step timer's cases,
bench shapes, the GPU tests) with every Triton launch replaced by its compile
(`JITFunction.run(..., warmup=True)`) and every cupy launch by its build, so exactly the
variants those commands would launch are built (same arguments, same specialisation), and
nothing runs on the GPU but the commands' own torch work. Outputs are garbage while warming:
what the commands print or assert then is thrown away. The timed run that follows finds
every kernel in the cache.

    python -m gpurnn.bench.warmup --step all --bench quick \\
        --pytest "tests/test_triton_gpu.py -m 'gpu and not slow'"
    python -m gpurnn.bench.warmup --check bf16,fp16,fp32     # what `gpurnn check` runs first

prints how long it took and how many kernels were built. `--limit` bounds it in seconds:
whatever is not built by then is built when first launched, as without a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


@contextlib.contextmanager
def compile_only():
    """Every Triton launch in the block compiles its kernel (cached on disk) and returns
    without running it. Yields the list of kernels compiled so far (name, cache key)."""
    from triton.runtime.jit import JITFunction

    run, do_compile = JITFunction.run, JITFunction._do_compile
    built: list[tuple[str, str]] = []

    def run_compiles(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    def counted(self, key, *args, **kwargs):
        built.append((getattr(self, "__name__", "?"), str(key)))
        return do_compile(self, key, *args, **kwargs)

    JITFunction.run, JITFunction._do_compile = run_compiles, counted
    restore_cupy = _cupy_compile_only(built)
    try:
        yield built
    finally:
        JITFunction.run, JITFunction._do_compile = run, do_compile
        restore_cupy()


def _cupy_compile_only(built: list) -> callable:
    """The cupy backend's launches likewise: NVRTC builds the kernel (CuPy caches it on
    disk) and nothing is launched. Returns what undoes it (nothing to undo without CuPy)."""
    try:
        import cupy  # noqa: F401

        import gpurnn.backends.cupy as backend
        from gpurnn.backends.cupy import launch
    except Exception:  # noqa: BLE001 - no CuPy: nothing of it to warm
        return lambda: None
    original = launch.launch_kernel

    def compile_kernel(device, plan, cell, dtype, args) -> None:
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        name = plan.kernel_name(cell, dtype)
        kernel = launch.compiled(index, name, plan.variant == "grid", launch.debug_bounds())
        kernel.max_dynamic_shared_size_bytes  # noqa: B018 - loading the module compiles it
        built.append((name, "nvrtc"))

    launch.launch_kernel = backend.launch_kernel = compile_kernel

    def restore() -> None:
        launch.launch_kernel = backend.launch_kernel = original

    return restore


def _run_item(item: list[str]) -> None:
    """One command (a module and its arguments, or "-c" and Python code) in this process,
    its output and exit ignored."""
    saved = sys.argv
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            if item[0] == "-c":
                exec(item[1], {})
            else:
                sys.argv = list(item)
                runpy.run_module(item[0], run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    except Exception as e:  # noqa: BLE001 - garbage outputs may break a command: go on
        print(f"warm-up: {' '.join(item)[:120]}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
    finally:
        sys.argv = saved


def worker(items: list[list[str]]) -> dict:
    start = time.perf_counter()
    with compile_only() as built:
        for item in items:
            _run_item(item)
    return dict(built=len(set(built)), seconds=round(time.perf_counter() - start, 1))


def step_items(spec: str, dry_run: bool) -> list[list[str]]:
    from gpurnn.bench import step_timing

    cases = step_timing.DRY_RUN_CASES if dry_run else step_timing.CASES
    ids = [c.id for c in cases] if spec == "all" else spec.split(",")
    extra = ["--dry-run"] if dry_run else []
    return [["gpurnn.bench.step_timing", "--cases", i, "--steps", "8", "--reps", "1",
             "--kernels-only", *extra] for i in ids]  # fmt: skip


def bench_items(spec: str, backends: str) -> list[list[str]]:
    from gpurnn.bench import shapes

    pairs = shapes.QUICK if spec == "quick" else [tuple(p.split(":")) for p in spec.split(",")]
    return [["gpurnn", "bench", "--shapes", sid, "--dtypes", dt, "--backends", backends,
             "--csv", os.devnull] for sid, dt in pairs]  # fmt: skip


def check_items(dtypes: str) -> list[list[str]]:
    """`python -m gpurnn check`'s triton cases (cell x dtype x direction), one item each."""
    from gpurnn.check import CHECK_CELLS

    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
    cases = [(dt, c, r) for dt in dtypes.split(",") for c in CHECK_CELLS for r in (False, True)]
    return [["-c", "import torch; from gpurnn.check import check_case; "
             f"check_case('triton', {cell!r}, torch.{names.get(dt, dt)}, {rev}, "
             "torch.device('cuda'))"] for dt, cell, rev in cases]  # fmt: skip


def pytest_ids(args: str) -> tuple[list[str], list[str]]:
    """(the tests the pytest arguments select, the arguments to run them with)."""
    argv = shlex.split(args)
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *argv],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    ids = [line for line in done.stdout.splitlines() if "::" in line and " " not in line]
    marks = [a for i, a in enumerate(argv) if a == "-m" or (i and argv[i - 1] == "-m")]
    return ids, ["-q", "-p", "no:cacheprovider", *marks]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _spawn(items: list[list[str]], limit: float) -> dict:
    done = subprocess.run([sys.executable, "-m", "gpurnn.bench.warmup", "--worker",
                           json.dumps(items)],
                          capture_output=True, text=True, timeout=limit)  # fmt: skip
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return dict(built=0, seconds=0, error=done.stderr[-300:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step", help="step timer cases: ids or 'all'")
    parser.add_argument("--bench", help="bench shapes: 'quick' or shape:dtype,...")
    parser.add_argument("--bench-backends", default="gpurnn-triton",
                        help="(default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--check",
        metavar="DTYPES",
        help="`gpurnn check`'s triton cases in these dtypes, e.g. bf16,fp16,fp32",
    )
    parser.add_argument(
        "--pytest",
        action="append",
        default=[],
        help="pytest arguments whose tests to warm up (repeatable)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes (default: the cores, %(default)s)")  # fmt: skip
    parser.add_argument("--limit", type=float, default=60, help="seconds (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="the step timer's CPU cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    start = time.perf_counter()
    if os.environ.get("TRITON_INTERPRET") == "1" or not _has_cuda():
        # the interpreter compiles nothing, and without a GPU nothing would be launched
        print("warm-up: no GPU here, nothing to compile")
        return 0
    items: list[list[str]] = []
    if args.step:
        items += step_items(args.step, args.dry_run)
    if args.bench:
        items += bench_items(args.bench, args.bench_backends)
    if args.check:
        items += check_items(args.check)
    tests = [pytest_ids(spec) for spec in args.pytest]
    jobs = max(1, min(args.jobs, len(items) + sum(len(ids) for ids, _ in tests)))
    chunks = [items[i::jobs] for i in range(jobs)]
    for ids, run_args in tests:  # one pytest per worker for its share of the tests
        for i in range(jobs):
            if ids[i::jobs]:
                chunks[i].append(["pytest", *run_args, *ids[i::jobs]])
    n_commands = sum(len(c) for c in chunks)
    left = max(1.0, args.limit - (time.perf_counter() - start))
    built, errors = 0, []
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(_spawn, chunk, left) for chunk in chunks if chunk]
        for f in futures:
            try:
                r = f.result()
            except subprocess.TimeoutExpired:
                errors.append("a worker ran out of time")
                continue
            built += r["built"]
            if "error" in r:
                errors.append(r["error"])
    took = time.perf_counter() - start
    print(
        f"warm-up: {built} kernels built for {n_commands} commands by {jobs} processes "
        f"in {took:.1f} s" + (f"; {len(errors)} workers failed: {errors[0]}" if errors else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
