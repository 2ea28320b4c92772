"""Reading the step loop of a compiled kernel from its SASS, without a GPU.

A persistent recurrence kernel's speed is set by its time-step loop: how many memory round
trips wait on each other inside one step, how many block barriers, whether weights are loaded
from global memory inside it, whether anything spills. `nvdisasm` (shipped with Triton) turns
the cubin of an sm_90 compile into SASS; this module finds the step loop (the largest loop,
i.e. the largest backward branch) and counts:

  trips      dependent waves of exchange loads: the loads that read other programs' data
             (`.cg`, shown as LDG...STRONG.GPU) issued before any of them is consumed form
             one wave; a load issued after an earlier one's result was used starts another.
  loads      exchange loads (LDG...STRONG.GPU) in the loop
  other_ldg  other global loads in the loop (own inputs, workspace; streamed weights)
  bar        block barriers (BAR.SYNC)
  mma        tensor-core instructions (HMMA / HGMMA)
  spills     local-memory traffic (LDL / STL)
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


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


def step_loop(ins: list[tuple]) -> list[tuple]:
    """The instructions of the largest loop (a backward branch to a label)."""
    labels = {x[1]: i for i, x in enumerate(ins) if x[0] == "label"}
    best = (0, 0)
    for i, x in enumerate(ins):
        if x[0] == "ins" and x[1].startswith("BRA"):
            m = re.search(r"`\(\.(L_x_\d+)\)", x[2])
            if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
                best = (labels[m.group(1)], i)
    return ins[best[0] : best[1] + 1]


def _regs(text: str) -> set[str]:
    return set(re.findall(r"\bR\d+\b", text))


def _dest_regs(op: str, operands: str) -> set[str]:
    first = operands.split(",")[0].strip()
    m = re.match(r"R(\d+)", first)
    if not m:
        return set()
    width = 4 if ".128" in op else 2 if ".64" in op else 1
    return {f"R{int(m.group(1)) + k}" for k in range(width)}


def count(loop: list[tuple]) -> dict[str, int]:
    c = dict(trips=0, loads=0, other_ldg=0, bar=0, mma=0, spills=0, instructions=0)
    outstanding: set[str] = set()
    in_wave = False
    for kind, op, operands in loop:
        if kind != "ins":
            continue
        c["instructions"] += 1
        stores = op.startswith(("STS", "STG", "ST.", "RED", "ATOM"))
        sources = operands if stores else ",".join(operands.split(",")[1:])
        if outstanding and _regs(sources) & outstanding:
            in_wave = False  # a result is used: the warp waits for that load here
            outstanding.clear()
        if op.startswith("LDG") and "STRONG.GPU" in op:
            c["loads"] += 1
            if not in_wave:
                c["trips"] += 1
                in_wave = True
            outstanding |= _dest_regs(op, operands)
        elif op.startswith("LDG") and "STRONG.SYS" not in op:
            c["other_ldg"] += 1
        elif op.startswith("BAR"):
            c["bar"] += 1
        elif op.startswith(("HMMA", "HGMMA")):
            c["mma"] += 1
        elif op.startswith(("LDL", "STL")):
            c["spills"] += 1
    return c
