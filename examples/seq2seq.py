"""Sequence to sequence: an LSTM encoder-decoder learns to reverse strings of digits.

    python examples/seq2seq.py            # CPU, ~1 min
    python examples/seq2seq.py --steps 200 --hidden 32    # a quick look

The encoder (a gpurnn LSTM, fed a PackedSequence so that each string's final state is
taken at its own end) reads "40721"; the decoder (a second gpurnn LSTM, started from the
encoder's final (h, c)) writes "12704" then an end token. Training uses teacher forcing:
the decoder reads the true previous digit. Evaluation decodes greedily, feeding back its
own previous prediction, and counts a string as right only if every digit and the end
token are right (exact-sequence accuracy). The task data are generated on the fly.

Measured at the defaults (strings of 3-8 digits, 1500 steps of 128, CPU, 2 shared cores,
2026-11-27, 67 s): 100.0% exact-sequence accuracy on 1000 unseen strings (91% at step 250,
98% at step 500).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gpurnn

PAD, SOS, EOS, DIGIT0 = 0, 1, 2, 3  # token ids; digit k is DIGIT0 + k
VOCAB = DIGIT0 + 10


def make_batch(batch, min_len, max_len, generator=None):
    """Random digit strings and their reversals, padded with PAD.
    Returns (src (B, max_len), lengths (B,), tgt (B, max_len + 1) ending in EOS)."""
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    digits = torch.randint(0, 10, (batch, max_len), generator=generator) + DIGIT0
    pos = torch.arange(max_len)
    src = torch.where(pos < lengths[:, None], digits, PAD)
    # position p of the target is source position length-1-p
    idx = (lengths[:, None] - 1 - pos).clamp(min=0)
    tgt = torch.where(pos < lengths[:, None], src.gather(1, idx), PAD)
    tgt = torch.cat([tgt, torch.full((batch, 1), PAD)], dim=1)
    tgt[torch.arange(batch), lengths] = EOS
    return src, lengths, tgt


class Seq2Seq(nn.Module):
    def __init__(self, hidden=128, embed=32, layers=1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed, padding_idx=PAD)
        self.encoder = gpurnn.LSTM(embed, hidden, layers, batch_first=True)
        self.decoder = gpurnn.LSTM(embed, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, VOCAB)

    def encode(self, src, lengths):
        packed = pack_padded_sequence(
            self.embed(src), lengths, batch_first=True, enforce_sorted=False
        )
        _, state = self.encoder(packed)  # (h, c) at each string's own last digit
        return state

    def forward(self, src, lengths, tgt):
        """Teacher forcing: logits (B, T, VOCAB) for tgt, reading SOS + tgt[:-1]."""
        state = self.encode(src, lengths)
        dec_in = torch.cat([torch.full_like(tgt[:, :1], SOS), tgt[:, :-1]], dim=1)
        out, _ = self.decoder(self.embed(dec_in), state)
        return self.out(out)

    @torch.no_grad()
    def greedy(self, src, lengths, max_steps):
        """Decode one token at a time, feeding back the argmax: (B, max_steps) token ids."""
        state = self.encode(src, lengths)
        token = torch.full((src.size(0), 1), SOS, device=src.device)
        result = []
        for _ in range(max_steps):
            out, state = self.decoder(self.embed(token), state)
            token = self.out(out).argmax(-1)
            result.append(token)
        return torch.cat(result, dim=1)


def exact_accuracy(pred, tgt):
    """Share of sequences whose every token up to and including EOS is right."""
    valid = torch.cumsum(tgt == EOS, dim=1) - (tgt == EOS).long() == 0  # up to EOS
    return ((pred == tgt) | ~valid).all(dim=1).float().mean().item()


def save_curve(losses, accuracies, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8, label="training loss (teacher forcing)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    steps, acc = zip(*accuracies) if accuracies else ((), ())
    ax2.plot(steps, acc, "o-", color="tab:orange", label="exact-sequence accuracy (greedy)")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    lines = ax.get_lines() + ax2.get_lines()  # one legend for both axes
    ax2.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    ax.set_title("seq2seq: reversing digit strings")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--min-len", type=int, default=3)
    p.add_argument("--max-len", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # small per-step matmuls: extra threads cost more than they save on a small, busy CPU
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default="examples/out", help="folder for the loss curve PNG")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)

    model = Seq2Seq(args.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    test = make_batch(1000, args.min_len, args.max_len, torch.Generator().manual_seed(12345))
    test = [t.to(device) for t in test]

    def evaluate():
        model.eval()
        src, lengths, tgt = test
        acc = exact_accuracy(model.greedy(src, lengths.cpu(), tgt.size(1)), tgt)
        model.train()
        return acc

    losses, accuracies, start = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        src, lengths, tgt = make_batch(args.batch, args.min_len, args.max_len, gen)
        logits = model(src.to(device), lengths, tgt.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.to(device).flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # keeps early LSTM steps stable
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            accuracies.append((step, evaluate()))
            print(
                f"step {step:5d}  loss {loss.item():.4f}  exact-sequence accuracy "
                f"{accuracies[-1][1]:.1%}  ({time.perf_counter() - start:.0f} s)"
            )
    seconds = time.perf_counter() - start

    src, lengths, tgt = (t[:3] for t in test)
    pred = model.greedy(src, lengths.cpu(), tgt.size(1))
    for s, n, y in zip(src.tolist(), lengths.tolist(), pred.tolist()):
        out = "".join(str(t - DIGIT0) for t in y[: y.index(EOS)] if t >= DIGIT0) if EOS in y else y
        print(f"  {''.join(str(t - DIGIT0) for t in s[:n])} -> {out}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_curve(losses, accuracies, out_dir / "seq2seq_loss.png")
    print(
        f"accuracy {accuracies[-1][1]:.1%} after {args.steps} steps, {seconds:.0f} s; "
        f"wrote {out_dir / 'seq2seq_loss.png'}"
    )
    return {
        "losses": losses,
        "final_loss": losses[-1],
        "accuracy": accuracies[-1][1],
        "accuracies": accuracies,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
