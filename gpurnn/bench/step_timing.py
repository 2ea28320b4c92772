"""Each Triton recurrence kernel timed alone, in µs per time step, beside cuDNN.

For tuning the kernels: `forward` and `backward` of gpurnn.kernels.triton.launch called
directly (no input projection, no weight-gradient GEMMs, no autograd), and in the same
process torch.nn's LSTM/GRU/RNN (cuDNN) at the same shape, forward (no_grad) and
forward + backward, for the ratio. cuDNN's numbers are whole layers (its input GEMM
included), so the ratio bounds what gpurnn's whole layer can reach with these kernels.
For the headline case, where a kernel polls what it exchanges, the same kernel with a grid
barrier instead is timed beside it, and so are the regularized steps (zoneout and
recurrent dropout fused, rows' shape ending with -zo-rd; LayerNorm of W_hh h and of c, its
statistics exchanged every step, ending with -ln).

    python -m gpurnn.bench.step_timing --out out/step_timing.jsonl --csv out/results.csv
    python -m gpurnn.bench.step_timing --cases lstm-bf16-H768-B16 --steps 1024
    python -m gpurnn.bench.step_timing --dry-run     # tiny cases on CPU, Triton interpreted

CUDA events around each call, warm-up (which compiles) first, the median of a few calls;
weights stay in L2 between calls (the recurrence reads them every step anyway). Inputs as
gpurnn's modules pass them: h0 and c0 always, b_hn for GRU, no lengths. One line per
case as it finishes; one JSON object per case to --out, with the first call's time
(compile included) beside each kernel's; with --csv, each kernel's row (suite "kernel",
impl "triton-kernel", or "triton-kernel-barrier" for the grid-barrier builds) in the
columns of benchmarks/results.csv, which the step cost model (gpurnn.bench.step_model)
is fitted to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpurnn.bench.step_model import LN_SHAPE, MASKED_SHAPE


@dataclasses.dataclass(frozen=True)
class Case:
    cell: str
    dtype: str
    H: int
    B: int
    P: int = 0  # LSTM proj_size (0: no projection)
    T: int = 0  # steps, where a case fixes them (0: --steps)
    # also time the grid-barrier kernels where the planned ones poll (two more compiles)
    barrier_too: bool = False
    # zoneout (training masks, p = 0.1) and recurrent dropout (p = 0.25) fused into the step
    masks: bool = False
    # LayerNorm of W_hh h (and of c for the LSTM), its statistics exchanged every step
    layer_norm: bool = False

    @property
    def regularized(self) -> bool:
        return self.masks or self.layer_norm

    @property
    def id(self) -> str:
        proj = f"-P{self.P}" if self.P else ""
        steps = f"-T{self.T}" if self.T else ""
        reg = "-masks" if self.masks else "-ln" if self.layer_norm else ""
        return f"{self.cell}-{self.dtype}-H{self.H}{proj}-B{self.B}{steps}{reg}"


# the shapes the benchmarks and the dispatch table turn on, most telling first: the
# headline (polled against its grid-barrier build), the other batch sizes and cells, then the
# cases cuDNN still wins, the projection, and the on-chip plans
CASES = [
    Case("lstm", "bf16", 768, 16, barrier_too=True),
    Case("lstm", "bf16", 768, 1),
    Case("lstm", "bf16", 768, 64),
    Case("gru", "bf16", 768, 16),
    Case("rnn_tanh", "bf16", 768, 16),
    Case("lstm", "bf16", 768, 16, masks=True),  # the regularized steps beside the headline's
    Case("lstm", "bf16", 768, 16, layer_norm=True),
    Case("lstm", "bf16", 1024, 256),
    Case("lstm", "fp16", 768, 16),
    Case("lstm", "bf16", 1024, 16, P=256, T=1024),  # LSTMP, cuDNN's nn.LSTM(proj_size=256)
    Case("rnn_tanh", "bf16", 32, 1),
    Case("lstm", "bf16", 128, 1),
]
# without a GPU: the interpreter runs fp32 only (its bf16 dot is broken), tiny sizes
DRY_RUN_CASES = [Case("lstm", "fp32", 16, 2), Case("lstm", "fp32", 16, 2, P=8),
                 Case("lstm", "fp32", 16, 2, masks=True),
                 Case("lstm", "fp32", 16, 2, layer_norm=True)]  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="JSON lines file (appended to)")
    parser.add_argument("--csv", help="kernel rows in results.csv's columns (appended to)")
    parser.add_argument("--kernels-only", action="store_true",
                        help="leave out the cuDNN layers (what the warm-up runs)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=512, help="T (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per kernel")
    parser.add_argument("--cases", help="comma-separated case ids, e.g. lstm-bf16-H768-B16")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny cases on CPU under the Triton interpreter"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter is chosen when triton is first imported, which importing this
        # package already did: start again with it
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", "gpurnn.bench.step_timing", *argv],
                              env=env).returncode  # fmt: skip

    import torch

    from gpurnn import bench

    if not args.dry_run and not torch.cuda.is_available():
        print("step timing: no CUDA device (--dry-run runs tiny cases on CPU)")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    cases = DRY_RUN_CASES if args.dry_run else CASES
    if args.cases:
        wanted = args.cases.split(",")
        known = {c.id: c for c in CASES + DRY_RUN_CASES}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            print(f"step timing: unknown cases {unknown}; known: {', '.join(known)}")
            return 2
        cases = [known[w] for w in wanted]
    T = 4 if args.dry_run else args.steps
    run = bench.run_metadata(device)
    meta = {k: run[k] for k in ("card", "torch", "triton", "commit")}
    print(
        f"step timing on {meta['card']}, T={T}, median of {args.reps}, commit {meta['commit']}",
        flush=True,
    )
    failures = 0
    for k, case in enumerate(cases, 1):
        start = time.perf_counter()
        steps = case.T if (case.T and not args.dry_run) else T
        try:
            # a regularized case is read against the plain case's kernels, whose cuDNN it
            # shares (cuDNN has no regularized layer)
            baseline = not (args.kernels_only or case.regularized)
            result = time_case(case, steps, args.reps, device, baseline=baseline)
        except Exception as e:  # noqa: BLE001 - one failing case is a result; go on
            result = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            failures += 1
        result = {"kind": "step", "case": case.id, **dataclasses.asdict(case), "T": steps,
                  **result, **meta}  # fmt: skip
        print(f"[{k}/{len(cases)}] {describe(result)}  ({time.perf_counter() - start:.1f} s)",
              flush=True)  # fmt: skip
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(_rounded(result)) + "\n")
        if args.csv and "error" not in result:
            bench.append_rows(Path(args.csv), kernel_rows(result, run))
    return 1 if failures else 0


def kernel_rows(r: dict, run: dict) -> list[dict]:
    """The case's kernels as rows of results.csv: forward (without saving the workspace, as
    inference runs it) and backward, µs per step, and the grid-barrier builds where timed."""
    rows = []
    for impl, mode, key in (
        ("triton-kernel", "fwd", "triton_fwd"),
        ("triton-kernel", "bwd", "triton_bwd"),
        ("triton-kernel-barrier", "fwd", "triton_fwd_barrier"),
        ("triton-kernel-barrier", "bwd", "triton_bwd_barrier"),
    ):
        us = r.get(key + "_us")
        if us is None:
            continue
        polls = r.get(key + "_failed_polls")
        masked = MASKED_SHAPE if r.get("masks") else LN_SHAPE if r.get("layer_norm") else ""
        rows.append({
            **run, "suite": "kernel",
            "shape": f"{r['cell']}-T{r['T']}-B{r['B']}-H{r['H']}{masked}",
            "cell": r["cell"], "T": r["T"], "B": r["B"], "H": r["H"], "layers": 1,
            "bidirectional": 0, "dtype": r["dtype"], "impl": impl, "mode": mode, "status": "ok",
            "ms": f"{us * r['T'] / 1e3:.4g}", "us_per_step": f"{us:.4g}",
            "proj_size": r["P"] or "", "failed_polls": "" if polls is None else f"{polls:.3g}",
        })  # fmt: skip
    return rows


def _rounded(value):
    """Floats to 4 significant digits: the timings are not more precise than that."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def describe(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:22} FAILED {r['error']}"

    def barrier(key):
        us = r.get(key)
        return f" (grid barrier {us:.2f})" if us else ""

    def polls():
        f, b = r.get("triton_fwd_failed_polls"), r.get("triton_bwd_failed_polls")
        if f is None and b is None:
            return ""
        f, b = ("-" if x is None else f"{x:.3g}" for x in (f, b))
        return f"| failed polls/step fwd {f} bwd {b} "

    base = ""
    if "baseline" in r:
        base = (f"| {r['baseline']} fwd {r['baseline_fwd_us']:7.2f} fwd+bwd "
                f"{r['baseline_fwdbwd_us']:7.2f} | ratio fwd {r['fwd_ratio']:.2f}x fwd+bwd "
                f"{r['fwdbwd_ratio']:.2f}x ")  # fmt: skip
    return (
        f"{r['case']:22} µs/step: triton fwd {r['triton_fwd_us']:7.2f}"
        f"{barrier('triton_fwd_barrier_us')} fwd+save {r['triton_fwd_save_us']:7.2f} "
        f"bwd {r['triton_bwd_us']:7.2f}{barrier('triton_bwd_barrier_us')} {polls()}{base}"
        f"| first calls {r['triton_fwd_first_s']:.1f}/{r['triton_bwd_first_s']:.1f} s"
    )


