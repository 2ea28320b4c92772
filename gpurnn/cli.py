"""Command line: `python -m gpurnn info | check`."""

from __future__ import annotations

import argparse
import os
import platform
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


def _interpret_triton_without_gpu() -> None:
    # The Triton interpreter must be chosen before any kernel is decorated, i.e. before
    # the triton backend is first imported; without a GPU it is the only way to run it.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cmd_info(args) -> int:
    import gpurnn

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
    _interpret_triton_without_gpu()
    print("backends:")
    for name, reason in gpurnn.available_backends().items():
        print(f"  {name:7} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def cmd_check(args) -> int:
    _interpret_triton_without_gpu()
    from gpurnn.check import format_table, run_check

    device = torch.device(args.device) if args.device else None
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")] if args.dtypes else None
    backends = args.backends.split(",") if args.backends else None
    results = run_check(device, dtypes, backends)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    checked = [r for r in results if r.max_error is not None]
    print(f"\n{len(checked)} cases checked against the float64 reference, {len(failed)} failed")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpurnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and which backends work here")
    check = sub.add_parser("check", help="every available backend against the reference")
    check.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    check.add_argument("--dtypes", help="comma-separated, of " + ",".join(DTYPES))
    check.add_argument("--backends", help="comma-separated backend names (default: all)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check}[args.command](args)
