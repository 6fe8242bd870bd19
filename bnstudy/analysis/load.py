"""A study's runs, from run folders, a raw-runs file or the wandb API, as one table: a frame of runs and their
logged histories.

Run folders (`config.yaml`, `metrics.jsonl`, `summary.json`) and raw-runs files (`runs.jsonl.gz` beside a
committed report) are in the format of bnstudy.records; a wandb group is read through its public API into the
same frame. Nothing here interprets a metric.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from bnstudy import records as runs_lib
from bnstudy.analysis.errors import ReportError, ReportWarning


@dataclass
class LoadedRuns:
    """A study's runs as read: one frame row per run, each run's history on demand, what could not be read."""

    frame: pd.DataFrame  # one row per run: flattened config, summary metrics, status, path
    history: dict[str, Callable[[], list[dict]]]  # run_id -> its logged records (metrics.jsonl)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    specs: list[dict] = field(default_factory=list)  # the runs' `report:` blocks
    config_columns: list[str] = field(default_factory=list)  # the frame's columns that come from config.yaml


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON strings so that columns stay hashable."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def run_row(config: dict, summary: dict, path: str) -> dict:
    row = {**flatten(summary), **config_row(config)}
    row["run_id"] = summary.get("run_id") or Path(path).name
    row["status"] = summary.get("status") or "unknown"
    row["path"] = path
    return row


def config_row(config: dict) -> dict:
    return flatten({k: v for k, v in config.items() if k != "report"})


def read_history(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (bnstudy.records.read_metrics); lines that do not parse (a run killed
    mid-write) are skipped with a warning."""
    records, bad = runs_lib.read_metrics(path)
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that are not JSON", ReportWarning, stacklevel=2)
    return records


def load_local(runs_dir: Path, study: str | None = None) -> LoadedRuns:
    """Every run folder under `runs_dir` (directly, or one level down in its study folders: `--runs outputs`);
    corrupt ones are skipped with a warning. A `running` folder whose writer is gone reads as `stale`. With
    `study`, only the runs whose config records that study are read (see `keep_study`)."""
    raw = raw_runs_file(runs_dir)
    if raw is not None:
        return load_raw(raw, study)
    if not runs_dir.is_dir():
        raise ReportError(f"no runs directory {runs_dir}: expected one run folder per trained model there.")
    rows, history, skipped, specs, config_cols, others = [], {}, [], [], {}, Counter()
    for path in run_folder_paths(runs_dir):
        try:
            config, summary = runs_lib.read_run_folder(path)
        except (OSError, ValueError) as e:
            skipped.append((str(path), str(e)))
            warnings.warn(f"skipping corrupt run folder {path}: {e}", ReportWarning, stacklevel=2)
            continue
        if study is not None and config.get("study") != study:
            others[config.get("study")] += 1
            continue
        summary = {**summary, "status": runs_lib.effective_status(summary)}
        missing = runs_lib.missing_files(path)
        if missing and summary["status"] in runs_lib.FINISHED:
            warnings.warn(
                f"{path}: {summary['status']}, but {', '.join(missing)} is missing; counted as incomplete",
                ReportWarning,
                stacklevel=2,
            )
            summary["status"] = runs_lib.INCOMPLETE
        row = run_row(config, summary, str(path))
        rows.append(row)
        config_cols.update(dict.fromkeys(config_row(config)))
        history[row["run_id"]] = partial(read_history, path / "metrics.jsonl")
        if isinstance(config.get("report"), dict):
            specs.append(config["report"])
    keep_study(study, len(rows), others, str(runs_dir))
    return LoadedRuns(pd.DataFrame(rows), history, skipped, specs, list(config_cols))


def raw_runs_file(path: Path) -> Path | None:
    """The raw-runs file `path` names: the file itself, or a report folder holding one and no run folders."""
    if path.is_file():
        return path
    candidate = path / runs_lib.RAW_RUNS_FILE
    if candidate.is_file() and not run_folder_paths(path):
        return candidate
    return None


