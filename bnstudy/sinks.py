"""Where one trained model's numbers go: its run folder (always) and its wandb run (if enabled).

Run folder layout (docs/design.md §6.1): `config.yaml` (resolved config of this model),
`metrics.jsonl` (one JSON object per logged step), `summary.json` (status, final metrics, timings,
provenance; rewritten atomically). A wandb failure is reported once and never stops training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to null (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temp file in the same folder and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunFolder:
    """`out_dir/<group>/<run_id>/`: config.yaml, metrics.jsonl, summary.json."""

    def __init__(self, path: Path, config: dict, summary: dict):
        self.path = Path(path)
        if self.path.exists():
            log.info("replacing existing run folder %s", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
        self.summary = dict(summary, status="running")
        write_json_atomic(self.path / "summary.json", self.summary)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(_clean({"step": step, **metrics})) + "\n")

    def finish(self, summary: dict) -> None:
        self.summary.update(summary)
        write_json_atomic(self.path / "summary.json", self.summary)
        self._metrics.close()


class WandbRun:
    """One wandb run per trained model; every call is guarded so wandb can never stop training."""

    def __init__(self, settings, run_dir: Path, name: str, group: str, config: dict):
        self.run = None
        if settings.mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                group=group,
                name=name,
                tags=list(settings.tags),
                config=config,
                mode=settings.mode,
                dir=str(run_dir),
                reinit="create_new",  # a pack holds several runs open at once
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # wandb is optional to the science
            self._give_up("init", e)

    def _give_up(self, what: str, error: Exception) -> None:
        warnings.warn(f"wandb {what} failed, continuing without wandb for this run: {error}", stacklevel=3)
        self.run = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in _clean(metrics).items() if v is not None}, step=step)
        except Exception as e:
            self._give_up("log", e)

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(_clean(summary))
            self.run.finish(exit_code=0 if summary.get("status") in ("done", "diverged") else 1)
        except Exception as e:
            self._give_up("finish", e)


class RunSinks:
    """Both sinks of one model behind one interface."""

    def __init__(self, folder: RunFolder, wandb_run: WandbRun):
        self.folder, self.wandb = folder, wandb_run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.folder.log(step, metrics)
        self.wandb.log(step, metrics)

    def finish(self, summary: dict) -> None:
        self.folder.finish(summary)
        self.wandb.finish(self.folder.summary)
