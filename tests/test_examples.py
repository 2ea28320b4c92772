"""Every example in examples/ runs at a tiny size in seconds and its loss goes down.

The examples are scripts, not a package: each is loaded from its file and its
`main(argv)` called with small sizes; it returns its metrics.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytest.importorskip("matplotlib")  # the examples draw their results


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_thread_count():
    # the examples set the CPU thread count for their own run; leave the suite's as it was
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny(args, out):
    """A tiny run's argv: on CPU, pictures into the test's own folder."""
    return args.split() + ["--device", "cpu", "--out", str(out)]


def went_down(losses, k=10):
    return np.mean(losses[-k:]) < 0.8 * np.mean(losses[:k])


def test_seq2seq(tmp_path):
    r = load("seq2seq").main(tiny("--steps 80 --batch 32 --hidden 32 --max-len 5", tmp_path))
    assert went_down(r["losses"])
    assert 0 <= r["accuracy"] <= 1
    assert (tmp_path / "seq2seq_loss.png").exists()


def test_long_range(tmp_path):
    r = load("long_range").main(
        tiny("--length 20 --steps 60 --hidden 16 --eval-every 20 --no-stop-when-solved", tmp_path)
    )
    assert set(r) == {"lstm", "gru", "rnn"}
    for cell, result in r.items():
        assert went_down(result["losses"]), cell
    assert (tmp_path / "long_range_T20.png").exists()


def test_keras_style(tmp_path):
    r = load("keras_style").main(tiny("--epochs 3 --points 700 --window 20", tmp_path))
    assert r["losses"][-1] < 0.8 * r["losses"][0]
    assert (tmp_path / "keras_style_forecast.png").exists()


def test_crnn(tmp_path):
    crnn = load("crnn")
    images, labels = crnn.make_batch(4, 2, 3, torch.Generator().manual_seed(0))
    assert images.shape[:3] == (4, 1, crnn.HEIGHT) and 0 <= images.min() <= images.max() <= 1
    assert all(2 <= len(digits) <= 3 for digits in labels)

    r = crnn.main(tiny("--steps 40 --batch 8 --hidden 16 --max-digits 4", tmp_path))
    assert went_down(r["losses"])
    assert (tmp_path / "crnn_samples.png").exists()
