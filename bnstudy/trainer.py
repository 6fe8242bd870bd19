"""The host loop that trains one pack of K runs: compile once, step through epochs, evaluate, report.

It knows nothing of Hydra, wandb or files: it calls `on_log(step, epoch, metrics)` with [K]-shaped
numpy arrays and returns a `PackResult`; the app layer turns those into run folders and wandb runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnstudy import engine
from bnstudy.engine import ArrayData, HParams, Program

LogFn = Callable[[int, float, dict[str, np.ndarray]], None]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long to train and how often to look."""

    epochs: int = 1
    eval_every: int = 1  # epochs; 0 = only at the end
    log_every: int = 50  # steps
    eval_batch_size: int = 1000
    loop: str = "auto"  # python | scan | auto (scan on accelerators, python on CPU)
    max_steps_per_epoch: int | None = None  # cap for quick runs and tests


@dataclasses.dataclass
class PackResult:
    state: engine.TrainState
    final: dict[str, np.ndarray]  # key -> [K]
    diverged_step: np.ndarray  # [K], -1 where the run did not diverge
    timings: dict[str, float]


class NullProgress:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def resolve_loop(loop: str) -> str:
    if loop != "auto":
        return loop
    return "python" if jax.default_backend() == "cpu" else "scan"


class PackTrainer:
    """Compiled, vmapped programs for a pack of K runs of one `Program` on one dataset."""

    def __init__(self, program: Program, data: ArrayData, schedule: Schedule):
        self.program, self.data, self.schedule = program, data, schedule
        self.num_train = int(data.train_images.shape[0])
        if program.batch_size > self.num_train:
            raise ValueError(f"batch size {program.batch_size} exceeds the {self.num_train} training examples")
        self.steps_per_epoch = self.num_train // program.batch_size
        if schedule.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, schedule.max_steps_per_epoch)
        self.loop = resolve_loop(schedule.loop)
        self.input_shape = tuple(data.train_images.shape[1:])
        self._eval_batches = _padded_batches(data.test_images, data.test_labels, schedule.eval_batch_size)
        self._jit()

    def _jit(self):
        p = self.program
        self.init_fn = jax.jit(jax.vmap(partial(engine.init_state, p, self.input_shape)))
        self.perm_fn = jax.jit(jax.vmap(engine.epoch_permutation, in_axes=(0, None, None)), static_argnums=2)
        step = jax.vmap(partial(engine.train_step, p), in_axes=(0, 0, None, 0, None))
        self.step_fn = jax.jit(step, donate_argnums=0)
        steps = self.steps_per_epoch

        def epoch(state, hp, data, perm):
            return jax.lax.scan(lambda s, i: step(s, hp, data, perm, i), state, jnp.arange(steps))

        self.epoch_fn = jax.jit(epoch, donate_argnums=0)
        self.eval_fn = jax.jit(jax.vmap(partial(engine.eval_batch, p), in_axes=(0, 0, None, None, None)))

    def compile(self, hp: HParams) -> tuple[engine.TrainState, float]:
        """Compile every program ahead of time; returns the initial state and the compile seconds."""
        t0 = time.perf_counter()
        self.init_c = self.init_fn.lower(hp).compile()
        state = self.init_c(hp)
        perm = self.perm_fn(hp.seed, 0, self.num_train)
        if self.loop == "scan":
            self.epoch_c = self.epoch_fn.lower(state, hp, self.data, perm).compile()
        else:
            self.step_c = self.step_fn.lower(state, hp, self.data, perm, jnp.int32(0)).compile()
        images, labels, mask = (a[0] for a in self._eval_batches)
        self.eval_c = self.eval_fn.lower(state.params, state.batch_stats, images, labels, mask).compile()
        jax.block_until_ready(state)
        return state, time.perf_counter() - t0

    def evaluate(self, state: engine.TrainState) -> dict[str, np.ndarray]:
        """Test loss and accuracy of each run, BN in inference mode (running averages)."""
        images, labels, mask = self._eval_batches
        totals = None
        for b in range(images.shape[0]):
            sums = self.eval_c(state.params, state.batch_stats, images[b], labels[b], mask[b])
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        n = float(self.data.test_images.shape[0])
        return {"test/loss": totals["loss_sum"] / n, "test/acc": totals["correct_sum"] / n}

    def train(self, hp: HParams, on_log: LogFn, progress_factory=None) -> PackResult:
        """Train the pack for the schedule, calling `on_log` with [K] arrays at each log point."""
        s = self.schedule
        progress_factory = progress_factory or (lambda **kw: NullProgress())
        t_start = time.perf_counter()
        state, compile_time = self.compile(hp)
        train_time = eval_time = 0.0
        epoch_means: dict[str, np.ndarray] = {}
        final: dict[str, np.ndarray] = {}
        for epoch in range(s.epochs):
            bar = progress_factory(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{s.epochs}")
            t0 = time.perf_counter()
            state, epoch_means = self._train_epoch(state, hp, epoch, on_log, bar)
            train_time += time.perf_counter() - t0
            bar.close()
            last = epoch + 1 == s.epochs
            if last or (s.eval_every and (epoch + 1) % s.eval_every == 0):
                t0 = time.perf_counter()
                final = {**epoch_means, **self.evaluate(state)}
                eval_time += time.perf_counter() - t0
                on_log(int((epoch + 1) * self.steps_per_epoch), float(epoch + 1), final)
        steps = s.epochs * self.steps_per_epoch
        timings = {
            "compile_time": compile_time,
            "train_time": train_time,
            "eval_time": eval_time,
            "wall_time": time.perf_counter() - t_start,
            "step_time": train_time / max(steps, 1),
            "examples_per_s": steps * self.program.batch_size / max(train_time, 1e-9),
        }
        return PackResult(state, final, np.asarray(jax.device_get(state.diverged_step)), timings)

    def _train_epoch(self, state, hp, epoch, on_log, bar):
        """Run one epoch; returns the state and the epoch's mean train loss/acc per run."""
        perm = self.perm_fn(hp.seed, epoch, self.num_train)
        base = epoch * self.steps_per_epoch
        if self.loop == "scan":
            state, stacked = self.epoch_c(state, hp, self.data, perm)
            history = jax.device_get(stacked)  # key -> [steps, K]
            bar.update(self.steps_per_epoch)
        else:
            window, history_parts = [], []
            for i in range(self.steps_per_epoch):
                state, metrics = self.step_c(state, hp, self.data, perm, jnp.int32(i))
                window.append(metrics)
                if len(window) == self.schedule.log_every or i + 1 == self.steps_per_epoch:
                    part = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *window))
                    history_parts.append(part)
                    bar.update(len(window))
                    bar.set_postfix_str(f"loss {np.nanmean(part['loss'][-1]):.4f}")
                    window = []
            history = {k: np.concatenate([p[k] for p in history_parts]) for k in history_parts[0]}
        jax.block_until_ready(state)
        self._emit_train_logs(history, base, epoch, on_log)
        return state, {"train/epoch_loss": history["loss"].mean(0), "train/epoch_acc": history["acc"].mean(0)}

    def _emit_train_logs(self, history, base, epoch, on_log):
        """One log record per `log_every` steps: window means of the per-step metrics."""
        n, every = self.steps_per_epoch, self.schedule.log_every
        for start in range(0, n, every):
            end = min(start + every, n)
            metrics = {f"train/{k}": v[start:end].mean(0) for k, v in history.items() if k != "lr"}
            metrics["train/lr"] = history["lr"][end - 1]
            on_log(base + end, epoch + end / n, metrics)


def _padded_batches(images, labels, batch_size):
    """Test set as [B, batch, ...] device arrays padded to full batches, with a validity mask."""
    n = int(images.shape[0])
    batch_size = min(batch_size, n)
    nb = math.ceil(n / batch_size)
    pad = nb * batch_size - n
    mask = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
    images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = jnp.concatenate([labels, jnp.zeros(pad, labels.dtype)])
    shape = lambda a: a.reshape(nb, batch_size, *a.shape[1:])
    return shape(images), shape(labels), shape(mask)


def summarize_final(result: PackResult) -> list[dict[str, Any]]:
    """Per-run final metrics and status from a pack result."""
    out = []
    for k, step in enumerate(result.diverged_step):
        row = {key: float(v[k]) for key, v in result.final.items()}
        row["status"] = "diverged" if step >= 0 else "done"
        row["diverged_step"] = int(step) if step >= 0 else None
        out.append(row)
    return out
