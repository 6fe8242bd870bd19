"""Checkpoints of one run: its slice of the pack's TrainState and how far it got, in `<run folder>/checkpoint/`.

A checkpoint holds one model's params, BN statistics, optimizer state, step and divergence flags (its whole
`TrainState` slice, so a resumed pack may be made of other members than the one that saved it) plus a small
JSON record (`Progress`): epochs and steps completed and the metrics.jsonl records written until then.
orbax writes each one into a temporary folder and renames it into place, and deletes the previous one only
after that: a kill at any moment leaves the last complete checkpoint readable. Only the last one is kept.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bnstudy.app.runs import checkpoint_dir
from bnstudy.core.engine import TrainState


@dataclasses.dataclass(frozen=True)
class Progress:
    """How far a run was when its checkpoint was taken."""

    epoch: int  # epochs completed; training resumes at this epoch index
    step: int  # training steps completed
    metrics_records: int  # records of metrics.jsonl written by then (a resumed run keeps exactly these)


def _manager(folder: Path, create: bool) -> ocp.CheckpointManager:
    """`create`: the writer's manager, which also clears temporary folders a killed save left behind (a reader's
    must not: it may look while the lock holder writes)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=create, enable_async_checkpointing=False, cleanup_tmp_directories=create
    )
    # orbax accepts only absolute paths, and `out_dir` may be given relative to the working directory
    return ocp.CheckpointManager(checkpoint_dir(folder).absolute(), options=options)


class Writer:
    """Writes the checkpoints of one run folder (synchronously: a save is done when `save` returns)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manager = _manager(self.folder, create=True)

    def save(self, state: TrainState, progress: Progress) -> None:
        """`state`: this model's slice, on the host (see `model_slice`). A save that fails (a full disk)
        leaves no half-written temporary folder; the previous checkpoint stays."""
        check_space(self.folder, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(dataclasses.asdict(progress))
        )
        try:
            self.manager.save(progress.epoch, args=args, force=True)
            self.manager.wait_until_finished()
        except BaseException as e:
            remove_temporary(self.folder)
            if "No space left on device" in str(e):  # orbax reports ENOSPC as a ValueError from tensorstore
                raise no_space(self.folder) from e
            raise

    def close(self) -> None:
        self.manager.close()


SAVE_OVERHEAD_BYTES = 256 * 1024  # orbax's metadata files and the progress record, generously


def check_space(folder: Path, state: TrainState) -> None:
    """Refuse a save that cannot fit before it starts: a save that fails midway makes orbax's background
    writers print tracebacks we cannot silence, and the previous checkpoint is kept until the new one is in."""
    needed = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)) + SAVE_OVERHEAD_BYTES
    where = checkpoint_dir(Path(folder))
    if shutil.disk_usage(where if where.is_dir() else Path(folder)).free < needed:
        raise no_space(folder)


def no_space(folder: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoint_dir(Path(folder))))


def latest(folder: Path) -> Progress | None:
    """The progress of the folder's last complete checkpoint, or None when it has none."""
    if not checkpoint_dir(Path(folder)).is_dir():
        return None
    manager = _manager(Path(folder), create=False)
    try:
        epoch = manager.latest_step()
        if epoch is None:
            return None
        restored = manager.restore(epoch, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
        return Progress(**restored.progress)
    finally:
        manager.close()


def restore(folder: Path, target: TrainState) -> tuple[TrainState, Progress]:
    """The last checkpoint's state, shaped like `target` (one model's abstract or concrete state)."""
    manager = _manager(Path(folder), create=False)
    try:
        epoch = manager.latest_step()
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(Path(folder))}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore())
        restored = manager.restore(epoch, args=args)
        return restored.state, Progress(**restored.progress)
    finally:
        manager.close()


def remove_temporary(folder: Path) -> None:
    """Drop the temporary folders of unfinished saves (orbax names them `<step>.orbax-checkpoint-tmp-*`)."""
    for tmp in checkpoint_dir(Path(folder)).glob("*tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


def remove(folder: Path) -> None:
    """Drop a finished run's checkpoint: its result is final, nothing resumes from it."""
    shutil.rmtree(checkpoint_dir(Path(folder)), ignore_errors=True)


def model_slice(state: TrainState, k: int) -> TrainState:
    """Model `k` of a pack's state (leading axis K)."""
    return jax.tree.map(lambda x: x[k], state)


def model_shape(pack_state: TrainState) -> TrainState:
    """One model's abstract state from a pack's (abstract or concrete) state."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), pack_state)


def stack(states: list[TrainState]) -> TrainState:
    """A pack's state from its models' states (the inverse of `model_slice`)."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *states)
