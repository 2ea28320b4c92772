"""Which GPU kernel `auto` picks per shape: a small measured table, kept in the package.

When both kernel backends (`triton`, `cupy`) can run a case, `auto` asks `preferred` for
the one measured faster at that cell, dtype and size bucket (forward + backward time of
a whole layer). The table is `gpurnn/dispatch.json`; without an entry `auto` keeps its
default order (triton first). It is regenerated from benchmark rows:

    python -m gpurnn bench --shapes flashrnn,cells --backends gpurnn-triton,gpurnn-cupy
    python -m gpurnn dispatch --csv benchmarks/results.csv --write

which keeps, for each (cell, dtype, hidden-size bucket, batch bucket), the backend with
the lower median fwd+bwd time in the latest run of each card, among rows whose status is
ok (a wrong or failed kernel never wins a bucket).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
from collections.abc import Iterable
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("dispatch.json")
KERNEL_BACKENDS = ("triton", "cupy")

# upper edges; a size above the last falls in the last bucket
HIDDEN_BUCKETS = (256, 512, 1024, 2048)
BATCH_BUCKETS = (8, 16, 64, 256)


def _bucket(value: int, edges: tuple[int, ...]) -> str:
    for edge in edges:
        if value <= edge:
            return f"<={edge}"
    return f">{edges[-1]}"


def key(cell: str, dtype: str, hidden_size: int, batch_size: int | None) -> str:
    """Table key; a batch size unknown at dispatch time (torch.compile with dynamic shapes)
    uses the "any" bucket, the winner over all batch sizes measured at that hidden size."""
    batch = "any" if batch_size is None else _bucket(batch_size, BATCH_BUCKETS)
    return f"{cell}/{dtype}/H{_bucket(hidden_size, HIDDEN_BUCKETS)}/B{batch}"


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, str]:
    """The table's choices (read once; `load_table.cache_clear()` after rewriting it)."""
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())["choices"]


def preferred(cell: str, dtype, hidden_size: int | None, batch_size: int | None) -> str | None:
    """The measured-faster kernel backend for this case, or None when not measured."""
    if hidden_size is None:
        return None
    dtype_name = str(dtype).replace("torch.", "")
    return load_table().get(key(cell, dtype_name, hidden_size, batch_size))


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build(rows: Iterable[dict]) -> dict[str, str]:
    """Winner per bucket from benchmark CSV rows (bench.FIELDS): single-layer, unpadded
    fwd+bwd rows of gpurnn-triton and gpurnn-cupy with status ok, latest run per card."""
    rows = [r for r in rows if r.get("mode") == "fwdbwd" and r.get("status") == "ok"]
    latest = {}
    for r in rows:
        latest[r["card"]] = max(latest.get(r["card"], ""), r["run_id"])
    best: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        impl = r["impl"].removeprefix("gpurnn-")
        if (
            impl not in KERNEL_BACKENDS
            or r["run_id"] != latest[r["card"]]
            or r["layers"] != "1"
            or r["bidirectional"] != "0"
            or r["varlen"]
        ):
            continue
        dtype = _DTYPE_NAMES.get(r["dtype"], r["dtype"])
        H, B = int(r["H"]), int(r["B"])
        for k in (key(r["cell"], dtype, H, B), key(r["cell"], dtype, H, None)):
            best.setdefault(k, {}).setdefault(impl, []).append(float(r["ms"]))
    choices = {}
    for k, times in sorted(best.items()):
        if len(times) < 2:
            continue  # only one backend measured: nothing to choose between
        choices[k] = min(times, key=lambda impl: sum(times[impl]) / len(times[impl]))
    return choices


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
        "--write", action="store_true", help=f"write the table to {TABLE_PATH.name} (else print it)"
    )


def run(args) -> int:
    path = Path(args.csv)
    if not path.exists():
        print(f"no benchmark rows at {path}: run python -m gpurnn bench on a GPU first")
        return 2
    with path.open(newline="") as f:
        choices = build(csv.DictReader(f))
    if not choices:
        print("no bucket has both triton and cupy measured: nothing to write")
        return 1
    text = json.dumps({"source": str(path), "choices": choices}, indent=1, sort_keys=True)
    if args.write:
        TABLE_PATH.write_text(text + "\n")
        load_table.cache_clear()
        print(f"wrote {len(choices)} choices to {TABLE_PATH}")
    else:
        print(text)
    return 0
