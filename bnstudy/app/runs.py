"""Run identity and the run folder: the one place that names a run, writes its folder and reads it back.

A run is one trained model. Its identity is a hash over what defines the trained model (not where the data
sits, how it is logged, packed or compiled), its id is a readable name plus that hash, and its folder is
`out_dir/<study or "default">/<run id>/` holding:

- `config.yaml`: the resolved config of this model;
- `metrics.jsonl`: one JSON object per logged step (`step` first), appended as training goes;
- `summary.json`: status, final metrics, timings, provenance, and while running the writer's pid, host and a
  heartbeat; always replaced atomically, so a reader never sees half of it.

Status values: `running`, `done`, `diverged` (finished: weights frozen before the divergence),
`interrupted` (SIGTERM/SIGINT), `failed` (an exception). A reader reports a `running` folder whose writer is
gone (its pid is dead on this host, or its heartbeat is older than STALE_AFTER_S) as `stale`, and a finished
folder missing one of FOLDER_FILES as `incomplete` (a re-run trains it again).

One writer per folder: `bnstudy.app.claims.claim()` takes a file lock next to the folder (`.<run id>.lock`).
A re-run over a finished result trains into a hidden staging folder (`.<run id>.staging`) and swaps it in when
it finishes, so a finished result is never deleted before its replacement exists (see `RunFolder.commit`).

An unfinished run (`interrupted`, or `running` whose writer is gone) with a checkpoint in
`<run folder>/checkpoint/` (bnstudy.app.checkpoints) is resumed: `claims.claim()` says so,
`RunFolder(..., resume=...)` reopens the folder instead of recreating it, cuts metrics.jsonl back to the
checkpoint (`truncate_metrics`) and keeps the summary's `wandb_id`, under which the wandb run continues.

Every file is created with the process umask (0644 by default). Only the standard library and yaml are
imported, so the report can read folders without the training stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

# The record format (statuses, the folder's files, reading them back) is bnstudy.records, shared with the analysis.
from bnstudy.records import (  # noqa: F401  (re-exported: the app's modules name them as runs.X)
    DIVERGED,
    DONE,
    FAILED,
    FINISHED,
    FOLDER_FILES,
    INCOMPLETE,
    INTERRUPTED,
    RUNNING,
    STALE,
    effective_status,
    missing_files,
    read_jsonl,
    read_metrics,
    read_run_folder,
    run_folders,
)
from bnstudy.schema import STANDARD_DEPTHS

HEARTBEAT_EVERY_S = 30.0  # at most one summary rewrite per this many seconds from log points
CHECKPOINT_DIR = "checkpoint"

# Keys that do not change the trained model, so they do not change a run's identity: where the data sits,
# logging, output and cache paths, the report text, packing and loop choice, and the probes and
# discrepancy evaluation (they only look: training is bit-identical with or without them).
IDENTITY_EXCLUDED = (
    "dataset.data_dir",
    "dataset.download",
    "logger",
    "out_dir",
    "compile_cache_dir",
    "report",
    "probe",
    "ics",
    "dead_units",
    "discrepancy",
    "train.pack_size",
    "train.devices",
    "train.loop",
    "train.steps_per_call",
    "train.rerun",
    "train.checkpoint_every",
)
RESUMABLE = (INTERRUPTED, RUNNING)  # RUNNING under our lock: its writer is gone (stale)


# --------------------------------------------------------------------------------------------- identity


def _as_dict(run: Any) -> dict:
    return dataclasses.asdict(run) if dataclasses.is_dataclass(run) else dict(run)


def identity(run: Any) -> dict:
    """The part of a resolved run config (schema object or dict) that defines the trained model."""
    d = json.loads(json.dumps(_as_dict(run), default=str))  # a deep copy
    for key in IDENTITY_EXCLUDED:
        *parents, last = key.split(".")
        node = d
        for part in parents:
            node = node.get(part) or {}
        node.pop(last, None)
    model = d.get("model") or {}
    if "depth" in model and model["depth"] in (None, STANDARD_DEPTHS.get(model.get("name"))):
        del model["depth"]  # the standard depth is the network from before the key existed: the same id
    optimizer = d.get("optimizer") or {}
    if "schedule" in optimizer:
        optimizer["schedule"] = schedule_identity(optimizer["schedule"])
        if optimizer["schedule"] is None:
            del optimizer["schedule"]  # a constant lr: the runs from before the key existed, the same id
    return d


# The keys of `optimizer.schedule` that shape each schedule's lr (the others are unused by it).
SCHEDULE_KEYS = {"constant": ("warmup",), "cosine": ("warmup", "floor"), "step": ("warmup", "milestones", "factor")}


def schedule_identity(schedule: dict) -> dict | None:
    """What of `optimizer.schedule` shapes the lr: its name and the keys it uses; None for a constant lr
    without warmup (the training of every run from before schedules existed)."""
    name = schedule.get("name", "constant")
    if name == "constant" and not schedule.get("warmup"):
        return None
    return {"name": name, **{k: schedule[k] for k in SCHEDULE_KEYS.get(name, ()) if k in schedule}}


def config_hash(run: Any) -> str:
    blob = json.dumps(identity(run), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_name(run: Any) -> str:
    """Readable name of a resolved run, e.g. `mnist_t10k-cnn-before_relu-lr0.1-bs128-s0`; a network of other
    than its standard depth carries it (`mnist_t10k-cnn6-...`, `resnet32`); the standard depth keeps the name."""
    d = _as_dict(run)
    m, o = d["model"], d["optimizer"]
    kind = m.get("norm_kind", "batch")
    norm = m["norm"] if kind == "batch" or m["norm"] == "none" else f"{m['norm']}-{kind}"
    depth = m.get("depth")
    network = m["name"] if depth in (None, STANDARD_DEPTHS.get(m["name"])) else f"{m['name']}{depth}"
    parts = [d["dataset"]["name"], network, norm, f"lr{o['lr']:g}"]
    schedule = (o.get("schedule") or {}).get("name", "constant")
    if schedule != "constant":
        parts[-1] += f"-{schedule}"  # the peak lr of a decaying schedule
    if m["init_scale"] != 1.0:
        parts.append(f"init{m['init_scale']:g}")
    if m["dropout"]["placement"] != "none":
        parts.append(f"drop-{m['dropout']['placement']}{m['dropout']['rate']:g}")
    if o["weight_decay"]:
        parts.append(f"wd{o['weight_decay']:g}")
    parts.append(f"bs{d['train']['batch_size']}")
    parts.append(f"s{d['seed']}")
    return "-".join(parts)


def run_id(run: Any) -> str:
    """Readable name plus the identity hash, e.g. `mnist_t10k-cnn-before_relu-lr0.1-bs128-s0-1a2b3c4d`."""
    return f"{run_name(run)}-{config_hash(run)}"


def run_dir(run: Any) -> Path:
    d = _as_dict(run)
    return Path(d["out_dir"]) / (d.get("study") or "default") / run_id(run)


def staging_dir(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.staging"


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def checkpoint_dir(folder: Path) -> Path:
    return folder / CHECKPOINT_DIR


# ------------------------------------------------------------------------------------------------ files


def clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to null (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Write a sibling temp file and rename it over `path`: readers see the old or the new file, never half.
    A plain `open` (not mkstemp, which forces 0600) so the file gets the umask's mode like every other file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: say which (a full disk)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(clean(obj), indent=2, sort_keys=True) + "\n")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def writer_fields() -> dict:
    """Who writes a running folder, so a reader can tell a live run from a dead one."""
    return {"pid": os.getpid(), "host": platform.node(), "heartbeat_at": now_iso()}


class RunFolder:
    """The writer of one run folder. `path` is where files go now (the folder itself, or its staging folder
    for a re-run over a finished result); `final` is where the result ends up after `commit()`.

    `resume=(last_step, records)` reopens an unfinished folder at a checkpoint instead of recreating it: its
    metrics.jsonl keeps the records up to that point, its summary keeps the earlier fields (`wandb_id`)."""

    def __init__(
        self, path: Path, config: dict, summary: dict, final: Path | None = None, resume: tuple[int, int] | None = None
    ):
        self.path, self.final = Path(path), Path(final or path)
        if resume is not None:
            earlier = read_run_folder(self.path)[1]
            self.records = truncate_metrics(self.path, *resume)
            summary = {**{k: v for k, v in earlier.items() if k != "error"}, **summary}
        else:
            if self.path.exists():  # an unfinished attempt (interrupted, failed, stale): never a finished result
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            self.records = 0
        try:
            write_text_atomic(self.path / "config.yaml", yaml.safe_dump(clean(config), sort_keys=False))
            self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
            self.summary = dict(summary, status=RUNNING, **writer_fields())
            self._beat = time.monotonic()
            write_json_atomic(self.path / "summary.json", self.summary)
        except OSError:  # a full disk: no folder without a summary is left behind (a resumed one keeps its files)
            if resume is None:
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(clean({"step": step, **metrics})) + "\n")
        self.records += 1
        self.heartbeat()

    def heartbeat(self, every_s: float = HEARTBEAT_EVERY_S) -> None:
        if time.monotonic() - self._beat >= every_s:
            self._beat = time.monotonic()
            self.summary["heartbeat_at"] = now_iso()
            write_json_atomic(self.path / "summary.json", self.summary)

    def update(self, fields: dict) -> None:
        self.summary.update(fields)
        write_json_atomic(self.path / "summary.json", self.summary)

    def finish(self, summary: dict) -> None:
        """Write the final summary, whatever the status."""
        self._metrics.close()
        self.update({**summary, "heartbeat_at": now_iso()})

    def commit_if_finished(self) -> None:
        if self.summary.get("status") in FINISHED and self.path != self.final:
            self.commit()

    def commit(self) -> None:
        """Swap the staging folder in: old result -> `.<id>.old`, staging -> final, then delete the old one.
        Each step is a rename, so at any moment a complete result exists under one of two names;
        `recover()` undoes a swap cut between the two renames."""
        old = self.final.parent / f".{self.final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if self.final.exists():
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        self.path = self.final
        shutil.rmtree(old, ignore_errors=True)


def recover(folder: Path) -> None:
    """Finish or undo a swap that a crash cut short, and drop the staging folder of a killed re-run (call
    under the folder's lock: no live writer uses either)."""
    old = folder.parent / f".{folder.name}.old"
    if old.exists():
        if folder.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, folder)
    shutil.rmtree(staging_dir(folder), ignore_errors=True)


def truncate_metrics(folder: Path, last_step: int, records: int | None = None) -> int:
    """Drop metrics.jsonl records after `last_step`, and keep at most the first `records` (a record logged at
    `last_step` after the checkpoint, e.g. the next epoch's first probe, would otherwise appear twice once the
    resumed run logs it again); returns the records kept."""
    path = folder / "metrics.jsonl"
    kept = [r for r in read_jsonl(path) if r.get("step", -1) <= last_step][:records]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)


class WriteFailed(Exception):
    """A run's file could not be written (`error`: the OSError, e.g. no space left on device); `folders`:
    the run folders marked `failed` (as far as the disk allowed)."""

    def __init__(self, error: OSError, folders: list[str]):
        super().__init__(str(error))
        self.error, self.folders = error, folders
