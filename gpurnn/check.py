"""`python -m gpurnn check`: every available backend against the float64 reference.

Small sizes, fresh random inputs, outputs and every gradient; the table it prints says
the largest error of each (backend, cell, dtype, direction) case and whether it lies
within the dtype's tolerance.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import torch

from gpurnn import reference
from gpurnn.backends import available_backends, get_backend
from gpurnn.cells import GATES
from gpurnn.recurrence import recurrence

# (atol, rtol) against the float64 reference, per dtype of inputs and weights
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
# fp32 matmuls may run on TF32 tensor cores on a GPU (10-bit mantissa)
TF32_TOLERANCE = (5e-3, 5e-3)

CHECK_CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj")


@dataclasses.dataclass
class CheckResult:
    backend: str
    cell: str
    dtype: torch.dtype
    reverse: bool
    max_error: float | None  # worst |got - want| - tolerance margin; None when skipped
    ok: bool
    note: str = ""


def _random_inputs(cell, T, B, H, P, dtype, device, generator):
    proj = cell == "lstm_proj"
    cell = "lstm" if proj else cell
    G, H_out = GATES[cell], (P if proj else H)

    def rand(*shape, scale=1.0):
        t = scale * torch.randn(*shape, dtype=torch.float64, generator=generator)
        return t.to(device, dtype).requires_grad_()

    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[0] = T
    return (
        cell,
        {
            "xg": rand(T, B, G * H),
            "w_hh": rand(G * H, H_out, scale=H**-0.5),
            "h0": rand(B, H_out),
            "c0": rand(B, H) if cell == "lstm" else None,
            "b_hn": rand(H) if cell == "gru" else None,
            "w_hr": rand(P, H, scale=H**-0.5) if proj else None,
        },
        lengths.to(device),
    )


def _host(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def check_case(backend, cell_name, dtype, reverse, device, *, T=6, B=3, H=8, P=4, seed=0):
    """Runs one case on `backend` and the reference; returns (worst excess error, detail)."""
    g = torch.Generator().manual_seed(seed)
    cell, args, lengths = _random_inputs(cell_name, T, B, H, P, dtype, device, g)
    y, h_T, c_T = recurrence(
        cell,
        args["xg"],
        args["w_hh"],
        args["h0"],
        args["c0"],
        lengths=lengths,
        reverse=reverse,
        b_hn=args["b_hn"],
        w_hr=args["w_hr"],
        backend=backend,
    )
    outs = [y, h_T] + ([c_T] if c_T is not None else [])
    d_outs = [
        torch.randn(o.shape, dtype=torch.float64, generator=g).to(device, dtype) for o in outs
    ]
    torch.autograd.backward(outs, d_outs)

    ins = [_host(args[k]) for k in ("xg", "w_hh", "h0", "c0")]
    lens = lengths.cpu().numpy()
    want = reference.recurrence_forward(
        cell, *ins, lens, reverse, _host(args["b_hn"]), _host(args["w_hr"])
    )
    want_grads = reference.recurrence_backward(
        cell,
        *ins,
        lens,
        reverse,
        _host(args["b_hn"]),
        _host(args["w_hr"]),
        *[_host(d) for d in d_outs[:2]],
        _host(d_outs[2]) if len(d_outs) > 2 else None,
    )
    pairs = [(name, _host(o), w) for name, o, w in zip(("y", "h_T", "c_T"), outs, want)]
    pairs += [(f"d{k}", _host(args[k].grad), want_grads[k]) for k in args if args[k] is not None]

    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.float32 and device.type == "cuda":
        atol, rtol = TF32_TOLERANCE
    worst, worst_name, max_abs = -np.inf, "", 0.0
    for name, got, expected in pairs:
        if got is None or not np.isfinite(got).all():
            return np.inf, f"{name} not finite"
        err = np.abs(got - expected)
        excess = (err - (atol + rtol * np.abs(expected))).max()
        max_abs = max(max_abs, float(err.max()))
        if excess > worst:
            worst, worst_name = float(excess), name
    return worst, f"max |err| {max_abs:.1e} (tightest: {worst_name})"


def run_check(device: torch.device | None = None, dtypes=None, backends=None, progress=None):
    """Checks each available backend on `device`. Returns a list of CheckResult.

    `progress(results, seconds, done, total)`, if given, is called as each backend x cell x
    dtype finishes (both directions): on a GPU the first call of a kernel variant compiles
    it, and a silent minute is indistinguishable from a hang."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtypes is None:
        # the dtypes models train in first: a run stopped early has checked those
        dtypes = (
            [torch.bfloat16, torch.float16, torch.float32]
            if device.type == "cuda"
            else [torch.float64, torch.float32]
        )
    status = available_backends()
    names = list(backends or status)
    total = sum(len(CHECK_CELLS) * len(dtypes) for n in names if status[n] is None)
    done = 0
    results = []
    for name in names:
        if status[name] is not None:
            results.append(
                CheckResult(name, "-", None, False, None, True, f"unavailable: {status[name]}")
            )
            continue
        backend = get_backend(name)
        for cell, dtype in itertools.product(CHECK_CELLS, dtypes):
            start = time.perf_counter()
            group = [_check_one(name, backend, cell, dtype, r, device) for r in (False, True)]
            results += group
            done += 1
            if progress is not None:
                progress(group, time.perf_counter() - start, done, total)
    return results


def _check_one(name, backend, cell, dtype, reverse, device) -> CheckResult:
    base_cell = "lstm" if cell == "lstm_proj" else cell
    why_not = backend.unsupported_reason(base_cell, device, dtype, cell == "lstm_proj")
    if why_not is not None:
        return CheckResult(name, cell, dtype, reverse, None, True, f"not supported: {why_not}")
    try:
        excess, detail = check_case(name, cell, dtype, reverse, device)
    except Exception as e:  # noqa: BLE001 - a backend that raises fails its case; go on
        error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return CheckResult(name, cell, dtype, reverse, float("inf"), False, f"error: {error}")
    return CheckResult(name, cell, dtype, reverse, excess, excess <= 0, detail)


def format_progress(group, seconds: float, done: int, total: int) -> str:
    """One line for one backend x cell x dtype (both directions), as it finishes."""
    first = group[0]
    dtype = str(first.dtype).replace("torch.", "")
    checked = [r for r in group if r.max_error is not None]
    if not checked:
        verdict = first.note[:100]
    else:
        verdict = "ok" if all(r.ok for r in checked) else "FAILED"
        worst = max(checked, key=lambda r: r.max_error)  # closest to its tolerance
        verdict += f"  {'rev' if worst.reverse else 'fwd'} {worst.note}"
    width = len(str(total))
    return (
        f"[{done:>{width}}/{total}] {first.backend:7} {first.cell:10} {dtype:9} "
        f"{seconds:6.2f} s  {verdict}"
    )


def format_table(results) -> str:
    lines = [f"{'backend':8} {'cell':10} {'dtype':9} {'dir':4} {'ok':4} detail"]
    for r in results:
        dtype = str(r.dtype).replace("torch.", "") if r.dtype is not None else "-"
        direction = "rev" if r.reverse else "fwd"
        ok = "-" if r.max_error is None else ("yes" if r.ok else "NO")
        lines.append(f"{r.backend:8} {r.cell:10} {dtype:9} {direction:4} {ok:4} {r.note}")
    return "\n".join(lines)
