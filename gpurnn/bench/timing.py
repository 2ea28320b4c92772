"""How long one run takes: repeat budgets, and a Timer that uses CUDA events with the L2
cache flushed before each run (perf_counter on CPU).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Budget:
    warmup: int
    min_repeats: int
    max_repeats: int
    target_s: float  # aim for about this much measured time per case
    input_sets: int = 3


BUDGETS = {
    "full": Budget(warmup=3, min_repeats=10, max_repeats=100, target_s=1.0),
    "quick": Budget(warmup=2, min_repeats=5, max_repeats=20, target_s=0.25),
    "cpu": Budget(warmup=2, min_repeats=3, max_repeats=10, target_s=0.05, input_sets=2),
}

_FLUSH_BYTES = 256 * 2**20  # larger than any L2 (H100 50 MB, H200 60 MB)


class Timer:
    """Median time of a callable: CUDA events with an L2 flush before each run, or
    perf_counter on CPU."""

    def __init__(self, device: torch.device, budget: Budget):
        self.device, self.budget = device, budget
        self.cuda = device.type == "cuda"
        self.flush_buffer = (
            torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None
        )

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[int], None], prepare: Callable[[int], None]):
        """fn(i) runs once on input set i % input_sets; prepare(i) runs untimed before it.
        Returns (median ms, repeats)."""
        b = self.budget
        for i in range(b.warmup):
            prepare(i)
            fn(i)
        self._sync()
        # size the repeats from one timed run: slow cases need fewer for a stable median
        prepare(0)
        start = time.perf_counter()
        fn(0)
        self._sync()
        once = max(time.perf_counter() - start, 1e-6)
        repeats = int(min(b.max_repeats, max(b.min_repeats, b.target_s / once)))
        if not self.cuda:
            times = []
            for r in range(repeats):
                prepare(r)
                start = time.perf_counter()
                fn(r)
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times), repeats
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for r, (begin, end) in enumerate(events):
            prepare(r)
            self.flush_buffer.zero_()  # evict the last run's weights and activations
            begin.record()
            fn(r)
            end.record()
        self._sync()
        return statistics.median(s.elapsed_time(e) for s, e in events), repeats
