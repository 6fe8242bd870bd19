"""A pack's checkpoint cadence: when to save, each model's slice into its run folder, the pack restored."""

from __future__ import annotations

import time

import jax

from bnstudy.app import checkpoints
from bnstudy.app import claims as claims_lib
from bnstudy.app.config import Config
from bnstudy.app.signals import signals_deferred
from bnstudy.app.sinks import RunSinks
from bnstudy.core.engine import HParams
from bnstudy.core.trainer import PackTrainer


def checkpoint_due(cfg: Config, epoch: int) -> bool:
    """After epoch index `epoch`? Never after the last one: the finished result follows at once."""
    every = cfg.train.checkpoint_every
    return bool(every) and (epoch + 1) % every == 0 and epoch + 1 < cfg.train.epochs


class PackCheckpointer:
    """`on_epoch_end` hook of a pack: each model's slice of the state into its own run folder's checkpoint."""

    def __init__(self, cfg: Config, sinks: list[RunSinks], steps_per_epoch: int):
        self.cfg, self.sinks, self.steps_per_epoch = cfg, sinks, steps_per_epoch
        self.writers: list[checkpoints.Writer] = []
        self.seconds = 0.0

    def __call__(self, state, epoch: int) -> None:
        if not checkpoint_due(self.cfg, epoch):
            return
        t0 = time.perf_counter()
        for sink in self.sinks:  # the wandb id is in each summary before a checkpoint can resume the run
            sink.wandb_ready()
        host = jax.device_get(state)  # a copy: the next epoch donates the state's buffers
        with signals_deferred():  # a signal now waits for the checkpoint to be complete (milliseconds)
            self.writers = self.writers or [checkpoints.Writer(s.folder.path) for s in self.sinks]
            for k, (sink, writer) in enumerate(zip(self.sinks, self.writers)):
                done = epoch + 1
                writer.save(
                    checkpoints.model_slice(host, k),
                    checkpoints.Progress(done, done * self.steps_per_epoch, sink.folder.records),
                )
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class DamagedCheckpoints(Exception):
    """Some claimed runs' checkpoints cannot be read back (a save cut short): `damaged` maps each such claim's
    position in the pack to the reason."""

    def __init__(self, damaged: dict[int, str]):
        super().__init__(f"{len(damaged)} unreadable checkpoint(s)")
        self.damaged = damaged


def restored_pack(trainer: PackTrainer, hp: HParams, claims: list[claims_lib.Claim], pack_size: int):
    """The pack's state stacked from each claimed run's checkpoint (padding repeats the last run, as `hp` does);
    raises DamagedCheckpoints naming every run whose checkpoint does not restore."""
    target = checkpoints.model_shape(jax.eval_shape(trainer.programs.init, hp))
    states, damaged = [], {}
    for k, c in enumerate(claims):
        try:
            states.append(checkpoints.restore(c.work_dir, target)[0])
        except Exception as e:  # orbax and tensorstore raise many kinds for a truncated file
            damaged[k] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    if damaged:
        raise DamagedCheckpoints(damaged)
    return checkpoints.stack(states + [states[-1]] * (pack_size - len(states)))
