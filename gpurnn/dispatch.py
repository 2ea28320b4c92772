"""Which backend `auto` runs per shape on CUDA: the lookup in a small measured table kept in
the package (`gpurnn/dispatch.json`).

The candidates are the GPU kernels (`triton`, `cupy`) and `torch`, which on CUDA runs
torch.nn's own layer functions (cuDNN): a shape where cuDNN measured faster goes to
cuDNN. `auto` ranks the candidates by the table for the case's cell, dtype and size
bucket (training time, forward + backward of a whole layer) and runs the first one that
can run the case; without an entry it keeps its default order (triton first). `torch`
counts only where it means cuDNN, in layers run eagerly: cells, the functional
`gpurnn.recurrence` and torch.compile would run it as a time loop, and take the fastest
kernel of the ranking instead. A backend whose GPU tests failed on a card is never run
there by `auto`.

This module is what runs with every CUDA call: read the table, look a case up. Building
the table from benchmark rows and GPU test records is tooling, in `gpurnn.bench.table`
(`python -m gpurnn dispatch --write`); it imports this module for the keys, never the
reverse.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("dispatch.json")
# auto's default order, and the tie-break of the table's rankings
CANDIDATES = ("triton", "cupy", "torch")

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
    uses the "any" bucket, the ranking over all batch sizes measured at that hidden size."""
    batch = "any" if batch_size is None else _bucket(batch_size, BATCH_BUCKETS)
    return f"{cell}/{dtype}/H{_bucket(hidden_size, HIDDEN_BUCKETS)}/B{batch}"


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
