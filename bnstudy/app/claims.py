"""Which process trains a run folder, and how: a file lock per folder, then skip a finished result, resume an
unfinished attempt that has a checkpoint, or train (into a staging folder when a finished result is replaced).
The folder's layout and statuses are bnstudy.app.runs'."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from bnstudy.app.runs import (
    FINISHED,
    RESUMABLE,
    STALE,
    RunFolder,
    checkpoint_dir,
    config_hash,
    lock_path,
    missing_files,
    read_run_folder,
    recover,
    run_dir,
    staging_dir,
)


@dataclass
class Claim:
    """The outcome of asking for a run folder: `folder` to train into (lock held), or a reason to skip."""

    run: Any
    final: Path
    folder: RunFolder | None = None
    lock: filelock.BaseFileLock | None = None
    skip: str | None = None  # "done", "diverged", "locked"
    rerun: bool = False  # a finished result exists and is being replaced
    resume: bool = False  # an unfinished attempt with a checkpoint: continue it in place

    @property
    def work_dir(self) -> Path:
        return staging_dir(self.final) if self.rerun else self.final

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def finished_status(folder: Path, expected_hash: str) -> str | None:
    """`done`/`diverged` when the folder holds a finished result of this config hash with all its files,
    else None."""
    summary = _summary_of(folder, expected_hash)
    if summary.get("status") in FINISHED and not missing_files(folder):
        return summary["status"]
    return None


def finished_but_missing(folder: Path, expected_hash: str) -> list[str]:
    """The files a folder whose summary says finished (this config hash) lacks; such a result is trained
    again."""
    return missing_files(folder) if _summary_of(folder, expected_hash).get("status") in FINISHED else []


def unreadable(folder: Path) -> str | None:
    """Why an existing run folder cannot be read (`summary.json is not JSON (...)`: a truncated file), else None;
    such a folder is trained again."""
    if not folder.is_dir():
        return None
    try:
        read_run_folder(folder)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _summary_of(folder: Path, expected_hash: str) -> dict:
    """The folder's summary when it is a readable run folder of this config hash, else {}."""
    try:
        _, summary = read_run_folder(folder)
    except (OSError, ValueError):
        return {}
    return summary if summary.get("config_hash") == expected_hash else {}


def tidy_finished(final: Path) -> None:
    """Drop what a killed re-run left beside a finished result that is being skipped (its staging folder, a
    half-done swap), when no live writer holds the folder's lock."""
    if not (staging_dir(final).exists() or final.parent.joinpath(f".{final.name}.old").exists()):
        return
    lock = filelock.FileLock(lock_path(final), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        return  # a re-run in progress writes that staging folder
    try:
        recover(final)
    finally:
        lock.release()


def resumable(folder: Path, expected_hash: str) -> bool:
    """The folder holds an unfinished attempt of this config hash (interrupted, or left running) with a
    checkpoint folder. Read under the folder's lock, where a `running` status means its writer is gone."""
    try:
        _, summary = read_run_folder(folder)
    except (OSError, ValueError):
        return False
    return (
        summary.get("config_hash") == expected_hash
        and summary.get("status") in RESUMABLE + (STALE,)
        and checkpoint_dir(folder).is_dir()
    )


def claim(run: Any, rerun: bool = False) -> Claim:
    """Lock the run's folder and decide: skip a finished result (unless `rerun`), skip a locked one, resume an
    unfinished attempt that has a checkpoint (unless `rerun`: retrain from scratch), else train (into the
    folder, or into its staging folder when a finished result is being replaced)."""
    final = run_dir(run)
    c = Claim(run, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(lock_path(final), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        c.skip = "locked"
        return c
    recover(final)
    status = finished_status(final, config_hash(run))
    if status and not rerun:
        lock.release()
        c.skip = status
        return c
    c.lock, c.rerun = lock, status is not None
    c.resume = not rerun and resumable(final, config_hash(run))
    return c