def time_case(case: Case, T: int, reps: int, device, baseline: bool = True) -> dict:
    import torch

    from gpurnn.bench import DTYPES
    from gpurnn.cells import GATES
    from gpurnn.kernels.triton import launch
    from gpurnn.kernels.triton.plan import _polls, make_plan

    dtype = DTYPES[case.dtype]
    cell, B, H, P = case.cell, case.B, case.H, case.P
    H_out = P or H  # width of h, y and W_hh's rows
    G = GATES[cell]
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    xg = rand(T, B, G * H)
    w_hh = rand(G * H, H_out, scale=H_out**-0.5)
    w_hr = rand(P, H, scale=H**-0.5) if P else None
    h0 = torch.zeros(B, H_out, device=device, dtype=dtype)
    c0 = torch.zeros(B, H, device=device, dtype=dtype) if cell == "lstm" else None
    b_hn = rand(H) if cell == "gru" else None

    reg = _regularizers(case, T, B, H, device)

    def fwd(save):
        return launch.forward(cell, xg, w_hh, h0, c0, None, False, b_hn, save, w_hr=w_hr,
                              **reg)  # fmt: skip

    y, _, _, ws = fwd(True)
    dy, dh_T = rand(T, B, H_out), rand(B, H_out)
    dc_T = rand(B, H) if cell == "lstm" else None

    def bwd():
        return launch.backward(cell, w_hh, h0, c0, None, False, y, ws, dy, dh_T, dc_T,
                               w_hr=w_hr, **reg)  # fmt: skip

    timer = _Timer(device, reps)
    out = {}
    out["triton_fwd_first_s"], fwd_ms = timer.first_and_median(lambda: fwd(False))
    _, fwd_save_ms = timer.first_and_median(lambda: fwd(True))
    out["triton_bwd_first_s"], bwd_ms = timer.first_and_median(bwd)
    plan_fwd = make_plan(H, B, G, dtype, device, proj_size=P or None)
    if case.barrier_too and _polls(plan_fwd):
        # the same forward waiting at a grid barrier instead of polling its exchange rows
        barrier = dataclasses.replace(plan_fwd, poll=False)
        _, fwd_barrier_ms = timer.first_and_median(
            lambda: launch.forward(
                cell, xg, w_hh, h0, c0, None, False, b_hn, False, plan=barrier
            )  # fmt: skip
        )
        out["triton_fwd_barrier_us"] = fwd_barrier_ms * 1e3 / T
    plan_bwd = make_plan(H, B, G, dtype, device, backward=True, proj_size=P or None)
    if case.barrier_too and _polls(plan_bwd):
        barrier_b = dataclasses.replace(plan_bwd, poll=False)
        _, bwd_barrier_ms = timer.first_and_median(
            lambda: launch.backward(
                cell, w_hh, h0, c0, None, False, y, ws, dy, dh_T, dc_T, plan=barrier_b
            )  # fmt: skip
        )
        out["triton_bwd_barrier_us"] = bwd_barrier_ms * 1e3 / T

    # failed polls per program and step (attempts beyond the first), from one more run of
    # each with the kernels' count on (a build of its own, untimed)
    if _polls(plan_fwd):
        out["triton_fwd_failed_polls"] = _failed_polls(
            lambda c: launch.forward(cell, xg, w_hh, h0, c0, None, False, b_hn, False,
                                     w_hr=w_hr, poll_counter=c, **reg),
            plan_fwd, T, device)  # fmt: skip
    if _polls(plan_bwd):
        out["triton_bwd_failed_polls"] = _failed_polls(
            lambda c: launch.backward(cell, w_hh, h0, c0, None, False, y, ws, dy, dh_T, dc_T,
                                      w_hr=w_hr, poll_counter=c, **reg),
            plan_bwd, T + 1, device)  # fmt: skip

    us = 1e3 / T
    out.update(
        triton_fwd_us=fwd_ms * us,
        triton_fwd_save_us=fwd_save_ms * us,
        triton_bwd_us=bwd_ms * us,
        plan_fwd=_plan(H, B, G, dtype, device, False, P),
        plan_bwd=_plan(H, B, G, dtype, device, True, P),
    )
    if baseline:
        out.update(_baseline(case, T, device, timer, rand, fwd_ms, fwd_save_ms + bwd_ms))
    return out


