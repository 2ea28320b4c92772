"""Reading the step loop of a compiled kernel from its SASS, without a GPU.

A persistent recurrence kernel's speed is set by its time-step loop: how many memory round
trips wait on each other inside one step, how many block barriers, whether weights are loaded
from global memory inside it, whether anything spills. `nvdisasm` (shipped with Triton) turns
the cubin of an sm_90 compile into SASS; this module finds the step loop (the largest loop,
i.e. the largest backward branch) and counts:

  trips      dependent waves of exchange loads: the loads that read other programs' data
             (`.cg` or polled, shown as LDG...STRONG.GPU / STRONG.SYS) issued before any of
             them is consumed form one wave; a load issued after an earlier one's result was
             used starts another.
  loads      exchange loads in the loop
  other_ldg  other global loads in the loop (own inputs, workspace; streamed weights)
  own_trips  exposed waves of those other loads: a wave whose result the step itself waits
             for, with no exchange load in flight beside it, is a memory round trip of its
             own (the backward's saved fields from HBM). A load prefetched for the next step
             (its result first used after the back edge) or one in flight with an exchange
             wave costs nothing extra.
  bar        block barriers (BAR.SYNC)
  mma        tensor-core instructions (HMMA / HGMMA)
  mma_units  the tensor-core work of one warp in m16n8k16 MMAs (an HGMMA m64nNk16 is N/2 of
             them, shared by the 4 warps of its warpgroup): issue time, where latency is
             `mma_depth`
  mma_depth  tensor-core instructions on the longest dependency path through one step: a
             chain of MMAs accumulating into one register tile costs its full latency per
             instruction (about 30 cycles each on sm_90), independent chains overlap
  spills     local-memory traffic (LDL / STL)
  smem_bytes shared-memory bytes one warp moves per step: ldmatrix (LDSM/STSM), LDS/STS,
             and the wgmma operands read from shared memory (an HGMMA's A tile when it is a
             descriptor, and its B tile, shared by the 4 warps of its warpgroup); times the
             warps, what a program's step costs in shared-memory bandwidth
  spin_loops polling loops (left out of every other count): the grid barrier's spin (one
             load, of its counter), a polled step's retry loop (its exchange loads again)
  retry_loops polling loops that load exchanged data (more than one load): where a failed
             poll of the plain kernels re-enters, at the loads, not at the product (the
             projected backward's element-wise recheck after a NaN product is one too)

A loop nested in the step loop that is not a poll is the streamed plans' runtime K loop
(weights streamed from L2 chunk by chunk); it runs H/KC times a step, which `step_loop` is
told (`inner_repeats`) since the SASS does not say it: its body is counted that many times.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from gpurnn.bench.results import REPO_ROOT

# the counts of each compiled variant, by label (a commit, or "main"): written by
# gpurnn.bench.sm90 --record, read by the step cost model (gpurnn.bench.step_model)
COUNTS_JSON = REPO_ROOT / "benchmarks" / "sass_counts.json"


def load_counts(path: Path = COUNTS_JSON) -> dict[str, dict[str, dict]]:
    """{label (a commit, or "main"): {variant id: counts}}."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def tool(name: str) -> str | None:
    import shutil

    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    for p in (here, shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("nvdisasm"), "-c", "-g", f.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip


def parse(sass: str) -> list[tuple]:
    """[(kind, opcode or label, operand text)] in program order; kind 'ins' or 'label'."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not m:
            lab = re.match(r"^\.(L_x_\d+):", line.strip())
            if lab:
                out.append(("label", lab.group(1), ""))
            continue
        body = re.sub(r"^\{?\s*", "", m.group(2).strip())
        body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body)
        op, _, rest = body.partition(" ")
        out.append(("ins", op, rest))
    return out


def _loops(ins: list[tuple]) -> list[tuple[int, int]]:
    """(first, last) index of every loop (a backward branch to a label)."""
    labels = {x[1]: i for i, x in enumerate(ins) if x[0] == "label"}
    out = []
    for i, x in enumerate(ins):
        if x[0] == "ins" and x[1].startswith("BRA"):
            m = re.search(r"`\(\.(L_x_\d+)\)", x[2])
            if m and labels.get(m.group(1), i) < i:
                out.append((labels[m.group(1)], i))
    return out


def _polls(body: list[tuple]) -> bool:
    """A polling loop inside the step loop: relaxed (volatile, STRONG.SYS) loads and no
    tensor-core work. The grid barrier's spin on its counter, a plain kernel's retry loop
    (the tiles still pending loaded again), the projected backward's element-wise recheck.
    (A retry loop around a polled step's loads and dots, as the projected kernels have,
    holds the step's whole data path and counts as the step.)"""
    ops = [x[1] for x in body if x[0] == "ins"]
    return any(o.startswith("LDG") and "STRONG.SYS" in o for o in ops) and not any(
        o.startswith(("HMMA", "HGMMA", "FFMA", "DFMA")) for o in ops
    )


def step_loop(ins: list[tuple], inner_repeats: int = 1) -> list[tuple]:
    """The instructions of one step, in program order: the largest loop without its polling
    loops (`count` reports them apart as spin_loops), every other loop nested in it (a
    streamed plan's runtime K loop) unrolled `inner_repeats` times."""
    loops = _loops(ins)
    if not loops:
        return []
    a, b = max(loops, key=lambda ab: ab[1] - ab[0])
    inner = [(x, y) for x, y in loops if a < x and y < b]
    spins = [(x, y) for x, y in inner if _polls(ins[x : y + 1])]
    repeated = [(x, y) for x, y in inner if (x, y) not in spins] if inner_repeats > 1 else []
    body, i = [], a
    while i <= b:
        if any(p <= i <= q for p, q in spins):
            i += 1
            continue
        loop = next(((x, y) for x, y in repeated if x == i), None)
        if loop is None:
            body.append(ins[i])
            i += 1
            continue
        x, y = loop
        one = [z for j, z in enumerate(ins[x : y + 1], x) if not any(p <= j <= q for p, q in spins)]
        body += one * inner_repeats
        i = y + 1
    return body + [("spin", str(_exchange_loads(ins[x : y + 1])), "") for x, y in spins]


def _exchange_loads(body: list[tuple]) -> int:
    return sum(x[0] == "ins" and x[1].startswith("LDG") and "STRONG.SYS" in x[1] for x in body)


_LDSM_BYTES = {"1": 128, "2": 256, "4": 512}  # 8x8 16-bit matrices per warp
_WIDTH_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def mma_units(op: str) -> float:
    """One warp's share of a tensor-core instruction, in m16n8k16 MMAs (16x8x16 MACs)."""
    m = re.search(r"\.(\d+)x(\d+)x(\d+)", op)
    if op.startswith("HGMMA") and m:
        M, N, K = map(int, m.groups())
        return M * N * K / (16 * 8 * 16) / 4
    m = re.search(r"\.(\d\d)(\d)(\d+)", op)  # HMMA.16816, HMMA.1688
    if m:
        M, N, K = map(int, m.groups())
        return M * N * K / (16 * 8 * 16)
    return 1.0


def smem_bytes(op: str, operands: str) -> float:
    """Shared-memory bytes one warp moves with this instruction (0 if none)."""
    if op.startswith(("LDSM", "STSM")):
        return _LDSM_BYTES.get(op.rsplit(".", 1)[-1], 512)
    if op.startswith(("LDS", "STS")) and not op.startswith(("LDSM", "STSM")):
        parts = op.split(".")[1:]
        width = next((_WIDTH_BYTES[p] for p in parts if p in _WIDTH_BYTES), 4)
        return 32 * width
    if op.startswith("HGMMA"):
        m = re.search(r"\.(\d+)x(\d+)x(\d+)\.[A-Z0-9]+\.([A-Z0-9]+)", op)
        if not m:
            return 0
        M, N, K = map(int, m.groups()[:3])
        elem = 4 if m.group(4) in ("TF32", "F32") else 1 if "E4M3" in op or "E5M2" in op else 2
        first = operands.split(",")[1].strip() if "," in operands else ""
        a_from_smem = first.startswith("gdesc")
        # the warpgroup's 4 warps issue it together and read the operands once
        return ((M * K if a_from_smem else 0) + N * K) * elem / 4
    return 0


def _regs(text: str) -> set[str]:
    return set(re.findall(r"\bR\d+\b", text))


def _dest_regs(op: str, operands: str) -> set[str]:
    first = operands.split(",")[0].strip()
    m = re.match(r"R(\d+)", first)
    if not m:
        return set()
    width = 4 if ".128" in op or op.startswith("HMMA.16816.F32") else 2 if ".64" in op else 1
    return {f"R{int(m.group(1)) + k}" for k in range(width)}


def count(loop: list[tuple]) -> dict[str, int]:
    c = dict(trips=0, loads=0, other_ldg=0, own_trips=0, bar=0, mma=0, mma_depth=0, spills=0,
             spin_loops=0, retry_loops=0, instructions=0, smem_bytes=0,
             mma_units=0)  # fmt: skip
    depth: dict[str, int] = {}  # register -> MMAs on the longest path that produced it
    outstanding: set[str] = set()
    in_wave = False
    own_outstanding: set[str] = set()
    own_in_wave = own_overlapped = False
    for kind, op, operands in loop:
        c["spin_loops"] += kind == "spin"
        c["retry_loops"] += kind == "spin" and int(op or 0) > 1
        if kind != "ins":
            continue
        c["instructions"] += 1
        c["smem_bytes"] += smem_bytes(op, operands)
        stores = op.startswith(("STS", "STG", "ST.", "RED", "ATOM"))
        sources = operands if stores else ",".join(operands.split(",")[1:])
        src_regs = _regs(operands if stores else sources)
        if op.startswith(("HMMA", "HGMMA")):
            src_regs |= _regs(operands)  # the accumulator is read too
        d = max((depth.get(r, 0) for r in src_regs), default=0)
        if op.startswith(("HMMA", "HGMMA")):
            d += 1
            c["mma_depth"] = max(c["mma_depth"], d)
        if not stores:
            for r in _dest_regs(op, operands):
                depth[r] = d
        if outstanding and _regs(sources) & outstanding:
            in_wave = False  # a result is used: the warp waits for that load here
            outstanding.clear()
        if own_outstanding and _regs(sources) & own_outstanding:
            c["own_trips"] += not own_overlapped
            own_in_wave = False
            own_outstanding.clear()
        if op.startswith("LDG") and ("STRONG.GPU" in op or "STRONG.SYS" in op):
            c["loads"] += 1
            if not in_wave:
                c["trips"] += 1
                in_wave = True
            outstanding |= _dest_regs(op, operands)
            own_overlapped = own_overlapped or bool(own_outstanding)
        elif op.startswith("LDG"):
            c["other_ldg"] += 1
            if not own_in_wave:
                own_in_wave, own_overlapped = True, bool(outstanding)
            own_outstanding |= _dest_regs(op, operands)
        elif op.startswith("BAR"):
            c["bar"] += 1
        elif op.startswith(("HMMA", "HGMMA")):
            c["mma"] += 1
            c["mma_units"] += mma_units(op)
        elif op.startswith(("LDL", "STL")):
            c["spills"] += 1
    c["smem_bytes"] = int(c["smem_bytes"])
    c["mma_units"] = round(c["mma_units"], 2)
    return c
