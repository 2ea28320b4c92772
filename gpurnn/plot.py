"""`python -m gpurnn plot`: pictures and the README table from benchmarks/results.csv.

For each card the CSV holds, only its latest run is drawn (runs are told apart by the
run_id column), so a plot never mixes code versions on one card:

  speedup_vs_batch.png   speedup over cuDNN against batch size (the shape family with
                         the most batch sizes: T=1024, H=768 LSTM in the GPU matrix)
  speedup_vs_hidden.png  speedup over cuDNN against hidden size
  memory.png             peak training memory per shape and implementation (CUDA only)

`--readme` rewrites the table between `<!-- bench:start -->` and `<!-- bench:end -->`:
per card, the latest measurement of each shape and dtype (each from one run), headed by
card, dates and commits, with the implementation `auto` runs marked (from the dispatch
table built from the same rows and the GPU test records in gpu_tests.csv beside the CSV)
and a sentence each on where gpurnn wins and where `auto` runs cuDNN instead.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO_ROOT / "benchmarks" / "results.csv"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "plots"
DEFAULT_README = REPO_ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
BASELINES = ("cudnn", "torch.nn")
PLOTS = ("speedup_vs_batch.png", "speedup_vs_hidden.png", "memory.png")
MODE_TITLES = {"fwd": "forward (inference)", "fwdbwd": "forward + backward (training)"}


def read_rows(path: Path) -> list[dict]:
    """The whole-layer rows: a kernel timed alone (suite "kernel") is the step model's."""
    with Path(path).open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("suite") != "kernel"]


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """card -> the rows of that card's most recent run (by date, then run id)."""
    newest: dict[str, tuple[str, str]] = {}
    for r in rows:
        key = (r.get("date", ""), r.get("run_id", ""))
        if key > newest.get(r["card"], ("", "")):
            newest[r["card"]] = key
    return {
        card: [r for r in rows if r["card"] == card and r.get("run_id", "") == key[1]]
        for card, key in newest.items()
    }


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ok(r: dict) -> bool:
    return r.get("status") == "ok"


def _primary_dtype(rows: list[dict]) -> str | None:
    dtypes = {r["dtype"] for r in rows}
    for preferred in ("bf16", "fp16", "fp32"):
        if preferred in dtypes:
            return preferred
    return next(iter(sorted(dtypes)), None)


