"""The README's code runs as a user pastes it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import gpurnn

README = Path(__file__).resolve().parent.parent / "README.md"


def code_block(section: str, language: str = "python") -> str:
    """The first ```language block under the heading `## section` of the README."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    found = re.search(rf"```{language}\n(.*?)```", text[start : end if end > 0 else None], re.S)
    assert found, f"no {language} block under '## {section}'"
    return found.group(1)


def test_quick_start_runs_as_pasted():
    namespace = {"__name__": "readme_quick_start"}
    exec(compile(code_block("Quick start"), str(README), "exec"), namespace)
    out, h_n, c_n = namespace["out"], namespace["h_n"], namespace["c_n"]
    assert out.shape == (8, 50, 512) and h_n.shape == c_n.shape == (4, 8, 256)
    model = namespace["model"]
    assert isinstance(model.rnn, gpurnn.GRU)
    assert namespace["scores"].shape == (8, 50, 10)
    assert torch.isfinite(namespace["scores"]).all()


def test_regularized_layers_section_runs_as_pasted():
    namespace = {"__name__": "readme_regularized"}
    exec(compile(code_block("Regularized layers"), str(README), "exec"), namespace)
    model = namespace["model"]
    assert namespace["scores"].shape == (4, 20, 5)
    assert model.rnn.layer_norm_c_weight_l1_reverse.grad is not None
    assert not model.training
