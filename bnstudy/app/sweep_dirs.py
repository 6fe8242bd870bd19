"""Hydra's sweep folders (`hydra.sweep.dir`, one per `-m` command): removed when the command ends, unless a
launcher left something there (submitit's `.submitit/` logs of a SLURM array). bnstudy writes its own results
to out_dir, and Hydra writes only its `multirun.yaml` and empty job folders here (`output_subdir: null`)."""

from __future__ import annotations

import shutil
from pathlib import Path

HYDRA_FILES = ("multirun.yaml",)
_noted: set[Path] = set()


def note() -> None:
    """Remember this job's sweep folder (call inside a Hydra job; nothing in a single run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        _noted.add(Path(HydraConfig.get().sweep.dir))


def unused(folder: Path) -> bool:
    """The folder holds only Hydra's own files and empty folders."""
    return all(p.is_dir() or p.name in HYDRA_FILES for p in folder.rglob("*"))


def remove_unused() -> None:
    """Remove the noted sweep folders that hold nothing but Hydra's files."""
    for folder in list(_noted):
        _noted.discard(folder)
        if folder.is_dir() and unused(folder):
            shutil.rmtree(folder, ignore_errors=True)