def _family(rows: list[dict], vary: str) -> tuple[dict, list[dict]] | None:
    """The group of comparable rows (same everything but `vary`) with the most distinct
    values of `vary`, LSTM and the primary dtype preferred; None if no such rows."""
    fixed = [
        k
        for k in ("cell", "T", "B", "H", "input_size", "layers", "bidirectional", "varlen", "dtype")
        if k != vary
    ]
    dtype = _primary_dtype(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["dtype"] == dtype and not r.get("varlen") and _float(r.get("speedup_vs_cudnn")):
            if vary == "H" and r["input_size"] != r["H"]:
                continue  # input size would change along with H
            key = tuple(r[k] for k in fixed if k != "input_size")
            groups[key].append(r)
    if not groups:
        return None

    def rank(item):
        key, members = item
        values = {m[vary] for m in members}
        return (len(values), members[0]["cell"] == "lstm", len(members))

    key, members = max(groups.items(), key=rank)
    return dict(zip([k for k in fixed if k != "input_size"], key)), members


def _baseline_label(card_runs: dict[str, list[dict]]) -> str:
    names = {r["impl"] for rows in card_runs.values() for r in rows if r["impl"] in BASELINES}
    return " / ".join(sorted(names)) or "cuDNN"


def _subtitle(card_runs: dict[str, list[dict]]) -> str:
    return "; ".join(f"{card}, {rows[0]['date'][:10]}" for card, rows in card_runs.items())


def plot_speedup(card_runs: dict[str, list[dict]], vary: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    families = {card: _family(rows, vary) for card, rows in card_runs.items()}
    families = {card: f for card, f in families.items() if f is not None}
    if not families:
        return f"skipped {path.name}: no rows with a speedup to plot against {vary}"
    modes = [
        m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for _, f in families.values() for r in f)
    ]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    several_cards = len(families) > 1
    baseline = _baseline_label(card_runs)
    for ax, mode in zip(axes[0], modes):
        for card, (_, members) in families.items():
            series: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for r in members:
                if r["mode"] == mode and r["impl"] not in BASELINES and _ok(r):
                    series[r["impl"]].append((int(r[vary]), float(r["speedup_vs_cudnn"])))
            for impl, points in sorted(series.items()):
                points.sort()
                label = f"{impl} ({card})" if several_cards else impl
                ax.plot(*zip(*points), marker="o", label=label)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label=f"{baseline} (= 1)")
        ax.set_xscale("log", base=2)
        ticks = sorted({int(r[vary]) for _, f in families.values() for r in f})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel({"B": "batch size", "H": "hidden size"}[vary])
        ax.set_ylabel(f"speedup over {baseline} (same run)")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fixed = next(iter(families.values()))[0]
    desc = ", ".join(f"{k}={v}" for k, v in fixed.items() if k in ("cell", "T", "B", "H", "dtype"))
    fig.suptitle(f"{desc} — {_subtitle(card_runs)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def plot_memory(card_runs: dict[str, list[dict]], path: Path) -> str:
    import matplotlib.pyplot as plt

    bars: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)  # (card, shape) -> impl
    for card, rows in card_runs.items():
        dtype = _primary_dtype(rows)
        for r in rows:
            mb = _float(r.get("peak_mem_mb"))
            if r["mode"] == "fwdbwd" and r["dtype"] == dtype and _ok(r) and mb is not None:
                bars[(card, f"{r['shape']} {dtype}")][r["impl"]] = mb
    if not bars:
        return f"skipped {path.name}: no peak-memory rows (they are measured on CUDA only)"
    impls = sorted(
        {impl for per_impl in bars.values() for impl in per_impl},
        key=lambda i: (i not in BASELINES, i),
    )
    labels = [shape if len(card_runs) == 1 else f"{shape}\n{card}" for card, shape in bars]
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(bars) + 2), 4.5))
    for k, impl in enumerate(impls):
        xs = [i + k * width for i, per_impl in enumerate(bars.values()) if impl in per_impl]
        ys = [per_impl[impl] for per_impl in bars.values() if impl in per_impl]
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bars))])
    ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("peak memory of a training step (MB)")
    ax.set_title(f"peak training memory — {_subtitle(card_runs)}", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def write_plots(rows: list[dict], out: Path) -> list[str]:
    """Writes the PNGs into `out`; returns one message per plot (written or why not)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (or wanted) on a server
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card_runs = latest_runs(rows)
    return [
        plot_speedup(card_runs, "B", out / PLOTS[0]),
        plot_speedup(card_runs, "H", out / PLOTS[1]),
        plot_memory(card_runs, out / PLOTS[2]),
    ]


_CELL_ORDER = {"lstm": 0, "gru": 1, "rnn_tanh": 2}
_DTYPE_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}


def latest_cases(rows: list[dict]) -> dict[str, dict[tuple, list[dict]]]:
    """card -> (shape, dtype) -> the rows of the latest run that measured that case on that
    card. Each case comes from one run, so its speedups compare times of one process."""
    newest: dict[tuple, tuple[str, str]] = {}
    for r in rows:
        k = (r["card"], r["shape"], r["dtype"])
        newest[k] = max(newest.get(k, ("", "")), (r.get("date", ""), r.get("run_id", "")))
    cards: dict[str, dict[tuple, list[dict]]] = {}
    for r in rows:
        k = (r["card"], r["shape"], r["dtype"])
        if (r.get("date", ""), r.get("run_id", "")) == newest[k]:
            cards.setdefault(r["card"], {}).setdefault(k[1:], []).append(r)
    return cards


def _case_order(item):
    (shape, dtype), case_rows = item
    r = case_rows[0]
    numbers = [int(r[k]) if str(r.get(k, "")).isdigit() else 0 for k in ("layers", "H", "B", "T")]
    return (_DTYPE_ORDER.get(dtype, 9), _CELL_ORDER.get(r["cell"], 9), r.get("varlen", ""),
            *numbers, shape)  # fmt: skip


def _auto_choice(table: dict, card: str, r: dict) -> str | None:
    """The backend `auto` runs for this case on this card (the table's first candidate,
    else its default order's first, triton), for single-layer dense CUDA shapes."""
    from gpurnn import dispatch

    if r["device"] != "cuda":
        return "torch"
    if r.get("layers") != "1" or r.get("bidirectional") != "0" or r.get("varlen"):
        return None  # the table is measured on single layers: not shown for stacks
    k = dispatch.key(r["cell"], dispatch._DTYPE_NAMES.get(r["dtype"], r["dtype"]),
                     int(r["H"]), int(r["B"]))  # fmt: skip
    ranking = table.get("by_card", {}).get(card, {}).get(k) or table.get("choices", {}).get(k)
    failed = set(table.get("failed_gpu_tests", {}).get(card, ()))
    if ranking:
        return ranking[0]
    return next(b for b in dispatch.CANDIDATES if b not in failed)


def markdown_table(
    rows: list[dict], plots_dir: Path | None, readme_dir: Path, gpu_tests: list[dict] = ()
) -> str:
    """The measured rows as markdown, per card (newest first): the latest measurement of
    each shape and dtype, the backend `auto` runs there, and in words which cases gpurnn
    wins and which `auto` sends to cuDNN."""
    from gpurnn import dispatch

    if not rows:
        return "No benchmark rows yet.\n"
    table = dispatch.build(rows, gpu_tests)
    by_card = latest_cases(rows)
    newest_first = sorted(
        by_card, key=lambda c: max(r["date"] for rs in by_card[c].values() for r in rs),
        reverse=True,
    )  # fmt: skip
    lines: list[str] = []
    for card in newest_first:
        cases = sorted(by_card[card].items(), key=_case_order)
        lines += _card_section(card, cases, table)
    if plots_dir is not None:
        images = [p for p in PLOTS if (Path(plots_dir) / p).exists()]
        if images:
            rel = Path(os.path.relpath(Path(plots_dir), readme_dir)).as_posix()
            lines += [f"![{p[:-4].replace('_', ' ')}]({rel}/{p})" for p in images] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _card_section(card: str, cases, table: dict) -> list[str]:
    from gpurnn.dispatch import IMPL_BACKENDS

    all_rows = [r for _, rs in cases for r in rs]
    first = all_rows[0]
    on_cuda = first["device"] == "cuda"
    baseline = "cuDNN" if on_cuda else "torch.nn on CPU"
    runs = sorted({(r["date"], r["commit"]) for r in all_rows})
    dates = ", ".join(sorted({d[:10] for d, _ in runs}))
    commits = ", ".join(f"`{c}`" for c in sorted({c for _, c in runs}))
    lines = [
        f"**{card}** ({first['device']}), measured {dates}, commit {commits}: torch "
        f"{first['torch']}, triton {first['triton'] or '-'}, cuDNN {first['cudnn'] or '-'}, "
        f"driver {first['driver'] or '-'}. Whole layers (input projection included), median "
        f"ms; × is {baseline}'s time ÷ this time in the same run (above 1: faster than "
        f"{baseline}); err is the largest forward error against torch.nn in fp32. "
        f'*auto* marks the implementation `backend="auto"` runs for that case.',
        "",
        "| shape | dtype | impl | fwd ms | × | fwd+bwd ms | × | peak MB | err | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    wins, routed = [], []
    for (shape, dtype), case_rows in cases:
        auto = _auto_choice(table, card, case_rows[0])
        by_impl: dict[str, dict[str, dict]] = {}
        for r in case_rows:
            by_impl.setdefault(r["impl"], {})[r["mode"]] = r
        auto_impl = None
        if auto is not None:
            # the row that stands for what auto runs: its gpurnn row, or cuDNN for torch
            names = [i for i in by_impl if IMPL_BACKENDS.get(i) == auto]
            auto_impl = next((i for i in names if i != "gpurnn-torch"), names[0] if names else None)
        for impl, modes in by_impl.items():
            f, b = modes.get("fwd", {}), modes.get("fwdbwd", {})
            errs = [e for e in map(_float, (f.get("max_err"), b.get("max_err"))) if e is not None]
            statuses = sorted({r["status"] for r in (f, b) if r})
            status = "ok" if statuses == ["ok"] else "; ".join(s for s in statuses if s != "ok")
            status = status.replace("|", "/")[:80]
            name = f"{impl} *auto*" if impl == auto_impl else impl
            lines.append(
                f"| {shape} | {dtype} | {name} | {f.get('ms', '')} | "
                f"{f.get('speedup_vs_cudnn', '')} | {b.get('ms', '')} | "
                f"{b.get('speedup_vs_cudnn', '')} | {b.get('peak_mem_mb', '')} | "
                f"{format(max(errs), '.1e') if errs else ''} | {status} |"
            )
        if on_cuda and auto is not None:
            kernels = {
                i: _float(m.get("fwdbwd", {}).get("speedup_vs_cudnn"))
                for i, m in by_impl.items()
                if IMPL_BACKENDS.get(i) in ("triton", "cupy")
                and m.get("fwdbwd", {}).get("status") == "ok"
            }
            kernels = {i: x for i, x in kernels.items() if x is not None}
            if not kernels:
                continue
            best = max(kernels, key=kernels.get)
            label = f"{shape} {dtype} ({best} {kernels[best]:.3g}×)"
            (routed if auto == "torch" else wins).append(label)
    if on_cuda and (wins or routed):
        lines.append("")
        if wins:
            lines.append(
                "gpurnn is faster than cuDNN in training (fwd+bwd) at: " + "; ".join(wins) + "."
            )
            lines.append("")
        if routed:
            lines.append(
                "cuDNN is still faster at: " + "; ".join(routed) + ". There `auto` runs "
                "torch.nn's own cuDNN layers (backend `torch`), so a converted model is not "
                'slower than torch.nn at these shapes; `backend="triton"` still runs the '
                "kernels."
            )
            lines.append("")
    if lines[-1] != "":
        lines.append("")
    return lines


def update_readme(readme: Path, table: str) -> None:
    """Replaces what lies between the bench markers with `table`."""
    readme = Path(readme)
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {START} ... {END} section to fill")
    readme.write_text(text[: start + len(START)] + "\n" + table + text[end:])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="results (default: %(default)s)")
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help="folder for the PNGs (default: %(default)s)"
    )
    parser.add_argument(
        "--readme",
        nargs="?",
        const=str(DEFAULT_README),
        default=None,
        help="also rewrite the table between the bench markers of this "
        "markdown file (default when given bare: %(const)s)",
    )


def run(args) -> int:
    csv_path = Path(args.csv)
    if not csv_path.exists():
        print(
            f"gpurnn plot: {csv_path} does not exist (run `python -m gpurnn bench` first)",
            file=sys.stderr,
        )
        return 1
    rows = read_rows(csv_path)
    if not rows:
        print(f"gpurnn plot: {csv_path} has no rows yet; nothing to plot")
        return 0
    for message in write_plots(rows, Path(args.out)):
        print(message)
    if args.readme:
        readme = Path(args.readme)
        try:
            tests = csv_path.with_name("gpu_tests.csv")
            gpu_tests = read_rows(tests) if tests.exists() else []
            table = markdown_table(rows, Path(args.out), readme.resolve().parent, gpu_tests)
            update_readme(readme, table)
        except (OSError, ValueError) as e:
            print(f"gpurnn plot: {e}", file=sys.stderr)
            return 1
        print(f"updated the benchmark table in {readme}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpurnn plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