def load_raw(path: Path, study: str | None = None) -> LoadedRuns:
    """The runs of a raw-runs file (bnstudy.records), into the same frame as run folders."""
    rows, history, specs, config_cols, others = [], {}, [], {}, Counter()
    try:
        records = list(runs_lib.read_raw_runs(path))
    except ValueError as e:
        raise ReportError(str(e)) from None
    for record in records:
        config, summary = record["config"], record["summary"]
        if study is not None and config.get("study") != study:
            others[config.get("study")] += 1
            continue
        row = run_row(config, summary, f"{path}#{record['run_id']}")
        rows.append(row)
        config_cols.update(dict.fromkeys(config_row(config)))
        history[row["run_id"]] = lambda metrics=record["metrics"]: metrics
        if isinstance(config.get("report"), dict):
            specs.append(config["report"])
    keep_study(study, len(rows), others, str(path))
    return LoadedRuns(pd.DataFrame(rows), history, [], specs, list(config_cols))


def is_study_folder(path: Path) -> bool:
    """A folder of run folders (`outputs/placement`, `outputs/default`), not a run folder itself."""
    if any((path / name).exists() for name in runs_lib.FOLDER_FILES):
        return False
    return any((child / "config.yaml").is_file() for child in runs_lib.run_folders(path))


def run_folder_paths(runs_dir: Path) -> list[Path]:
    """The run folders directly under `runs_dir`, and those of the study folders directly under it."""
    paths = []
    for path in runs_lib.run_folders(runs_dir):
        paths += runs_lib.run_folders(path) if is_study_folder(path) else [path]
    return paths


def found_studies(others: Counter) -> str:
    """`12 run(s) trained without experiment= and 9 run(s) of study 'dropout'`."""
    parts = [
        f"{n} run(s) " + (f"of study {name!r}" if name else "trained without `experiment=` (no study recorded)")
        for name, n in others.most_common()
    ]
    return " and ".join(parts)


def keep_study(study: str | None, kept: int, others: Counter, where: str) -> None:
    """A report reads only runs of its own study: none of them is an error naming what was found instead,
    some runs of other studies beside them a warning."""
    if study is None or not others:
        return
    if kept == 0:
        raise ReportError(
            f"{where} holds no run of study {study!r}: found {found_studies(others)}. A report reads only the "
            f"runs trained for its study (`bnstudy-study {study}` or `bnstudy-train -m experiment={study}`)."
        )
    warnings.warn(f"ignoring {found_studies(others)} in {where}: not runs of study {study!r}", ReportWarning)


WANDB_STATES = {"finished": "done", "running": "running", "crashed": "failed", "failed": "failed", "killed": "failed"}


def load_wandb(entity: str | None, project: str, group: str, study: str | None = None) -> LoadedRuns:
    """The runs of one wandb group through the public API, into the same frame as run folders (with `study`,
    only those whose config records it)."""
    where = f"{entity + '/' if entity else ''}{project}, group {group!r}"
    try:
        import wandb

        path = f"{entity}/{project}" if entity else project
        api_runs = list(wandb.Api(timeout=60).runs(path, filters={"group": group}))
    except Exception as e:  # no login, no network, no such project: all end here
        raise ReportError(
            f"could not read wandb runs of {where}: {type(e).__name__}: {e}. Check `wandb login`, the network "
            f"and --entity/--project/--group, or report from run folders with --source local."
        ) from None
    if not api_runs:
        raise ReportError(f"wandb has no runs in {where}.")
    rows, history, specs, config_cols, others = [], {}, [], {}, Counter()
    for r in api_runs:
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        if study is not None and config.get("study") != study:
            others[config.get("study")] += 1
            continue
        summary = {k: v for k, v in dict(r.summary_metrics).items() if not k.startswith("_")}
        summary.setdefault("status", WANDB_STATES.get(r.state, r.state))
        summary.setdefault("run_id", r.name)
        row = run_row(config, summary, r.url)
        rows.append(row)
        config_cols.update(dict.fromkeys(config_row(config)))
        history[row["run_id"]] = lambda r=r: [dict(rec) for rec in r.scan_history()]
        if isinstance(config.get("report"), dict):
            specs.append(config["report"])
    keep_study(study, len(rows), others, where)
    return LoadedRuns(pd.DataFrame(rows), history, [], specs, list(config_cols))
