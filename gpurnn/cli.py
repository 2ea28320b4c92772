"""Command line: `python -m gpurnn info | check | demo | bench | plot | inspect`."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

import torch

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default (unless its help already says it, or it has
    none: None, or False for a flag); descriptions keep their own line breaks."""

    def _get_help_string(self, action):
        help = action.help or ""
        has_default = action.default not in (None, False, argparse.SUPPRESS)
        if has_default and action.option_strings and "default" not in help:
            help += " (default: %(default)s)"
        return help


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

    device = torch.device(args.device) if args.device else None
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")] if args.dtypes else None
    backends = args.backends.split(",") if args.backends else None

    def progress(group, seconds, done, total):
        print(format_progress(group, seconds, done, total), flush=True)

    on_gpu = (device or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type
    if on_gpu == "cuda" and (backends is None or "triton" in backends):
        # cold, the triton cases would compile one after another: compile them all first, in
        # a process per core (a minute of compiling becomes seconds)
        from gpurnn.bench import warmup

        names = args.dtypes or "bf16,fp16,fp32"
        warmup.main(["--check", names, "--limit", "40"])
    results = run_check(device, dtypes, backends, progress)
    print()
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    checked = [r for r in results if r.max_error is not None]
    print(f"\n{len(checked)} cases checked against the float64 reference, {len(failed)} failed")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpurnn", description=__doc__, formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "info",
        help="versions, device, which backends work here (and how triton runs on a CPU)",
        formatter_class=HelpFormatter,
    )
    check = sub.add_parser(
        "check", help="every available backend against the reference", formatter_class=HelpFormatter
    )
    check.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    check.add_argument("--dtypes", help="comma-separated, of " + ",".join(DTYPES))
    check.add_argument("--backends", help="comma-separated backend names (default: all)")
    from gpurnn import bench, demos, dispatch, plot

    demos.add_forecast_arguments(
        sub.add_parser(
            "demo",
            help="convert a torch.nn model and train it a little",
            formatter_class=HelpFormatter,
        )
    )

    bench.add_arguments(
        sub.add_parser(
            "bench",
            help="time gpurnn against cuDNN, a cell loop and FlashRNN",
            description=bench.__doc__,
            formatter_class=HelpFormatter,
        )
    )
    plot.add_arguments(
        sub.add_parser(
            "plot",
            help="PNG plots and the README table from benchmarks/results.csv",
            formatter_class=HelpFormatter,
        )
    )
    demos.add_depth_arguments(
        sub.add_parser(
            "inspect",
            help="train a small LSTM, record every step's gates and states, plot them",
            formatter_class=HelpFormatter,
        )
    )
    dispatch.add_arguments(
        sub.add_parser(
            "dispatch",
            help="the auto backend's per-shape ranking of triton, cupy and torch (cuDNN), "
            "from bench rows and GPU test records",
            description=dispatch.__doc__,
            formatter_class=HelpFormatter,
        )
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    wants_triton = args.command == "check" or (
        args.command == "bench" and "gpurnn-triton" in (args.backends or "")
    )
    if wants_triton:
        status = _rerun_under_triton_interpreter(argv)
        if status is not None:
            return status
    commands = {
        "dispatch": dispatch.run,
        "info": cmd_info,
        "check": cmd_check,
        "demo": demos.forecast,
        "bench": bench.run,
        "plot": plot.run,
        "inspect": demos.depth,
    }
    return commands[args.command](args)
