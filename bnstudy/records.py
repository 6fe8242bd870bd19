"""The run-record format, the one module that both the training app and the analysis read it through: what a
run folder holds, what a study's raw-runs file holds, and how to read, write and restore them. Only the
standard library and yaml are imported.

A **run folder** (`out_dir/<study or "default">/<run id>/`, written by bnstudy.app.runs.RunFolder) holds
- `config.yaml`: the resolved config of this one model;
- `metrics.jsonl`: one JSON object per logged step (`step` first);
- `summary.json`: `status`, final metrics, timings and provenance (git SHA, `code_fingerprint`, packages,
  device, the training command), and while running the writer's pid, host and heartbeat.
Statuses: `running`, `done`, `diverged` (finished: weights frozen before the divergence), `interrupted`,
`failed`; a reader reports a `running` folder whose writer is gone as `stale` and a finished folder that lacks a
file as `incomplete`.

A **raw-runs file** (`results/<study>/runs.jsonl.gz`, RAW_RUNS_FILE) keeps a study's finished runs in the
repository beside its report, without checkpoints or wandb files: gzip (no timestamp, so the same runs give the
same bytes) of JSON lines, one per run, sorted by run id:
    {"run_id": "<folder name>", "config": {...config.yaml...}, "summary": {...}, "metrics": [{...}, ...]}
`read_raw_runs` yields them back; `restore_raw_runs` writes them out as run folders again, so that training
resumes from them (a finished run is never trained again) and the report reads them like any folder. Beside
them, TRAINING_TIME_FILE: {"total_s": ..., "sessions": [{finished_at, seconds, host, code_fingerprint}, ...]},
the study's training time summed over the sessions that trained it (written by bnstudy.app.landing).

    python -m bnstudy.records restore results/placement/runs.jsonl.gz outputs/results/placement
    python -m bnstudy.records pack outputs/results/placement results/placement/runs.jsonl.gz
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import yaml

RUNNING, DONE, DIVERGED, INTERRUPTED, FAILED, STALE = "running", "done", "diverged", "interrupted", "failed", "stale"
INCOMPLETE = "incomplete"  # how a reader reports a finished folder that lacks one of its files
FINISHED = (DONE, DIVERGED)
FOLDER_FILES = ("config.yaml", "metrics.jsonl", "summary.json")  # every file a finished folder holds
STALE_AFTER_S = 600.0  # a heartbeat this old means the writer is gone (other hosts, where pids say nothing)
RAW_RUNS_FILE = "runs.jsonl.gz"
TRAINING_TIME_FILE = "training_time.json"  # beside a report: the study's training time over the sessions it took


# ------------------------------------------------------------------------------------------- run folders


def missing_files(folder: Path) -> list[str]:
    """The FOLDER_FILES a run folder lacks."""
    return [name for name in FOLDER_FILES if not (Path(folder) / name).is_file()]


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl and the number of lines that did not parse (a run killed mid-write)."""
    records, bad = [], 0
    if not path.exists():
        return records, bad
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def read_jsonl(path: Path) -> list[dict]:
    return read_metrics(path)[0]


def read_run_folder(path: Path) -> tuple[dict, dict]:
    """(config, summary) of one run folder; raises ValueError saying what is wrong with it."""
    for name in ("config.yaml", "summary.json"):
        if not (path / name).is_file():
            raise ValueError(f"no {name}")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config.yaml is not YAML ({str(e).splitlines()[0]})") from None
    try:
        summary = json.loads((path / "summary.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"summary.json is not JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(summary, dict):
        raise ValueError("config.yaml or summary.json is not a mapping")
    return config, summary


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _age_s(iso: str | None) -> float:
    try:
        return time.time() - datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return math.inf


def effective_status(summary: dict, stale_after_s: float = STALE_AFTER_S) -> str:
    """The recorded status, except that a `running` folder whose writer is gone reads as `stale`."""
    status = summary.get("status") or "unknown"
    if status != RUNNING:
        return status
    same_host = summary.get("host") == platform.node() and isinstance(summary.get("pid"), int)
    if same_host and not _pid_alive(summary["pid"]):
        return STALE
    if _age_s(summary.get("heartbeat_at")) > stale_after_s:
        return STALE
    return RUNNING


def run_folders(runs_dir: Path) -> list[Path]:
    """The run folders directly under a study folder (hidden staging and lock entries excluded)."""
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


# ------------------------------------------------------------------------------------------- raw-runs file


def finished_record(folder: Path) -> dict | None:
    """One run folder as a raw-runs record, or None when it is not a finished, complete run."""
    try:
        config, summary = read_run_folder(folder)
    except (OSError, ValueError):
        return None
    if summary.get("status") not in FINISHED or missing_files(folder):
        return None
    return {
        "run_id": folder.name,
        "config": config,
        "summary": summary,
        "metrics": read_jsonl(folder / "metrics.jsonl"),
    }


def write_raw_runs(folders: list[Path], path: Path) -> int:
    """Write the finished runs among `folders` to a raw-runs file (atomically); returns how many."""
    records = sorted((r for r in map(finished_record, folders) if r is not None), key=lambda r: r["run_id"])
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write((json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, path)
    return len(records)


def read_raw_runs(path: Path) -> Iterator[dict]:
    """The records of a raw-runs file; raises ValueError naming the file and line of a bad one."""
    try:
        with gzip.open(path, "rt") as lines:
            for number, line in enumerate(lines, 1):
                record = json.loads(line)
                if not isinstance(record, dict) or not {"run_id", "config", "summary", "metrics"} <= set(record):
                    raise ValueError(f"line {number} is not a run record (run_id, config, summary, metrics)")
                yield record
    except (OSError, EOFError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a raw-runs file ({e})") from None


def restore_raw_runs(path: Path, study_dir: Path) -> int:
    """Write each run of a raw-runs file out as a run folder under `study_dir`, unless a folder of that name
    exists already (a run trained or restored before is left as it is); returns how many were written."""
    written = 0
    for record in read_raw_runs(path):
        folder = study_dir / record["run_id"]
        if folder.exists():
            continue
        staging = study_dir / f".{record['run_id']}.restoring"
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "config.yaml").write_text(yaml.safe_dump(record["config"], sort_keys=False))
        (staging / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in record["metrics"]))
        (staging / "summary.json").write_text(json.dumps(record["summary"], indent=2))
        os.replace(staging, folder)
        written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    """`python -m bnstudy.records restore FILE STUDY_DIR` or `pack STUDY_DIR FILE`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in ("restore", "pack"):
        print(
            "usage: python -m bnstudy.records restore RAW_RUNS_FILE STUDY_DIR | pack STUDY_DIR RAW_RUNS_FILE",
            file=sys.stderr,
        )
        sys.exit(2)
    if args[0] == "restore":
        n = restore_raw_runs(Path(args[1]), Path(args[2]))
        print(f"restored {n} run folder(s) from {args[1]} into {args[2]}")
    else:
        n = write_raw_runs(run_folders(Path(args[1])), Path(args[2]))
        print(f"packed {n} finished run(s) of {args[1]} into {args[2]}")


if __name__ == "__main__":
    main()
