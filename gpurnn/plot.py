"""`python -m gpurnn plot`: pictures and the README table from benchmarks/results.csv.

For each card the CSV holds, only its latest run is drawn (runs are told apart by the
run_id column), so a plot never mixes code versions on one card:

  speedup_vs_batch.png   speedup over cuDNN against batch size (the shape family with
                         the most batch sizes: T=1024, H=768 LSTM in the GPU matrix)
  speedup_vs_hidden.png  speedup over cuDNN against hidden size
  memory.png             peak training memory per shape and implementation (CUDA only)

`--readme` rewrites the table between `<!-- bench:start -->` and `<!-- bench:end -->`
with the latest run, headed by its card and date.
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
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


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


def markdown_table(rows: list[dict], plots_dir: Path | None, readme_dir: Path) -> str:
    """The latest run's results as markdown: one line per shape, dtype and implementation."""
    if not rows:
        return "No benchmark rows yet.\n"
    newest = max(rows, key=lambda r: (r.get("date", ""), r.get("run_id", "")))
    run = [r for r in rows if r.get("run_id") == newest.get("run_id")]
    first = run[0]
    baseline = "cuDNN" if first["device"] == "cuda" else "torch.nn on CPU"
    lines = [
        f"Latest run: **{first['card']}** ({first['device']}), {first['date']}, "
        f"commit `{first['commit']}`, torch {first['torch']}, triton {first['triton'] or '-'}, "
        f"cuDNN {first['cudnn'] or '-'}, driver {first['driver'] or '-'}. "
        f"Times are medians in ms; × is the speedup over {baseline} in the same run; "
        "err is the largest forward error against torch.nn in fp32.",
        "",
        "| shape | dtype | impl | fwd ms | × | fwd+bwd ms | × | peak MB | err | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    cases: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in run:
        cases.setdefault((r["suite"], r["shape"], r["dtype"]), {}).setdefault(r["impl"], {})[
            r["mode"]
        ] = r
    for (suite, shape, dtype), by_impl in cases.items():
        for impl, modes in by_impl.items():
            f, b = modes.get("fwd", {}), modes.get("fwdbwd", {})
            errs = [e for e in map(_float, (f.get("max_err"), b.get("max_err"))) if e is not None]
            statuses = sorted({r["status"] for r in (f, b) if r})
            status = "ok" if statuses == ["ok"] else "; ".join(s for s in statuses if s != "ok")
            status = status.replace("|", "/")[:80]
            lines.append(
                f"| {suite}/{shape} | {dtype} | {impl} | {f.get('ms', '')} | "
                f"{f.get('speedup_vs_cudnn', '')} | {b.get('ms', '')} | "
                f"{b.get('speedup_vs_cudnn', '')} | {b.get('peak_mem_mb', '')} | "
                f"{format(max(errs), '.1e') if errs else ''} | {status} |"
            )
    if plots_dir is not None:
        images = [p for p in PLOTS if (Path(plots_dir) / p).exists()]
        if images:
            rel = Path(os.path.relpath(Path(plots_dir), readme_dir)).as_posix()
            lines.append("")
            lines += [f"![{p[:-4].replace('_', ' ')}]({rel}/{p})" for p in images]
    return "\n".join(lines) + "\n"


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
            update_readme(readme, markdown_table(rows, Path(args.out), readme.resolve().parent))
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
