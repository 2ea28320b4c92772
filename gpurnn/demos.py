"""The command line's two demos, kept out of the library modules they show off.

    python -m gpurnn demo     a torch.nn LSTM forecasting a noisy sine, converted to gpurnn
                              (same outputs) and trained a little
    python -m gpurnn inspect  a small LSTM trained to track the nesting depth of brackets
                              (a few seconds on a CPU), recorded with gpurnn.inspect and
                              drawn: on CPU it reads the depth right at 99.9% of steps, and
                              11 of its 16 hidden units follow the depth (|r| > 0.9)

Each has `add_*_arguments(parser)` for its subcommand and a function taking the parsed
arguments; gpurnn.cli only parses and dispatches.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gpurnn import arguments
from gpurnn.inspect import plot_gate_saturation, plot_heatmap, record, saturation

# ----------------------------------------------------------------------------------------
# python -m gpurnn demo: drop-in conversion, then training
# ----------------------------------------------------------------------------------------


def add_forecast_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=arguments.positive_int, default=100, help="training steps")


def forecast(args) -> int:
    """Drop-in in action: a torch.nn model converted to gpurnn gives the same outputs, then
    trains (a two-layer LSTM predicting the next value of a noisy sine)."""
    torch.manual_seed(0)
    # a 32-unit model: per-step products are tiny, and extra threads cost more than they save
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_forecaster(args.steps)
    finally:
        torch.set_num_threads(threads)


class Forecaster(torch.nn.Module):
    """A plain torch.nn model, as a user would have it before converting."""

    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(1, 32, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _train_forecaster(steps: int) -> int:
    import gpurnn

    model = Forecaster()
    t = torch.linspace(0, 60, 2001)
    series = torch.sin(t) + 0.05 * torch.randn_like(t)
    starts = torch.randint(0, len(series) - 51, (64,))
    windows = torch.stack([series[s : s + 51] for s in starts])[..., None]
    x, target = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        before = model(x)
    gpurnn.convert(model)
    with torch.no_grad():
        after = model(x)
    print(
        f"converted {type(model.rnn).__module__}.{type(model.rnn).__name__}: max |output "
        f"change| = {(after - before).abs().max():.1e}"
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps + 1):
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  mse {loss.item():.4f}")
    return 0


# ----------------------------------------------------------------------------------------
# python -m gpurnn inspect: a bracket-depth LSTM, recorded and drawn
# ----------------------------------------------------------------------------------------

BRACKETS = "()."  # open, close, filler


def bracket_batch(batch: int, T: int, max_depth: int = 4, generator=None):
    """Random bracket strings and their nesting depth after each character.
    Returns (one-hot x (B, T, 3), depth (B, T) float)."""
    u = torch.rand(batch, T, generator=generator)
    tokens = torch.empty(batch, T, dtype=torch.long)
    depth = torch.empty(batch, T)
    d = torch.zeros(batch)
    for t in range(T):
        # open below max depth with p=0.4, close above 0 with p=0.4, else filler
        opens = (u[:, t] < 0.4) & (d < max_depth)
        closes = (u[:, t] >= 0.6) & (d > 0)
        tokens[:, t] = torch.where(opens, 0, torch.where(closes, 1, 2))
        d = d + opens.float() - closes.float()
        depth[:, t] = d
    return torch.nn.functional.one_hot(tokens, 3).float(), depth


class DepthTracker(torch.nn.Module):
    """An LSTM reads brackets; a linear head reads the depth off its hidden state."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        import gpurnn

        self.rnn = gpurnn.LSTM(3, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).squeeze(-1)


def add_depth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=arguments.positive_int, default=300, help="training steps")
    parser.add_argument(
        "--hidden", type=arguments.positive_int, default=16, help="LSTM hidden units"
    )
    parser.add_argument(
        "--length", type=arguments.positive_int, default=60, help="characters per sequence"
    )
    parser.add_argument(
        "--out", default="inspect_out", help="folder for the PNGs, under the current folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    parser.add_argument(
        "--device",
        type=arguments.device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N",
    )
    # tiny per-step matmuls: thread start-up costs more than it saves (100x on a busy 2-core)
    parser.add_argument(
        "--threads",
        type=arguments.non_negative_int,
        default=1,
        help="CPU threads (0: torch's default)",
    )


def depth_tracking(args) -> dict:
    """Train the depth tracker, record it on a fresh sequence, write the pictures; returns
    the losses, accuracy, each unit's correlation with the depth, the paths, the recording."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    model = DepthTracker(args.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        x, depth = bracket_batch(64, args.length, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x.to(device)), depth.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  mse {loss.item():.4f}")
    model.eval()
    x, depth = bracket_batch(256, args.length, generator=gen)
    x, depth = x.to(device), depth.to(device)
    with torch.no_grad():
        accuracy = (model(x).round() == depth).float().mean().item()
    print(
        f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s; depth read "
        f"correctly at {accuracy:.1%} of steps"
    )

    rec = record(model.rnn, x)
    # how closely each unit's hidden state follows the depth: the network's counters
    h = rec.get("h").reshape(-1, args.hidden)
    dv = depth.T.reshape(-1, 1)  # rec is time-major
    corr = ((h - h.mean(0)) * (dv - dv.mean())).mean(0) / (h.std(0) * dv.std() + 1e-9)
    unit = int(corr.abs().argmax())
    counters = int((corr.abs() > 0.9).sum())
    print(
        f"{counters} of {args.hidden} units' hidden states follow the depth (|correlation| > 0.9);"
        f" closest: unit {unit}, {corr[unit]:+.2f}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chars = [BRACKETS[i] for i in x[0].argmax(-1).tolist()]
    titles = {"h": "LSTM hidden states reading brackets: many units rise and fall with the depth"}
    paths = [
        plot_heatmap(rec, name, path=out / f"{name}.png", xticklabels=chars, title=titles.get(name))
        for name in rec.names
    ]
    paths.append(plot_gate_saturation(rec, path=out / "saturation.png"))
    for gates in saturation(rec).values():
        print(
            "saturated (low/high): "
            + ", ".join(f"{g} {lo:.0%}/{hi:.0%}" for g, (lo, hi) in gates.items())
        )
    print("wrote " + ", ".join(str(p) for p in paths))
    return {
        "losses": losses,
        "accuracy": accuracy,
        "depth_correlation": corr.tolist(),
        "paths": paths,
        "recording": rec,
    }


def depth(args) -> int:
    depth_tracking(args)
    return 0
