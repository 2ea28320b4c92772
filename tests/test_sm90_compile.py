"""The triton kernels compile for sm_90 (Hopper) as `make_plan` lays them out on an H100,
with no register spills, shared memory within the device limit, and a step loop that has
the shape the design promises. Needs no GPU: triton.compile targets GPUTarget("cuda", 90, 32),
the cubin's resources come from the cuobjdump Triton ships, and its SASS from nvdisasm
(tests/sass.py counts the step loop).

Variants: every cell at the headline size (H=768, B=16, bf16) forward and backward, plus one
of each other kind of plan (on chip, 64-row batch tiles, streamed weights, fp16/fp32), and
the LSTM with projection (its own kernels; a sixth field P names the projection). The
table of counts is printed (pytest -s) and written by `python -m tests.test_sm90_compile`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from gpurnn.kernels.triton import launch  # noqa: E402
from gpurnn.kernels.triton.backward import _recurrence_bwd_kernel  # noqa: E402
from gpurnn.kernels.triton.cell_math import CELL_CODE  # noqa: E402
from gpurnn.kernels.triton.exchange import _SENTINEL  # noqa: E402
from gpurnn.kernels.triton.forward import _recurrence_fwd_kernel  # noqa: E402
from gpurnn.kernels.triton.plan import Plan, _next_pow2, _polls, make_plan  # noqa: E402
from gpurnn.kernels.triton.projected import _lstmp_bwd_kernel, _lstmp_fwd_kernel  # noqa: E402

from gpurnn.cells import GATES  # noqa: E402
from tests import sass  # noqa: E402

SMEM_LIMIT = 227 * 1024  # per-block opt-in maximum on sm_90
H100_SMS = 132
TORCH_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUOBJDUMP = sass.tool("cuobjdump")
pytestmark = pytest.mark.skipif(
    CUOBJDUMP is None or sass.tool("nvdisasm") is None,
    reason="cuobjdump/nvdisasm not found (Triton ships them)",
)

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
]


def _fields(v):
    """(cell, dtype, H, B, backward, P), P = 0 without projection."""
    return (*v, 0) if len(v) == 5 else tuple(v)


def _id(v):
    cell, dt, H, B, bwd, P = _fields(v)
    proj = f"-P{P}" if P else ""
    return f"{cell}-{dt}-H{H}{proj}-B{B}-{'bwd' if bwd else 'fwd'}"


def plan_for(v) -> Plan:
    cell, dt, H, B, bwd, P = _fields(v)
    return make_plan(H, B, GATES[cell], TORCH_DT[dt], torch.device("cuda"), backward=bwd,
                     sm_count=H100_SMS, proj_size=P or None)  # fmt: skip


def _signature(fn, dt: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            sig[name] = ("*i64" if name == "len_ptr" else "*i32" if name == "sync_ptr"
                         else "*fp32" if name in ("hs_ptr", "cs_ptr", "dhs_ptr", "dcs_ptr")
                         else "*" + dt)  # fmt: skip
        elif name in ("T", "B", "nrows", "s_begin", "s_end", "wait_bound"):
            sig[name] = "i32"
    return sig


def compile_variant(v) -> dict:
    """Compile one variant for sm_90 as make_plan lays it out; resources and step-loop counts."""
    cell, dt, H, B, bwd, P = _fields(v)
    plan = plan_for(v)
    G = GATES[cell]
    kw = dict(
        CELL=CELL_CODE[cell], G=G, NW=len(launch.WS_FIELDS[cell]), H=H, KC=plan.KC,
        NKC=triton.cdiv(H, plan.KC), BH=plan.BH, BLOCK_B=plan.BLOCK_B, RESIDENT=plan.resident,
        ON_CHIP=plan.on_chip, HAS_LEN=True, REVERSE=False, PREC="ieee", ACC=tl.float32,
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
    kw.update(POLL=_polls(plan), ASM=True, SENTINEL=_SENTINEL[TORCH_DT[dt]])
    kw["USE_BARRIER"] = kw["USE_BARRIER"] and not kw["POLL"]
    sig = _signature(fn, dt)
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
    loop = sass.count(sass.step_loop(sass.parse(sass.disassemble(k.asm["cubin"]))))
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
    return dict(plan=desc, regs=regs, stack=stack, local=local, smem=k.metadata.shared + shared,
                **loop)  # fmt: skip


def _compile_in_subprocess(indices: list[int]) -> dict[int, dict]:
    """Compiles VARIANTS[indices] in a fresh interpreter without TRITON_INTERPRET (which
    tests/conftest.py sets for this process, and under which kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.test_sm90_compile", *map(str, indices)],
        capture_output=True, text=True, env=env, timeout=1800,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"sm_90 compile driver failed:\n{out.stderr[-4000:]}")
    return {int(k): v for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def resources() -> dict[int, dict]:
    """Every variant compiled, by one subprocess per CPU core; the table printed."""
    workers = max(1, min(4, os.cpu_count() or 1))
    chunks = [list(range(i, len(VARIANTS), workers)) for i in range(workers)]
    results: dict[int, dict] = {}
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(_compile_in_subprocess, chunks):
            results.update(part)
    print("\n" + table(results))
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


IDS = [_id(v) for v in VARIANTS]


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=IDS)
def test_compiles_for_sm90_without_spills(resources, index):
    r = resources[index]
    # (a small stack frame outside the loop is ptxas's business; spills inside it are ours)
    assert r["local"] == 0 and r["spills"] == 0, f"spills in the step loop: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} B > {SMEM_LIMIT} B"


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=IDS)
def test_step_loop_shape(resources, index):
    """Ceilings the step loops meet (and the first kernels did not: 12 dependent h loads and
    57 block barriers per forward step at LSTM H=768, 48 dgates round trips and W_hh loads in
    the backward's loop)."""
    cell, dt, H, B, bwd, P = _fields(VARIANTS[index])
    r = resources[index]
    plan = plan_for(VARIANTS[index])
    if P:
        # two phases (and two grid barriers) per step: the ceilings below are the
        # one-phase kernels'; the projected kernels are held to no spills only
        return
    if plan.on_chip:
        # h (dgates) never leave the program: no exchange loads at all
        assert r["loads"] == 0 and r["trips"] == 0, r
        return
    if plan.resident:
        # weights stay in shared memory: the only other global loads are the step's own
        # inputs (xg forward; dy, the saved fields and c/h_{t-1} backward)
        assert r["other_ldg"] <= (4 if not bwd else 16), r
    if not bwd and plan.resident and plan.BLOCK_B == 16:
        # every h load of the step is issued before the first is used (ptxas sometimes
        # consumes the first one early: 2 waves at most)
        assert r["trips"] <= 2, f"the forward's h loads of a step wait on each other: {r}"
        # polled exchange (no grid barrier): + the NaN check's block reduction, + the rare
        # path's element-wise check
        assert r["bar"] <= (14 if _polls(plan) else 8), r
        assert r["spin_loops"] == (0 if _polls(plan) else 1), "a grid barrier is left"
    if plan.resident and plan.BLOCK_B == 16 and r["mma"]:
        # one accumulator per K chunk: no MMA waits on more than a chunk's worth of others
        # (folded into one accumulator, the first kernels chained all H/16 of them: 48)
        assert r["mma_depth"] <= 2 * plan.KC // 16, f"one long chain of dependent MMAs: {r}"
    if bwd and plan.resident and plan.BLOCK_B == 16:
        # at most one round trip per K chunk of every gate (the first kernel: one per 64-wide
        # chunk of each gate, 48 at LSTM H=768), and no warp repeats another's MMAs: G*H/16
        # k-steps of one 8-column tile, spread over the gates' warps
        assert r["trips"] <= triton.cdiv(H, plan.KC), r
        if GATES[cell] == 4:
            assert r["mma"] <= H // 16, r


if __name__ == "__main__":
    # the driver: compile the variants named by index (all with none), print them as JSON
    idx = list(map(int, sys.argv[1:])) or list(range(len(VARIANTS)))
    report = {i: compile_variant(VARIANTS[i]) for i in idx}
    if len(sys.argv) == 1:
        print(table(report))
    print(json.dumps(report))
