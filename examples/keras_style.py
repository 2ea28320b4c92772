"""The classic quick-start, in PyTorch with gpurnn: stacked LSTMs forecast a noisy signal.

    python examples/keras_style.py        # CPU, ~30 s

The shape every Keras tutorial starts from,

    model = Sequential([LSTM(64, return_sequences=True), LSTM(32), Dense(1)])
    model.compile(optimizer="adam", loss="mse"); model.fit(x, y, epochs=...); model.predict(x)

written as idiomatic PyTorch: an nn.Module, a DataLoader, an explicit training loop.
The series is a sum of two sines with noise; from a window of the last 40 values the model
predicts the next one. Its test error is compared with two baselines: repeating the last
value, and the noise floor (the part no model can predict).

Measured at the defaults (10 epochs, CPU, 2 shared cores, 2026-11-27, 26 s): test MSE
0.0165, against 0.0419 for repeating the last value and a noise floor of 0.0106.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gpurnn


def make_series(n, noise, generator=None):
    """A sum of two sines (periods ~31 and ~87 steps) plus Gaussian noise: (clean, noisy)."""
    t = torch.arange(n, dtype=torch.float32)
    clean = torch.sin(2 * math.pi * t / 31.4) + 0.5 * torch.sin(2 * math.pi * t / 87.0)
    return clean, clean + noise * torch.randn(n, generator=generator)


def windows(series, clean, window):
    """Inputs (N, window, 1) of the noisy series; targets: the next noisy value, and the
    next clean value (for the noise-floor comparison)."""
    x = series.unfold(0, window, 1)[:-1]
    return x[..., None], series[window:], clean[window:]


class Forecaster(nn.Module):
    """LSTM(64, return_sequences=True) -> LSTM(32) -> Dense(1)."""

    def __init__(self):
        super().__init__()
        self.lstm1 = gpurnn.LSTM(1, 64, batch_first=True)
        self.lstm2 = gpurnn.LSTM(64, 32, batch_first=True)
        self.dense = nn.Linear(32, 1)

    def forward(self, x):
        seq, _ = self.lstm1(x)  # every step's output: "return_sequences=True"
        _, (h, _) = self.lstm2(seq)  # only the last hidden state
        return self.dense(h[-1]).squeeze(-1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--points", type=int, default=6000, help="length of the series")
    p.add_argument("--window", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # small per-step matmuls: extra threads cost more than they save on a small, busy CPU
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default="examples/out", help="folder for the forecast PNG")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    clean, series = make_series(args.points, args.noise, torch.Generator().manual_seed(args.seed))
    x, y, y_clean = windows(series, clean, args.window)
    split = int(0.8 * len(x))  # train on the past, test on the future
    train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=args.batch, shuffle=True)

    model = Forecaster().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    losses, start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):  # model.fit(x, y, epochs=...)
        model.train()
        total = 0.0
        for xb, yb in train:
            loss = F.mse_loss(model(xb.to(device)), yb.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
        losses.append(total / split)
        print(
            f"epoch {epoch:3d}  train mse {losses[-1]:.4f}  ({time.perf_counter() - start:.0f} s)"
        )

    model.eval()
    with torch.no_grad():  # model.predict(x_test)
        pred = model(x[split:].to(device)).cpu()
    test_mse = F.mse_loss(pred, y[split:]).item()
    last_value_mse = F.mse_loss(x[split:, -1, 0], y[split:]).item()
    noise_floor = F.mse_loss(y_clean[split:], y[split:]).item()  # a perfect model's error
    print(
        f"test mse {test_mse:.4f}  (repeat last value: {last_value_mse:.4f}, noise floor: "
        f"{noise_floor:.4f})  {time.perf_counter() - start:.0f} s"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3))
    n = 300
    ax.plot(y[split : split + n], ".", ms=2, color="gray", label="noisy series")
    ax.plot(y_clean[split : split + n], lw=1, color="black", label="clean signal")
    ax.plot(pred[:n], lw=1.2, color="tab:red", label="LSTM one-step forecast")
    ax.set_xlabel("test step")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_dir / "keras_style_forecast.png", dpi=100)
    plt.close(fig)
    print(f"wrote {out_dir / 'keras_style_forecast.png'}")
    return {
        "losses": losses,
        "final_loss": losses[-1],
        "test_mse": test_mse,
        "last_value_mse": last_value_mse,
        "noise_floor": noise_floor,
    }


if __name__ == "__main__":
    main()
