"""The README's code runs as a user pastes it: every python, sh and bash block on its own,
in a fresh namespace or shell, in an empty folder. A block that must not run here (it
installs packages, needs a GPU, rewrites tracked files) says so on the line before it:
`<!-- not run by tests/test_readme.py: why -->`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpurnn

README = Path(__file__).resolve().parent.parent / "README.md"
LANGUAGES = ("python", "sh", "bash")
NOT_RUN = re.compile(r"<!-- not run by tests/test_readme\.py: (?P<why>\S.*?) -->\s*$")
FENCE = re.compile(r"^```(?P<language>\w*)\n(?P<code>.*?)^```\n", re.S | re.M)


def blocks() -> list[dict]:
    """Every fenced block: its language, code, the section it stands in, its line, and why
    it is not run (None when it is)."""
    text = README.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()]
        line = before.count("\n") + 1
        previous = before.rstrip("\n").rsplit("\n", 1)[-1]
        skip = NOT_RUN.match(previous)
        headings = re.findall(r"^## (.+)$", before, re.M)
        found.append(
            dict(
                language=m["language"],
                code=m["code"],
                section=headings[-1] if headings else "(top)",
                line=line,
                why=skip["why"] if skip else None,
            )
        )
    return found


RUN = [b for b in blocks() if b["language"] in LANGUAGES and b["why"] is None]


def test_every_block_is_run_or_says_why_not():
    every = blocks()
    assert len(every) >= 10, "the README's blocks were not found"
    # unmarked blocks of other languages would go unchecked
    assert {b["language"] for b in every} <= set(LANGUAGES), {b["language"] for b in every}
    sections = {"Quick start", "Backends", "The primitive", "Deploying", "Regularized layers"}
    assert {b["section"] for b in RUN} >= sections
    # the GPU-only block says so to its reader too, not only to this test
    gpu = [b for b in every if b["why"] and "GPU" in b["why"]]
    assert gpu and all("bench" in b["code"] for b in gpu)


def _id(block: dict) -> str:
    return f"{block['section']}:{block['line']}"


@pytest.mark.parametrize("block", [b for b in RUN if b["language"] == "python"], ids=_id)
def test_python_block_runs_as_pasted(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes (lstm.pt2, lstm.onnx) lands here
    namespace = {"__name__": f"readme_line_{block['line']}"}
    exec(compile(block["code"], f"{README}:{block['line']}", "exec"), namespace)
    if block["section"] == "Quick start" and "Tagger" in namespace:
        out, h_n, c_n = namespace["out"], namespace["h_n"], namespace["c_n"]
        assert out.shape == (8, 50, 512) and h_n.shape == c_n.shape == (4, 8, 256)
        assert isinstance(namespace["model"].rnn, gpurnn.GRU)
        assert namespace["scores"].shape == (8, 50, 10)
        assert torch.isfinite(namespace["scores"]).all()
    if block["section"] == "Regularized layers" and "model" in namespace:
        model = namespace["model"]
        assert namespace["scores"].shape == (4, 20, 5)
        assert model.rnn.layer_norm_c_weight_l1_reverse.grad is not None
        assert not model.training


@pytest.mark.parametrize("block", [b for b in RUN if b["language"] != "python"], ids=_id)
def test_shell_block_runs_as_pasted(block, tmp_path):
    """Each line as a user types it, with this interpreter as `python` and no
    TRITON_INTERPRET set: in an empty folder, failing at the first command that fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", "-e", "-c", block["code"]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