def _regularizers(case: Case, T: int, B: int, H: int, device) -> dict:
    """The launchers' regularizer keywords of a regularized case: masks drawn as
    gpurnn.regularized draws them, or LayerNorm's weights and biases (fp32, near their
    initial 1 and 0); else none."""
    import torch

    if case.layer_norm:
        from gpurnn.cells import GATES

        g = torch.Generator(device=device).manual_seed(1)

        def affine(n):
            return (1 + 0.1 * torch.randn(n, generator=g, device=device),
                    0.1 * torch.randn(n, generator=g, device=device))  # fmt: skip

        return dict(ln_hh=affine(GATES[case.cell] * H),
                    ln_c=affine(H) if case.cell == "lstm" else None)  # fmt: skip
    if not case.masks:
        return {}
    from gpurnn import masks

    torch.manual_seed(0)
    return dict(
        zoneout=0.1, zoneout_h=masks.draw((T, B, H), 0.1, device),
        zoneout_c=masks.draw((T, B, H), 0.1, device) if case.cell == "lstm" else None,
        recurrent_dropout=0.25, recurrent_mask=masks.draw((B, H), 0.75, device),
    )  # fmt: skip


def _failed_polls(run, plan, steps: int, device) -> float:
    """Failed polls per program and step of one launcher call `run(poll_counter)`."""
    import torch

    counter = torch.zeros(1, dtype=torch.int64, device=device)
    run(counter)
    return int(counter.item()) / (plan.n_h * plan.n_b * steps)


