"""The Triton kernels compiled for sm_90 (Hopper) on any machine, their resources and the
counts of their step loops: the table every kernel change is judged by without a GPU.

`triton.compile` targets GPUTarget("cuda", 90, 32) as `make_plan` lays each variant out on
an H100 (132 SMs); the cubin's resources come from the cuobjdump Triton ships, its SASS from
nvdisasm (`gpurnn.bench.sass` counts the step loop). Variants: every cell at the headline
size (H=768, B=16, bf16) forward and backward, plus one of each other kind of plan (on
chip, 64-row batch tiles, streamed weights, fp16/fp32), the LSTM with projection (its
own kernels; a sixth field P names the projection), and the regularized step at the
headline size and the projected one's (a seventh field: "masks", zoneout in training and
recurrent dropout fused into the step; "ln", LayerNorm of W_hh h and, for the LSTM, of c).
fp32 compiles as the backend runs it (tf32 dots). Every compile-time switch is passed
explicitly, as a launch binds it (a defaulted one left out of an ASTSource compiles
differently).

    python -m gpurnn.bench.sm90                    # the table (and one JSON line)
    python -m gpurnn.bench.sm90 --record main      # into benchmarks/sass_counts.json as "main"

Each record also says what the step cost model (`gpurnn.bench.step_model`) needs to know
of the plan: warps, grid barriers per step, whether the exchange is polled, and how many
times a streamed plan's runtime K loop runs (`inner_repeats`). tests/test_sm90_compile.py
asserts the ceilings the step loops meet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl

from gpurnn.bench import sass
from gpurnn.cells import GATES
from gpurnn.kernels.triton import launch
from gpurnn.kernels.triton.backward import _recurrence_bwd_kernel
from gpurnn.kernels.triton.cell_math import CELL_CODE
from gpurnn.kernels.triton.exchange import _SENTINEL
from gpurnn.kernels.triton.forward import _recurrence_fwd_kernel
from gpurnn.kernels.triton.plan import Plan, _next_pow2, _polls, make_plan
from gpurnn.kernels.triton.projected import _lstmp_bwd_kernel, _lstmp_fwd_kernel

SMEM_LIMIT = 227 * 1024  # per-block opt-in maximum on sm_90
H100_SMS = 132
TORCH_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUOBJDUMP = sass.tool("cuobjdump")

# (cell, dtype, H, B, backward)
VARIANTS = [
    *[(cell, "bf16", 768, 16, bwd) for cell in CELL_CODE for bwd in (False, True)],
    ("lstm", "bf16", 768, 1, False),
    ("lstm", "fp16", 768, 16, False),
    ("lstm", "fp16", 768, 16, True),
    ("lstm", "fp32", 512, 16, False),
    ("lstm", "fp32", 512, 16, True),
    ("lstm", "bf16", 768, 64, False),
    ("lstm", "bf16", 768, 64, True),
    ("lstm", "bf16", 1024, 256, False),
    ("lstm", "bf16", 1024, 256, True),
    ("lstm", "bf16", 2048, 8, False),
    ("lstm", "bf16", 2048, 8, True),
    ("lstm", "bf16", 128, 1, False),
    ("lstm", "bf16", 128, 1, True),
    ("gru", "bf16", 128, 1, True),
    ("rnn_tanh", "bf16", 32, 1, False),
    ("rnn_tanh", "bf16", 256, 4, True),
    # (cell, dtype, H, B, backward, P): LSTM with projection
    ("lstm", "bf16", 1024, 16, False, 256),
    ("lstm", "bf16", 1024, 16, True, 256),
    ("lstm", "bf16", 1024, 64, False, 256),
    ("lstm", "bf16", 1024, 64, True, 256),
    # (cell, dtype, H, B, backward, P, regularizers): zoneout masks + recurrent dropout
    # ("masks"), LayerNorm (of W_hh h, and of c for the LSTM: "ln"); the projected LSTM's
    *[
        (cell, "bf16", 768, 16, bwd, 0, reg)
        for reg in ("masks", "ln")
        for cell in ("lstm", "gru")
        for bwd in (False, True)
    ],  # fmt: skip
    *[
        ("lstm", "bf16", 1024, 16, bwd, 256, reg)
        for reg in ("masks", "ln")
        for bwd in (False, True)
    ],
]


def _fields(v):
    """(cell, dtype, H, B, backward, P, regularizers), P = 0 without projection,
    regularizers "" (none), "masks" or "ln"."""
    return (*v, 0, "")[:7] if len(v) == 5 else (*v, "")[:7]


def _id(v):
    cell, dt, H, B, bwd, P, reg = _fields(v)
    proj = f"-P{P}" if P else ""
    masks = f"-{reg}" if reg else ""
    return f"{cell}-{dt}-H{H}{proj}-B{B}{masks}-{'bwd' if bwd else 'fwd'}"


def plan_for(v) -> Plan:
    cell, dt, H, B, bwd, P, _ = _fields(v)
    return make_plan(H, B, GATES[cell], TORCH_DT[dt], torch.device("cuda"), backward=bwd,
                     sm_count=H100_SMS, proj_size=P or None)  # fmt: skip


# pointers in the accumulation dtype (LayerNorm's workspace too), and the packed masks
_FP32_PTRS = ("hs_ptr", "cs_ptr", "dhs_ptr", "dcs_ptr", "rates_ptr", "lnw_ptr", "lnb_ptr",
              "lncw_ptr", "lncb_ptr", "st_ptr", "lng_ptr")  # fmt: skip
_BIT_PTRS = ("zh_ptr", "zc_ptr", "rmask_ptr")


def _signature(fn, dt: str, reg: str = "") -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            sig[name] = ("*i64" if name == "len_ptr" else "*i32" if name == "sync_ptr"
                         else "*fp32" if name in _FP32_PTRS or (name == "ws_ptr" and reg == "ln")
                         else "*u8" if name in _BIT_PTRS
                         else "*" + dt)  # fmt: skip
        elif name in ("T", "B", "nrows", "s_begin", "s_end", "wait_bound"):
            sig[name] = "i32"
    return sig


def compile_variant(v) -> dict:
    """Compile one variant for sm_90 as make_plan lays it out; resources and step-loop counts."""
    cell, dt, H, B, bwd, P, reg = _fields(v)
    plan = plan_for(v)
    G = GATES[cell]
    kw = dict(
        CELL=CELL_CODE[cell], G=G, NW=len(launch.WS_FIELDS[cell]), H=H, KC=plan.KC,
        NKC=triton.cdiv(H, plan.KC), BH=plan.BH, BLOCK_B=plan.BLOCK_B, RESIDENT=plan.resident,
        ON_CHIP=plan.on_chip, HAS_LEN=True, REVERSE=False, ACC=tl.float32,
        PREC=launch._prec(TORCH_DT[dt], "tf32"),  # as the backend runs fp32: tf32 dots
        USE_BARRIER=plan.persistent and plan.nprog > 1 and not plan.on_chip,
    )  # fmt: skip
    if P:
        del kw["CELL"]
        kw.update(P=P, BP=plan.BP, NKP=triton.cdiv(P, plan.KC), PHASES=3, GP=4,
                  USE_BARRIER=plan.persistent and plan.nprog > 1)  # fmt: skip
        if bwd:
            fn = _lstmp_bwd_kernel
            kw.update(CHUNKS_PER_TRIP=plan.chunks_per_trip)
        else:
            fn = _lstmp_fwd_kernel
            kw.update(SAVE=True, CHUNKS_PER_TRIP=plan.chunks_per_trip)
    elif bwd:
        fn = _recurrence_bwd_kernel
        kw.update(CHUNKS_PER_TRIP=plan.chunks_per_trip, GP=_next_pow2(G),
                  KSPLIT=plan.k_split if _polls(plan) else 1)  # fmt: skip
    else:
        fn = _recurrence_fwd_kernel
        kw.update(GP=_next_pow2(G), SAVE=True)
    kw.update(POLL=_polls(plan), ASM=True, SENTINEL=_SENTINEL[TORCH_DT[dt]], COUNT_POLLS=False)
    ln = reg == "ln"
    kw.update(ZONEOUT=1 if reg == "masks" else 0, RDROP=reg == "masks", LN=ln,
              LN_C=ln and cell == "lstm", LN_STOP=0, NHP=_next_pow2(plan.n_h) if ln else 1,
              NS=launch._ln_numbers(cell == "lstm") if ln else 0,
              LN_SENTINEL=_SENTINEL[torch.float32] if ln else 0)  # fmt: skip
    if ln:
        kw["NW"] += G
    kw["USE_BARRIER"] = kw["USE_BARRIER"] and not kw["POLL"]
    sig = _signature(fn, dt, reg)
    # torch allocations are 16-byte aligned; the JIT tells the compiler so, and so do we
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in sig if n.endswith("_ptr")}  # fmt: skip
    src = triton.compiler.ASTSource(fn, sig, kw, attrs)
    k = triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=plan.num_warps, num_stages=1))  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    regs, stack, shared, local = map(int, m.groups())
    # a streamed plan's K loop runs H/KC times a step (P/KC for the projection's phase)
    repeats = 1 if plan.resident or plan.on_chip else triton.cdiv(H, plan.KC)
    loop = sass.count(sass.step_loop(sass.parse(sass.disassemble(k.asm["cubin"])), repeats))
    mode = "chip" if plan.on_chip else "res" if plan.resident else "stream"
    desc = f"BH{plan.BH} BB{plan.BLOCK_B} n{plan.nprog} {mode} w{plan.num_warps}"
    if P:
        desc += f" BP{plan.BP}"
    if bwd:
        desc += f" cpt{plan.chunks_per_trip}"
        if kw.get("KSPLIT", 1) > 1:
            desc += f" ks{kw['KSPLIT']}"
    if kw.get("POLL"):
        desc += " poll"
    # per step: the projected kernels' two phases; LayerNorm's exchanges of statistics, h's
    per_step = (2 if P else 1) + kw["LN"] + kw["LN_C"]
    grid_barriers = per_step if kw["USE_BARRIER"] else 0
    return dict(plan=desc, regs=regs, stack=stack, local=local, smem=k.metadata.shared + shared,
                num_warps=plan.num_warps, backward=bool(bwd), polled=bool(kw["POLL"]),
                grid_barrier=grid_barriers, inner_repeats=repeats,
                retry=retry_of(kw["POLL"], P),
                smem_step=loop["smem_bytes"] * plan.num_warps, **loop)  # fmt: skip


def retry_of(polled: bool, P: int) -> str:
    """Where a polled kernel's failed poll re-enters: "loads" only the loads (the plain
    kernels check each tile, or each backward wave, before using it), "" the whole step
    (the projected LSTM's kernels: reload, product, checks). The step cost model prices the
    two differently; tests/test_sm90_compile.py checks the SASS agrees (`retry_loops`)."""
    return "loads" if polled and not P else ""


def _compile_in_subprocess(indices: list[int]) -> dict[int, dict]:
    """Compiles VARIANTS[indices] in a fresh interpreter without TRITON_INTERPRET (which the
    test suite sets, and under which kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "gpurnn.bench.sm90", "--indices", ",".join(map(str, indices))],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"sm_90 compile driver failed:\n{out.stderr[-4000:]}")
    return {int(k): v for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


def compile_all(indices: list[int] | None = None, jobs: int | None = None) -> dict[int, dict]:
    """VARIANTS[indices] (all by default) compiled by `jobs` subprocesses (one per core, at
    most 4): {index: record}."""
    indices = list(range(len(VARIANTS))) if indices is None else list(indices)
    jobs = max(1, min(jobs or 4, os.cpu_count() or 1, len(indices)))
    chunks = [indices[i::jobs] for i in range(jobs)]
    results: dict[int, dict] = {}
    with ThreadPoolExecutor(jobs) as pool:
        for part in pool.map(_compile_in_subprocess, chunks):
            results.update(part)
    return results


def table(results: dict[int, dict]) -> str:
    cols = (
        "plan",
        "regs",
        "smem",
        "trips",
        "loads",
        "other_ldg",
        "bar",
        "mma",
        "mma_depth",
        "mma_units",
        "smem_step",
        "own_trips",
        "spills",
    )

    def row(name, cells):
        return f"{name:32s} " + " ".join(f"{x:>26}" if c == "plan" else f"{x:>9}"
                                         for c, x in zip(cols, cells))  # fmt: skip

    lines = [row("variant", cols)]
    for i, v in enumerate(VARIANTS):
        if i in results:
            lines.append(row(_id(v), [results[i][c] for c in cols]))
    return "\n".join(lines)


def record(results: dict[int, dict], label: str, path=None) -> None:
    """The counts under `label` in benchmarks/sass_counts.json (by variant id), for the step
    cost model: "main" for the kernels as they are, a commit for the kernels a GPU measured."""
    path = path or sass.COUNTS_JSON
    counts = sass.load_counts(path)
    counts[label] = {_id(VARIANTS[i]): r for i, r in sorted(results.items())}
    with open(path, "w") as f:
        f.write(json.dumps(counts, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--indices", help="comma-separated VARIANTS indices (default: all)")
    parser.add_argument("--jobs", type=int, default=4, help="compile processes (default: 4)")
    parser.add_argument(
        "--record",
        metavar="LABEL",
        help="store the counts in benchmarks/sass_counts.json under LABEL",
    )
    args = parser.parse_args(argv)
    if args.indices:
        # a worker of compile_all: this process compiles, one JSON line out
        idx = [int(i) for i in args.indices.split(",")]
        print(json.dumps({i: compile_variant(VARIANTS[i]) for i in idx}))
        return 0
    if CUOBJDUMP is None or sass.tool("nvdisasm") is None:
        print("sm90: cuobjdump/nvdisasm not found (Triton ships them)")
        return 2
    results = compile_all(jobs=args.jobs)
    print(table(results))
    if args.record:
        record(results, args.record)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
