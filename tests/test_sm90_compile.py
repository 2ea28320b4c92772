"""Every kernel variant compiles for sm_90 (Hopper) with no register spills and shared
memory within the device limit. Needs no GPU: triton.compile targets GPUTarget("cuda", 90, 32)
and the cubin's resource usage is read with the cuobjdump that Triton ships (or CUDA's).

The variants are the ones `make_plan` can pick on an H100/H200 at the sizes it is tuned for:
each cell x dtype (bf16, fp16, fp32) x h0/c0 given or not x forward/backward, in the
weights-resident mode at the largest H that make_plan keeps resident and in the streamed
mode at a large H, with the persistent grid barrier compiled in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from gpurnn._kernels.tl import recurrence as R  # noqa: E402

SMEM_LIMIT = 227 * 1024  # per-block opt-in maximum on sm_90
TORCH_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _tool(name: str) -> str | None:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    for p in (here, shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


CUOBJDUMP = _tool("cuobjdump")
pytestmark = pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (Triton ships one)")


def _signature(fn, dt: str, pointers_fp32: tuple[str, ...]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            sig[name] = ("*i64" if name == "len_ptr" else "*i32" if name == "sync_ptr"
                         else "*fp32" if name in pointers_fp32 else "*" + dt)  # fmt: skip
        elif name in ("T", "B", "s_begin", "s_end", "spin_max"):
            sig[name] = "i32"
    return sig


def compile_variant(cell, dt, H, *, backward, has_h0, resident, BLOCK_B=16, BH=8, num_stages=1,
                    num_warps=4, KC=None):  # fmt: skip
    """Compile one variant for sm_90; returns dict(regs, stack, local, spills, smem)."""
    G = R.GATES[cell]
    KC = KC or R.KC_GPU
    common = dict(
        CELL=R.CELL_CODE[cell], G=G, NW=len(R.WS_FIELDS[cell]), H=H, KC=KC,
        NKC=triton.cdiv(H, KC), BH=BH, BLOCK_B=BLOCK_B, RESIDENT=resident,
        HAS_H0=has_h0, HAS_C0=has_h0 and cell == "lstm", HAS_LEN=True, REVERSE=False,
        USE_BARRIER=True, PREC="tf32", ACC=tl.float32,
    )  # fmt: skip
    if backward:
        fn = R._recurrence_bwd_kernel
        sig = _signature(fn, dt, ("dhs_ptr", "dcs_ptr"))
        constexprs = common
    else:
        fn = R._recurrence_fwd_kernel
        sig = _signature(fn, dt, ("hs_ptr", "cs_ptr"))
        constexprs = dict(common, GP=R._next_pow2(G), HAS_BHN=cell == "gru", SAVE=True)
    src = triton.compiler.ASTSource(fn, sig, constexprs)
    target = triton.backends.compiler.GPUTarget("cuda", 90, 32)
    opts = dict(num_warps=num_warps)
    if num_stages is not None:
        opts["num_stages"] = num_stages
    k = triton.compile(src, target=target, options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert m, out
    regs, stack, shared, local = map(int, m.groups())
    # ptxas spills show as local memory traffic in SASS (STL/LDL)
    sass = k.asm.get("sass") if isinstance(k.asm, dict) else None
    spill_ops = None
    nvdisasm = _tool("nvdisasm")
    if nvdisasm:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
        spill_ops = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    return dict(regs=regs, stack=stack, local=local, spill_ops=spill_ops,
                smem=k.metadata.shared + shared)  # fmt: skip


def _max_resident_h(cell, dt, BH, backward):
    """Largest H (multiple of 64, <= 1024) that make_plan keeps resident at this BH."""
    G = R.GATES[cell]
    best = None
    for H in range(64, 1025, 64):
        if R.weight_regs(H, G, BH, TORCH_DT[dt], backward) <= R.WEIGHT_REGS:
            best = H
    return best


def _variants():
    """(cell, dtype, H, backward, has_h0, resident, BH, KC) for every case make_plan can
    pick on sm_90: resident at BH 8/16 (the largest H it allows), streamed at BH 8/16
    (H=4096) with stream_kc's chunk; h0/c0 given and absent for the resident ones."""
    out = []
    for cell in R.CELL_CODE:
        G = R.GATES[cell]
        for dt in TORCH_DT:
            for backward in (False, True):
                for BH in (8, 16):
                    H = _max_resident_h(cell, dt, BH, backward)
                    if H is None:
                        continue
                    for has_h0 in (True, False) if BH == 8 else (True,):
                        out.append((cell, dt, H, backward, has_h0, True, BH, R.KC_GPU))
                for BH in (8, 16):
                    kc = R.stream_kc(G, BH, backward, TORCH_DT[dt])
                    out.append((cell, dt, 4096, backward, True, False, BH, kc))
    return out


VARIANTS = _variants()


def _id(v):
    cell, dt, H, backward, has_h0, resident, BH, KC = v
    return (f"{cell}-{dt}-H{H}-{'bwd' if backward else 'fwd'}-{'h0' if has_h0 else 'noh0'}-"
            f"{'res' if resident else 'stream'}-BH{BH}-KC{KC}")  # fmt: skip


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
    """Every variant's resource usage, compiled by one subprocess per CPU core."""
    workers = max(1, min(4, os.cpu_count() or 1))
    chunks = [list(range(i, len(VARIANTS), workers)) for i in range(workers)]
    results: dict[int, dict] = {}
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(_compile_in_subprocess, chunks):
            results.update(part)
    return results


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=[_id(v) for v in VARIANTS])
def test_compiles_for_sm90_without_spills(resources, index):
    r = resources[index]
    print(_id(VARIANTS[index]), r)
    assert r["stack"] == 0 and r["local"] == 0, f"register spills / stack frame: {r}"
    if r["spill_ops"] is not None:
        assert r["spill_ops"] == 0, f"STL/LDL in SASS: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} B > {SMEM_LIMIT} B"


if __name__ == "__main__":
    # the driver: compile the variants named by index, print their resources as JSON
    report = {}
    for i in map(int, sys.argv[1:]):
        cell, dt, H, backward, has_h0, resident, BH, KC = VARIANTS[i]
        report[i] = compile_variant(cell, dt, H, backward=backward, has_h0=has_h0,
                                    resident=resident, BH=BH, KC=KC)  # fmt: skip
    print(json.dumps(report))
