"""A study landing in its report folder (`bnstudy-study STUDY --out results/STUDY`): the runs kept there (the
raw-runs file, bnstudy.records) restored as run folders before any training, so that a fresh clone continues an
unfinished study and never trains a finished run again; the code fingerprint of those runs checked against this
code's before anything is trained on top of them; the finished runs written back there after every round, so a
session that ends before the study is decided loses none of them; and the study's training time, summed over
the sessions that trained it, kept beside the report (records.TRAINING_TIME_FILE, read by the results index)."""

from __future__ import annotations

import json
import platform
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from bnstudy import records
from bnstudy.app import provenance


def restore(out: Path | None, runs_dir: Path) -> int:
    """Run folders written from `out`'s raw-runs file into `runs_dir` (those not there already); 0 without one."""
    raw = out / records.RAW_RUNS_FILE if out is not None else None
    if raw is None or not raw.is_file():
        return 0
    return records.restore_raw_runs(raw, runs_dir)


def finished_fingerprints(runs_dir: Path) -> Counter:
    """Code fingerprint -> finished runs in `runs_dir` recorded at it ("unrecorded" for runs from before it)."""
    counts: Counter = Counter()
    if not runs_dir.is_dir():
        return counts
    for folder in records.run_folders(runs_dir):
        try:
            summary = records.read_run_folder(folder)[1]
        except (OSError, ValueError):
            continue
        if summary.get("status") in records.FINISHED:
            counts[summary.get("code_fingerprint") or "unrecorded"] += 1
    return counts


def fingerprint_problem(runs_dir: Path) -> str | None:
    """Why training on top of `runs_dir` would mix code (its finished runs at another fingerprint), or None."""
    mine = provenance.code_fingerprint()
    others = {k: n for k, n in finished_fingerprints(runs_dir).items() if k != mine}
    if not others:
        return None
    found = ", ".join(f"{k} ({n} runs)" for k, n in others.items())
    return (
        f"the finished runs in {runs_dir} were trained at code fingerprint {found}; this code's is {mine}. What "
        f"decides the numbers has changed since, so the study is trained again: remove those runs (and the "
        f"report folder's {records.RAW_RUNS_FILE}), or pass --allow-mixed-fingerprints to add runs of this code "
        f"to them anyway (the report then says so)."
    )


def add_training_time(out: Path | None, seconds: float) -> None:
    """Add one session's training time to `out`/records.TRAINING_TIME_FILE (sessions listed, total summed)."""
    if out is None:
        return
    path = out / records.TRAINING_TIME_FILE
    try:
        kept = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        kept = {}
    sessions = list(kept.get("sessions", []))
    sessions.append(
        {
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
            "host": platform.node(),
            "code_fingerprint": provenance.code_fingerprint(),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    record = {"total_s": round(sum(s["seconds"] for s in sessions), 1), "sessions": sessions}
    records_tmp = path.with_name(f".{path.name}.tmp")
    records_tmp.write_text(json.dumps(record, indent=1) + "\n")
    records_tmp.replace(path)


def keep_raw_runs(out: Path | None, runs_dir: Path) -> int:
    """The study's finished runs so far into `out`'s raw-runs file, after each round: a session that ends before
    the study is decided keeps them in the report folder, and the next one restores them."""
    if out is None or not runs_dir.is_dir():
        return 0
    return records.write_raw_runs(records.run_folders(runs_dir), out / records.RAW_RUNS_FILE)
