"""What a run writes: the CSV columns, where and with what the numbers were made (commit,
card, versions), appending rows to the history CSV, and the summary table printed at
the end.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

# the checkout (or install) folder above the gpurnn package
REPO_ROOT = Path(__file__).resolve().parents[2]
# the tracked history: GPU rows only, so that the README's tables and plots are measured
DEFAULT_CSV = REPO_ROOT / "benchmarks" / "results.csv"


def scratch_csv() -> Path:
    """Where a CPU run or a smoke run appends its rows unless told otherwise: a file in the
    system's temporary folder, outside the checkout (/tmp/gpurnn-bench/results.csv)."""
    return Path(tempfile.gettempdir()) / "gpurnn-bench" / "results.csv"


FIELDS = (
    # the run: which machine and software made the numbers
    "run_id date commit device card driver torch triton cudnn cuda gpurnn "
    # the case
    "suite shape cell T B H input_size layers bidirectional varlen dtype impl mode "
    # the result
    "status ms us_per_step tflops speedup_vs_cudnn peak_mem_mb max_err grad_err repeats "
    # kernel-alone rows (suite "kernel", gpurnn.bench.step_timing): LSTM proj_size, and the
    # polls per step that found their data not yet there (where the run counted them)
    "proj_size failed_polls"
).split()


def _git(*args, cwd: Path = REPO_ROOT) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def project_commit(root: Path | None = None) -> str:
    """The commit the numbers come from. `GPURNN_COMMIT` when set: a run on a copy of the
    working tree without `.git` (the GPU machines receive one) sets it from the checkout it
    was copied from. Else the commit of the checkout that holds the imported gpurnn package
    (`root`, the folder above the package), "+dirty" if its tracked files have changes;
    "unknown" unless `root` is the top of a git repository. An installed copy or an unpacked
    source folder inside some other repository (a home directory under git, a CI
    workspace) must not be credited with that repository's commit."""
    given = os.environ.get("GPURNN_COMMIT", "").strip()
    if given:
        return given
    root = Path(root or REPO_ROOT).resolve()
    top = _git("rev-parse", "--show-toplevel", cwd=root)
    if top is None or Path(top).resolve() != root:
        return "unknown"
    commit = _git("rev-parse", "--short", "HEAD", cwd=root)
    if commit is None:
        return "unknown"  # a repository without commits yet
    if _git("status", "--porcelain", "--untracked-files=no", cwd=root):
        commit += "+dirty"  # numbers from uncommitted code: say so
    return commit


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001 - an unimportable package has no version to record
        return ""


def run_metadata(device: torch.device) -> dict[str, str]:
    """Where and with what the numbers were made: the columns every row of a run shares."""
    import gpurnn

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    commit = project_commit()
    meta = {
        "run_id": f"{now:%Y%m%dT%H%M%SZ}-{commit}",
        "date": now.isoformat().replace("+00:00", "Z"),
        "commit": commit,
        "device": device.type,
        "card": cpu_name(),
        "driver": "",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cudnn": "",
        "cuda": torch.version.cuda or "",
        "gpurnn": gpurnn.__version__,
    }
    if device.type == "cuda":
        meta["card"] = torch.cuda.get_device_name(device)
        meta["cudnn"] = str(torch.backends.cudnn.version() or "")
        meta["driver"] = _nvidia_driver()
    return meta


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def append_rows(path: Path, rows: list[dict], fields=FIELDS) -> None:
    """Append rows to a history CSV with these columns (results.csv's by default); an older
    file with other columns is rewritten with the union of both, so no past row is lost
    when a column is added."""
    path, columns = Path(path), list(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    header: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    if header == columns:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, columns, lineterminator="\n").writerows(rows)
        return
    old_rows = []
    if header:
        with path.open(newline="") as f:
            old_rows = list(csv.DictReader(f))
    union = header + [c for c in columns if c not in header]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, union, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(old_rows + rows)


def summary_table(rows: list[dict]) -> str:
    """Per shape x dtype: each implementation's fwd and fwd+bwd time and speedup."""
    cases: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:
        key = (r["suite"], r["shape"], r["dtype"])
        cases.setdefault(key, {}).setdefault(r["impl"], {})[r["mode"]] = r
    header = (
        f"{'shape':<34} {'dtype':<5} {'impl':<15} {'fwd ms':>9} {'x':>6} "
        f"{'fwd+bwd ms':>10} {'x':>6} {'max err':>8} {'peak MB':>8}  note"
    )
    lines = [header, "-" * len(header)]
    for (suite, shape, dtype), by_impl in cases.items():
        for impl, modes in by_impl.items():
            f, b = modes.get("fwd", {}), modes.get("fwdbwd", {})
            notes = {r["status"] for r in (f, b) if r and r["status"] != "ok"}
            errs = [float(r["max_err"]) for r in (f, b) if r and r.get("max_err")]
            lines.append(
                f"{suite + '/' + shape:<34} {dtype:<5} {impl:<15} "
                f"{f.get('ms', ''):>9} {f.get('speedup_vs_cudnn', ''):>6} "
                f"{b.get('ms', ''):>10} {b.get('speedup_vs_cudnn', ''):>6} "
                f"{(format(max(errs), '.1e') if errs else ''):>8} "
                f"{b.get('peak_mem_mb', ''):>8}  {'; '.join(sorted(notes))[:100]}"
            )
    return "\n".join(lines)
