"""The record of GPU test runs (`benchmarks/gpu_tests.csv`): one row per backend and run of
its `pytest -m gpu` tests, read from the pytest log and exit status the device check
hands over (`python -m gpurnn dispatch --record-gpu-tests BACKEND ...`).

A row's status says what the run tells about the backend's correctness on that card:
- `passed`: every test that ran passed;
- `failed`: a test failed (or errored while running);
- `incomplete`: the run stopped before it could say — at its time limit, or before any
  test ran (a collection or import error, pytest's own exit statuses 2-5): a harness
  problem must not bar a backend from `auto`; the `reason` column says what happened;
- `skipped`: every test skipped itself (no CUDA, the backend not installed).
Only `passed` and `failed` are conclusive; the dispatch table (gpurnn.bench.table) keeps
a backend whose latest conclusive record on a card failed out of `auto` there.
"""

from __future__ import annotations

import csv
import datetime
import re
from collections.abc import Iterable
from pathlib import Path

from gpurnn.bench.results import append_rows, cpu_name, project_commit

# one row per backend and run; `reason` was added later: older files without it still read
FIELDS = ("date", "card", "commit", "backend", "status", "passed", "failed", "note", "reason")
STATUSES = ("passed", "failed", "incomplete", "skipped")
# statuses that say something about correctness
CONCLUSIVE = ("passed", "failed")
# timeout(1)'s exit statuses: stopped at the limit (124), killed after the grace period (137)
TIMED_OUT = (124, 137)
# pytest's exit statuses that mean no test result at all
PYTEST_EXITS = {
    2: "interrupted (a collection or import error)",
    3: "pytest internal error",
    4: "pytest usage error",
    5: "no tests collected",
}

_PYTEST_LINE = re.compile(
    r"^(?:(?P<id>\S+::\S+) (?P<outcome>PASSED|FAILED|ERROR)\b"
    r"|(?P<outcome2>PASSED|FAILED|ERROR) (?P<id2>\S+::\S+))"
)
_COLLECTION_ERROR = re.compile(r"ERROR collecting (?P<path>\S+)")


def pytest_outcomes(log_text: str) -> tuple[set[str], set[str]]:
    """(passed, failed) test ids in pytest `-v` / `-rA` output (an ERROR counts as failed),
    as far as the log got: a run stopped at its time limit still says what finished."""
    passed, failed = set(), set()
    for line in log_text.splitlines():
        m = _PYTEST_LINE.match(line.strip())
        if not m:
            continue
        test = m["id"] or m["id2"]
        (passed if (m["outcome"] or m["outcome2"]) == "PASSED" else failed).add(test)
    return passed - failed, failed


def collection_errors(log_text: str) -> list[str]:
    """'path: first error line' for each test file pytest could not collect (import it)."""
    errors, lines, seen = [], log_text.splitlines(), set()
    for k, line in enumerate(lines):
        m = _COLLECTION_ERROR.search(line)
        if not m or m["path"] in seen:
            continue
        seen.add(m["path"])
        message = next((x[1:].strip() for x in lines[k + 1 :] if x.startswith("E ")), "")
        errors.append(f"{m['path']}: {message}" if message else m["path"])
    return errors


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def run_status(
    exit_status: int, passed: set[str], failed: set[str], log_text: str = ""
) -> tuple[str, str]:
    """(status, reason): what a GPU test run says about its backend (see the module's
    docstring); the reason is empty when the status says it all."""
    if failed:
        return "failed", ""
    uncollected = collection_errors(log_text)
    collection = "collection errors: " + "; ".join(uncollected) if uncollected else ""
    if exit_status in TIMED_OUT:
        got = f"after {len(passed)} passed" if passed else "before any test finished"
        return "incomplete", _joined(f"stopped at its time limit {got}", collection)
    if exit_status == 0:
        if uncollected:  # --continue-on-collection-errors: what was collected passed
            return "incomplete", collection
        return ("passed", "") if passed else ("skipped", "every test skipped itself")
    if exit_status in PYTEST_EXITS:
        return "incomplete", _joined(PYTEST_EXITS[exit_status], collection)
    if uncollected:
        return "incomplete", collection
    if not passed:  # died before a test finished, with no failure to show for it
        return "incomplete", f"exit {exit_status} before any test finished"
    return "failed", f"exit {exit_status} after {len(passed)} passed, with no failed test named"


def read_records(path: Path) -> list[dict]:
    """The records in a gpu_tests.csv ([] if there is none); rows of an older file lack
    the columns added since."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def record_gpu_tests(
    backend: str, log_path: Path, exit_status: int, out: Path, reason: str = ""
) -> dict:
    """Appends one record of a GPU test run (parsed from its pytest log) to `out` and
    returns it. `reason` is the caller's account of how the run ended (e.g. the device
    check's "skipped: the total limit was spent"), kept beside what the log shows."""
    import torch

    text = Path(log_path).read_text(errors="replace")
    passed, failed = pytest_outcomes(text)
    status, found = run_status(exit_status, passed, failed, text)
    note = f"pytest exit {exit_status}"
    if failed:
        note += "; failed: " + " ".join(sorted(t.split("::")[-1] for t in failed))[:300]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    record = {
        "date": now.isoformat().replace("+00:00", "Z"),
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "commit": project_commit(),
        "backend": backend,
        "status": status,
        "passed": len(passed),
        "failed": len(failed),
        "note": note,
        "reason": _joined(reason.strip(), found)[:300],
    }
    append_rows(out, [record], FIELDS)
    return record


def _latest_conclusive(records: Iterable[dict]) -> dict[tuple[str, str], str]:
    """(card, backend) -> status of its latest conclusive GPU test record."""
    latest: dict[tuple[str, str], tuple[str, str]] = {}
    for r in records:
        if r.get("status") not in CONCLUSIVE:
            continue
        k = (r["card"], r["backend"])
        if r["date"] >= latest.get(k, ("", ""))[0]:
            latest[k] = (r["date"], r["status"])
    return {k: status for k, (_, status) in latest.items()}


def failed_by_card(records: Iterable[dict]) -> dict[str, set[str]]:
    """card -> backends whose latest conclusive record on that card failed (every card
    with a conclusive record is a key, with an empty set if nothing failed)."""
    failed: dict[str, set[str]] = {}
    for (card, backend), status in _latest_conclusive(records).items():
        failed.setdefault(card, set())
        if status == "failed":
            failed[card].add(backend)
    return failed


def passed_by_card(records: Iterable[dict]) -> dict[str, set[str]]:
    """card -> backends (or variants) whose latest conclusive record there passed."""
    passed: dict[str, set[str]] = {}
    for (card, backend), status in _latest_conclusive(records).items():
        if status == "passed":
            passed.setdefault(card, set()).add(backend)
    return passed
