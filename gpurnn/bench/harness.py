"""The run itself: each (shape, dtype) case built, checked against the reference, timed
per implementation and mode, judged against the baseline, and turned into CSV rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import torch

from gpurnn.bench.correctness import (
    TOLERANCE,
    Reference,
    compute_reference,
    forward_error,
    grad_error,
)
from gpurnn.bench.results import append_rows
from gpurnn.bench.runners import Impl, Runner, make_base
from gpurnn.bench.shapes import DTYPES, InputSet, Shape, _seed, flops, make_inputs
from gpurnn.bench.timing import Timer


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


@dataclasses.dataclass
class Measurement:
    impl: Impl
    mode: str
    status: str = "ok"
    ms: float | None = None
    repeats: int | None = None
    peak_mb: float | None = None
    max_err: float | None = None
    grad_err: float | None = None
    speedup: float | None = None


def _peak_training_mb(runner: Runner, inputs: InputSet, device) -> float | None:
    if device.type != "cuda":
        return None  # torch keeps no allocator statistics for CPU tensors
    runner.zero_grad()
    inputs.leaf.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.run(inputs.inp)[0].backward(inputs.dy)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(
    impl: Impl, runner: Runner, mode: str, input_sets: list[InputSet], ref: Reference, timer: Timer
) -> Measurement:
    """Correctness on input set 0, then the timing over all sets, then peak memory."""
    m = Measurement(impl, mode)
    first = input_sets[0]
    if mode == "fwd":
        with torch.no_grad():
            m.max_err = forward_error(runner.run(first.inp), ref)

        def once(i):
            with torch.no_grad():
                runner.run(input_sets[i % len(input_sets)].inp)

        m.ms, m.repeats = timer.median_ms(once, lambda i: None)
        return m

    runner.zero_grad()
    first.leaf.grad = None
    result = runner.run(first.inp)
    result[0].backward(first.dy)
    m.max_err = forward_error(result, ref)
    m.grad_err = grad_error(runner, first, ref)
    del result

    def prepare(i):  # gradients are set, not accumulated, on every timed run
        runner.zero_grad()
        input_sets[i % len(input_sets)].leaf.grad = None

    def once(i):
        inputs = input_sets[i % len(input_sets)]
        runner.run(inputs.inp)[0].backward(inputs.dy)

    m.ms, m.repeats = timer.median_ms(once, prepare)
    m.peak_mb = _peak_training_mb(runner, first, timer.device)
    return m


def _judge(measurements: list[Measurement], dtype, baseline_ms: dict[str, float]) -> None:
    """Speedups against the baseline, and "wrong" for errors beyond the tolerance."""
    base = {m.mode: m for m in measurements if m.impl.is_baseline and m.status == "ok"}
    for m in measurements:
        if m.ms is not None and baseline_ms.get(m.mode):
            m.speedup = baseline_ms[m.mode] / m.ms
        if m.status != "ok":
            continue
        b = base.get(m.mode)
        for what, err, base_err in (
            ("max_err", m.max_err, b.max_err if b else None),
            ("grad_err", m.grad_err, b.grad_err if b else None),
        ):
            if err is None:
                continue
            tol = max(TOLERANCE[dtype], 2 * (base_err or 0.0))
            if not err <= tol:
                m.status = f"wrong: {what} {err:.2e} > {tol:.1e}"
                break


def _row(meta, shape: Shape, dtype_name: str, m: Measurement) -> dict:
    per_step = m.ms * 1e3 / shape.T if m.ms is not None else None
    rate = flops(shape, m.mode) / (m.ms * 1e-3) / 1e12 if m.ms else None
    return {
        **meta,
        "suite": shape.suite,
        "shape": shape.id,
        "cell": shape.cell,
        "T": shape.T,
        "B": shape.B,
        "H": shape.H,
        "input_size": shape.input_size,
        "layers": shape.layers,
        "bidirectional": int(shape.bidirectional),
        "varlen": shape.varlen,
        "dtype": dtype_name,
        "impl": m.impl.name,
        "mode": m.mode,
        "status": m.status,
        "ms": _fmt(m.ms, ".4g"),
        "us_per_step": _fmt(per_step, ".4g"),
        "tflops": _fmt(rate, ".4g"),
        "speedup_vs_cudnn": _fmt(m.speedup, ".3g"),
        "peak_mem_mb": _fmt(m.peak_mb, ".1f"),
        "max_err": _fmt(m.max_err, ".2e"),
        "grad_err": _fmt(m.grad_err, ".2e"),
        "repeats": _fmt(m.repeats, "d"),
    }


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").strip()
    return text if len(text) <= 300 else text[:297] + "..."


class Progress:
    """One line per finished case: [k/N] suite/shape dtype impl mode  result  ETA."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.stream = stream or sys.stdout

    def step(self, shape: Shape, dtype_name: str, m: Measurement) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        what = f"{m.ms:9.3f} ms" if m.ms is not None else " " * 12
        err = f"err {m.max_err:.1e}" if m.max_err is not None else ""
        status = "" if m.status == "ok" else f"  {m.status}"
        print(
            f"[{self.done}/{self.total}] {shape.suite}/{shape.id} {dtype_name} "
            f"{m.impl.name} {m.mode}  {what}  {err}{status[:120]}  ETA {_duration(eta)}",
            file=self.stream,
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_cases(cases, impls, modes, device, budget, meta, csv_path, progress) -> list[dict]:
    """Runs every (shape, dtype) case for every implementation and mode; appends each
    case's rows to the CSV as soon as it is done (a crash keeps what was measured)."""
    timer = Timer(device, budget)
    baseline_ms: dict[tuple[str, str, str], float] = {}  # (shape id, dtype, mode) -> ms
    all_rows = []
    for shape, dtype_name in cases:
        dtype = DTYPES[dtype_name]
        applicable = [i for i in impls if i.applies(shape)]
        base = input_sets = ref = None
        try:
            base = make_base(shape, dtype, device)
            input_sets = [
                make_inputs(shape, dtype, device, _seed("inputs", shape.id, dtype_name, k))
                for k in range(budget.input_sets)
            ]
            ref = compute_reference(shape, base, input_sets[0])
            setup_error = None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: every row says so
            setup_error = f"setting up the case: {_error_text(e)}"
            _recover(device)
        measurements = []
        # the baseline first, so its times exist when the others' speedups are computed
        for impl in sorted(applicable, key=lambda i: not i.is_baseline):
            runner, build_error = None, setup_error
            if setup_error is None:
                try:
                    runner = impl.build(shape, base, dtype)
                except Exception as e:  # noqa: BLE001 - a failing implementation is a result
                    build_error = _error_text(e)
            for mode in modes:
                if runner is None:
                    m = Measurement(impl, mode, status=f"failed: {build_error}")
                else:
                    try:
                        m = measure(impl, runner, mode, input_sets, ref, timer)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        m = Measurement(impl, mode, status=f"failed: {_error_text(e)}")
                        _recover(device)
                if impl.is_baseline and m.status == "ok":
                    baseline_ms[(shape.id, dtype_name, mode)] = m.ms
                measurements.append(m)
                progress.step(shape, dtype_name, m)
            del runner
        own_baseline = {
            mode: baseline_ms.get((shape.baseline_id, dtype_name, mode)) for mode in modes
        }
        _judge(measurements, dtype, own_baseline)
        rows = [_row(meta, shape, dtype_name, m) for m in measurements]
        if csv_path is not None:
            append_rows(csv_path, rows)
        all_rows += rows
        del base, input_sets, ref
        _recover(device)
    return all_rows


def _recover(device) -> None:
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # a dead CUDA context fails here too
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
