"""Command line: `python -m gpurnn info | check | demo | bench | plot | inspect | dispatch`.

Each command's arguments and its work live with what it runs (gpurnn.check, gpurnn.demos,
gpurnn.bench, gpurnn.plot, gpurnn.bench.table); this module parses and dispatches. A
user's mistake (an unknown name, a device this machine lacks) ends in one line and exit
status 2 (gpurnn.arguments).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch

from gpurnn.arguments import Parser, UsageError, device, names, usage_error

DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as e:  # noqa: BLE001 - any failure to import is worth printing
        return f"not available ({type(e).__name__}: {e})".splitlines()[0]
    return getattr(module, "__version__", "?")


def _rerun_under_triton_interpreter(argv: list[str]) -> int | None:
    """Without a GPU the Triton kernels run only under the interpreter, which must be on
    before triton is first imported, and importing torch's compiler (as gpurnn does)
    imports triton: so the command runs again in a child process with TRITON_INTERPRET=1.
    Returns its exit status, or None when this process can go on itself."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return None
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "gpurnn", *argv], env=env)


def _triton_status(reason: str | None) -> str:
    """What `info` says about triton: on a CPU, its kernels run through Triton's own
    interpreter (NumPy, one program after another), which must be switched on with
    TRITON_INTERPRET=1 before triton is imported; `check` and `bench` do that themselves."""
    if reason is None and not torch.cuda.is_available():
        return (
            "available on CPU through the Triton interpreter (TRITON_INTERPRET=1; slow, for\n"
            "          tests; auto never picks it on CPU: ask for backend='triton' by name)"
        )
    if reason is not None and not torch.cuda.is_available() and "TRITON_INTERPRET" in reason:
        return (
            "no CUDA device; runs on CPU through the Triton interpreter (slow, for tests):\n"
            "          `python -m gpurnn check` switches it on itself; elsewhere start Python\n"
            "          with TRITON_INTERPRET=1 and ask for backend='triton' by name"
        )
    return "available" if reason is None else "unavailable: " + reason


def cmd_info(args) -> int:
    import gpurnn
    from gpurnn.backends import requested_backend

    print(f"gpurnn  {gpurnn.__version__}")
    print(f"python  {platform.python_version()} ({sys.executable})")
    for name in ("torch", "triton", "numpy", "cupy"):
        print(f"{name:7} {_version(name)}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(
            f"device  {props.name}, sm_{props.major}{props.minor}, "
            f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        print("device  CPU only (no CUDA device)")
    print("backends:")
    for name, reason in gpurnn.available_backends().items():
        if name == "triton":
            print(f"  {name:7} {_triton_status(reason)}")
        else:
            print(f"  {name:7} {'available' if reason is None else 'unavailable: ' + reason}")
    env = os.environ.get("GPURNN_BACKEND")
    try:
        print(f"default backend: {requested_backend()} (GPURNN_BACKEND={env or '<not set>'})")
    except ValueError as e:
        print(f"default backend: none: {e}")
        return 1
    return 0


def cmd_check(args) -> int:
    from gpurnn.check import format_progress, format_table, run_check

    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else None

    def progress(group, seconds, done, total):
        print(format_progress(group, seconds, done, total), flush=True)

    on = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if on.type == "cuda" and (args.backends is None or "triton" in args.backends):
        # cold, the triton cases would compile one after another: compile them all first, in
        # a process per core (a minute of compiling becomes seconds)
        from gpurnn.bench import warmup

        names = ",".join(args.dtypes) if args.dtypes else "bf16,fp16,fp32"
        warmup.main(["--check", names, "--limit", "40"])
    results = run_check(args.device, dtypes, args.backends, progress)
    print()
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    checked = [r for r in results if r.max_error is not None]
    print(f"\n{len(checked)} cases checked against the float64 reference, {len(failed)} failed")
    return 1 if failed else 0


def build_parser() -> Parser:
    """The whole command line: every subcommand with its arguments."""
    from gpurnn import bench, check, demos, plot
    from gpurnn.backends import BACKENDS
    from gpurnn.bench import table

    backends = [b for b in BACKENDS if b != "auto"]  # check runs each by name
    parser = Parser(
        prog="python -m gpurnn",
        description="gpurnn's command line; `python -m gpurnn COMMAND --help` shows a "
        "command's options and their defaults. Names (backends, dtypes, devices) are taken "
        "in any case; a mistake is answered in one line, with exit status 2.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "info", help="versions, device, which backends work here (and how triton runs on a CPU)"
    )
    checking = sub.add_parser(
        "check",
        help="every available backend against the float64 reference",
        description=check.__doc__,
    )
    checking.add_argument(
        "--device", type=device, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)"
    )
    checking.add_argument(
        "--dtypes",
        type=names(DTYPES, "dtype"),
        help="comma-separated, of " + ",".join(DTYPES) + " (default: bf16,fp16,fp32 on CUDA, "
        "fp64,fp32 on CPU)",
    )
    checking.add_argument(
        "--backends",
        type=names(backends, "backend"),
        help="comma-separated, of " + ",".join(backends) + " (default: all; one "
        "that cannot run here is listed with the reason)",
    )
    demos.add_forecast_arguments(
        sub.add_parser("demo", help="convert a torch.nn model and train it a little")
    )
    bench.add_arguments(
        sub.add_parser(
            "bench",
            help="time gpurnn against cuDNN, a cell loop and FlashRNN",
            description=bench.__doc__,
        )
    )
    plot.add_arguments(
        sub.add_parser(
            "plot",
            help="PNG plots and the README table from the GPU rows of benchmarks/results.csv",
            description=plot.__doc__,
        )
    )
    demos.add_depth_arguments(
        sub.add_parser(
            "inspect",
            help="train a small LSTM, record every step's gates and states, plot them",
            description=demos.__doc__,
        )
    )
    table.add_arguments(
        sub.add_parser(
            "dispatch",
            help="the auto backend's per-shape ranking of triton, cupy and torch (cuDNN), "
            "from bench rows and GPU test records; --record-gpu-tests records a GPU test run",
            description=table.__doc__,
        )
    )
    return parser


def main(argv=None) -> int:
    from gpurnn import bench, demos, plot
    from gpurnn.bench import table

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # (check runs every backend unless told which; bench runs triton only when named)
    wants_triton = (args.command == "check" and "triton" in (args.backends or ["triton"])) or (
        args.command == "bench" and "gpurnn-triton" in (args.backends or ())
    )
    if wants_triton:
        status = _rerun_under_triton_interpreter(argv)
        if status is not None:
            return status
    commands = {
        "dispatch": table.run,
        "info": cmd_info,
        "check": cmd_check,
        "demo": demos.forecast,
        "bench": bench.run,
        "plot": plot.run,
        "inspect": demos.depth,
    }
    try:
        return commands[args.command](args)
    except UsageError as e:
        return usage_error(f"python -m gpurnn {args.command}", e)