def _baseline(case: Case, T, device, timer, rand, fwd_ms, train_ms) -> dict:
    """torch.nn's layer (cuDNN on a GPU) at the case's shape: forward and training step."""
    import torch

    cell, B, H, P = case.cell, case.B, case.H, case.P
    H_out = P or H
    layer_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}[cell]
    layer = (layer_cls(H, H, proj_size=P) if P else layer_cls(H, H)).to(device, rand(1).dtype)
    x = rand(T, B, H).requires_grad_()
    dy_layer = rand(T, B, H_out)

    def layer_fwd():
        with torch.no_grad():
            layer(x)

    def layer_fwdbwd():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x)[0].backward(dy_layer)

    _, base_fwd_ms = timer.first_and_median(layer_fwd)
    _, base_fwdbwd_ms = timer.first_and_median(layer_fwdbwd)
    us = 1e3 / T
    return dict(
        baseline="cudnn" if device.type == "cuda" else "torch.nn",
        baseline_fwd_us=base_fwd_ms * us,
        baseline_fwdbwd_us=base_fwdbwd_ms * us,
        fwd_ratio=base_fwd_ms / fwd_ms,
        fwdbwd_ratio=base_fwdbwd_ms / train_ms,
    )


def _plan(H, B, G, dtype, device, backward, P=0) -> dict:
    """The layout the kernels pick for this case, for the record (what make_plan says)."""
    from gpurnn.kernels.triton.plan import make_plan

    kw = dict(proj_size=P) if P else {}
    return dataclasses.asdict(make_plan(H, B, G, dtype, device, backward=backward, **kw))


class _Timer:
    """First call (compile included) in seconds, then the median of `reps` calls in ms."""

    def __init__(self, device, reps: int):
        import torch

        self.torch, self.cuda, self.reps = torch, device.type == "cuda", reps

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def first_and_median(self, fn) -> tuple[float, float]:
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        first = time.perf_counter() - start
        fn()  # a second warm call: caches, clocks
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return first, statistics.median(times)
        Event = self.torch.cuda.Event
        events = [(Event(enable_timing=True), Event(enable_timing=True)) for _ in range(self.reps)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        self._sync()
        return first, statistics.median(b.elapsed_time(e) for b, e in events)


if __name__ == "__main__":
    sys.exit(main())
