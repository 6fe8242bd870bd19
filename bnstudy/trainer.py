"""The host loop that trains one pack of K runs: compile once, step through epochs, evaluate, report.

It knows nothing of Hydra, wandb or files: it calls `on_log(step, epoch, metrics)` with [K]-shaped
numpy arrays and returns a `PackResult`; the app layer turns those into run folders and wandb runs.
The measurements of `bnstudy.metrics` ride along: smoothness probes every `probe_every` steps (logged
at the number of steps done when probed) and the three-mode BN evaluation at each evaluation.
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

from bnstudy import engine, metrics
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
    probe_every: int = 0  # steps between loss-smoothness probes; 0 = off
    probe_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # probe step sizes, multiples of the lr
    discrepancy: bool = False  # evaluate in the three BN modes (models with BN only)
    population_batches: int = 20  # training batches for the population statistics (at most one epoch's)
    discrepancy_train_subset: int = 0  # first N training examples, also evaluated in the three modes


@dataclasses.dataclass
class PackResult:
    state: engine.TrainState
    final: dict[str, np.ndarray]  # key -> [K]: the last evaluation's metrics and the last probe's
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
        self._lazy_compile_s = 0.0
        self._compiled: dict = {}
        self.discrepancy_on = schedule.discrepancy and self._has_bn()  # no BN, no disc/* or bn/* keys
        if self.discrepancy_on:
            self._prepare_discrepancy()
        self._jit()

    def _has_bn(self) -> bool:
        shapes = jax.eval_shape(
            partial(self.program.model.init, train=False), jax.random.key(0), jnp.zeros((1, *self.input_shape))
        )
        return bool(jax.tree.leaves(shapes.get("batch_stats", {})))

    def _prepare_discrepancy(self):
        """The splits evaluated in the three BN modes, batched for inference and for batch mode."""
        s, d = self.schedule, self.data
        self.population_batches = max(1, min(s.population_batches, self.num_train // self.program.batch_size))
        splits = {"test": (d.test_images, d.test_labels, self._eval_batches[0])}
        n_subset = min(s.discrepancy_train_subset, self.num_train)
        if n_subset:
            images, labels = d.train_images[:n_subset], d.train_labels[:n_subset]
            splits["train_subset"] = (images, labels, _padded_batches(images, labels, s.eval_batch_size)[0])
        self._disc_splits = {  # name -> (inference batches, batch-mode batches, labels)
            name: (padded, _wrapped_batches(images, self.program.batch_size), labels)
            for name, (images, labels, padded) in splits.items()
        }

    def _jit(self):
        p, every = self.program, self.schedule.probe_every
        self.init_fn = jax.jit(jax.vmap(partial(engine.init_state, p, self.input_shape)))
        self.perm_fn = jax.jit(jax.vmap(engine.epoch_permutation, in_axes=(0, None, None)), static_argnums=2)
        step = jax.vmap(partial(engine.train_step, p), in_axes=(0, 0, None, 0, None))
        self.step_fn = jax.jit(step, donate_argnums=0)
        multipliers = tuple(self.schedule.probe_multipliers)
        vectorize = jax.default_backend() != "cpu"  # vmap over eta, except where grouped convs are slow
        probe = jax.vmap(partial(metrics.smoothness_probe, p, multipliers, vectorize), in_axes=(0, 0, None, 0, None))
        self.probe_fn = jax.jit(probe)
        steps = self.steps_per_epoch

        def body(s, hp, data, perm, i):
            if not every:
                return step(s, hp, data, perm, i)
            # Every model of a pack is at the same step, so model 0's counter is an unbatched predicate
            # and the cond stays a real branch: the probe's cost is paid only on probe steps.
            shapes = jax.eval_shape(probe, s, hp, data, perm, i)
            skipped = lambda: jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype), shapes)
            probed = jax.lax.cond(s.step[0] % every == 0, lambda: probe(s, hp, data, perm, i), skipped)
            s, out = step(s, hp, data, perm, i)
            return s, {**out, **probed}

        def epoch(state, hp, data, perm):
            return jax.lax.scan(lambda s, i: body(s, hp, data, perm, i), state, jnp.arange(steps))

        self.epoch_fn = jax.jit(epoch, donate_argnums=0)
        self.eval_fn = jax.jit(jax.vmap(partial(engine.eval_batch, p), in_axes=(0, 0, None, None, None)))
        if self.discrepancy_on:
            self._jit_discrepancy()

    def _jit_discrepancy(self):
        p = self.program
        dropout_layers = tuple(getattr(p.model, "dropout_fed_blocks", tuple)())
        population_batch = partial(metrics.population_batch, p, bool(dropout_layers))
        self.population_batch_fn = jax.jit(jax.vmap(population_batch, in_axes=(0, 0, 0, None, 0, None)))
        self.population_fn = jax.jit(jax.vmap(metrics.population))
        self.bn_metrics_fn = jax.jit(jax.vmap(partial(metrics.bn_metrics, dropout_layers, p.model.bn_epsilon)))
        self.eval_logits_fn = jax.jit(jax.vmap(partial(engine.eval_logits, p), in_axes=(0, 0, None)))
        # One call per batch: vmapping several batches into one call ran 3x slower on XLA:CPU.
        self.batch_logits_fn = jax.jit(jax.vmap(partial(metrics.batch_mode_logits, p), in_axes=(0, 0, None)))
        self.split_fns = {
            name: jax.jit(jax.vmap(partial(metrics.split_metrics, name), in_axes=(0, None)))
            for name in self._disc_splits
        }

    def _compiled_for(self, fn, *args):
        """`fn` compiled ahead of time for these argument shapes, once per trainer (later packs reuse it)."""
        key = (fn, jax.tree.structure(args), tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
        if key not in self._compiled:
            self._compiled[key] = fn.lower(*args).compile()
        return self._compiled[key]

    def _call(self, fn, *args):
        """Call jitted `fn`, compiling it on first use and counting that as compile time, not eval time."""
        t0 = time.perf_counter()
        compiled = self._compiled_for(fn, *args)
        self._lazy_compile_s += time.perf_counter() - t0
        return compiled(*args)

    def compile(self, hp: HParams) -> tuple[engine.TrainState, float]:
        """Compile every program ahead of time (no-op for a pack shape seen before); returns the initial
        state and the compile seconds."""
        t0 = time.perf_counter()
        self.init_c = self._compiled_for(self.init_fn, hp)
        state = self.init_c(hp)
        perm = self.perm_fn(hp.seed, 0, self.num_train)
        if self.loop == "scan":
            self.epoch_c = self._compiled_for(self.epoch_fn, state, hp, self.data, perm)
        else:
            self.step_c = self._compiled_for(self.step_fn, state, hp, self.data, perm, jnp.int32(0))
            if self.schedule.probe_every:
                self.probe_c = self._compiled_for(self.probe_fn, state, hp, self.data, perm, jnp.int32(0))
        images, labels, mask = (a[0] for a in self._eval_batches)
        self.eval_c = self._compiled_for(self.eval_fn, state.params, state.batch_stats, images, labels, mask)
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

    def discrepancy(self, state: engine.TrainState, hp: HParams, epoch: int) -> dict[str, np.ndarray]:
        """The test split (and the training subset) with BN on running, batch and population statistics.

        Population statistics come from the first `population_batches` batches of `epoch`'s order.
        `test/loss` and `test/acc` are the running-mode numbers, so no separate evaluation is needed.
        """
        pop_stats, out = self.population_stats(state, hp, epoch)
        for name, (batches, wrapped, labels) in self._disc_splits.items():
            n = int(labels.shape[0])
            logits = {
                "running": self._logits(self.eval_logits_fn, state.params, state.batch_stats, batches, n),
                "batch": self._logits(self.batch_logits_fn, state.params, state.batch_stats, wrapped, n),
                "population": self._logits(self.eval_logits_fn, state.params, pop_stats, batches, n),
            }
            out |= self._call(self.split_fns[name], logits, labels)
        out = jax.device_get(out)
        return {"test/loss": out["test/loss_running"], "test/acc": out["test/acc_running"], **out}

    def population_stats(self, state: engine.TrainState, hp: HParams, epoch: int):
        """Each run's population BN statistics (tree like `batch_stats`) and its bn/* metrics."""
        perm = self.perm_fn(hp.seed, epoch, self.num_train)
        per_batch = tuple(
            self._call(self.population_batch_fn, state.params, state.batch_stats, hp, self.data, perm, jnp.int32(b))
            for b in range(self.population_batches)
        )
        pop, pop_dropout = self._call(self.population_fn, per_batch)
        return pop, self._call(self.bn_metrics_fn, state.batch_stats, pop, pop_dropout)

    def _logits(self, fn, params, stats, batches, n):
        """[K, n, classes] logits of the first n examples of a batched split (padding and repeats dropped)."""
        parts = [self._call(fn, params, stats, batches[b]) for b in range(batches.shape[0])]
        return jnp.concatenate(parts, axis=1)[:, :n]

    def train(self, hp: HParams, on_log: LogFn, progress_factory=None) -> PackResult:
        """Train the pack for the schedule, calling `on_log` with [K] arrays at each log point."""
        s = self.schedule
        progress_factory = progress_factory or (lambda **kw: NullProgress())
        t_start = time.perf_counter()
        state, compile_time = self.compile(hp)
        lazy0 = self._lazy_compile_s
        train_time = eval_time = 0.0
        epoch_means: dict[str, np.ndarray] = {}
        final: dict[str, np.ndarray] = {}
        last_probe: dict[str, np.ndarray] = {}
        for epoch in range(s.epochs):
            bar = progress_factory(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{s.epochs}")
            t0 = time.perf_counter()
            state, epoch_means, probe = self._train_epoch(state, hp, epoch, on_log, bar)
            last_probe = probe or last_probe
            train_time += time.perf_counter() - t0
            bar.close()
            last = epoch + 1 == s.epochs
            if last or (s.eval_every and (epoch + 1) % s.eval_every == 0):
                t0, lazy = time.perf_counter(), self._lazy_compile_s
                evaluated = self.discrepancy(state, hp, epoch) if self.discrepancy_on else self.evaluate(state)
                record = {**epoch_means, **evaluated}
                eval_time += time.perf_counter() - t0 - (self._lazy_compile_s - lazy)
                on_log(int((epoch + 1) * self.steps_per_epoch), float(epoch + 1), dict(record))
                final = {**last_probe, **record}
        steps = s.epochs * self.steps_per_epoch
        timings = {
            "compile_time": compile_time + self._lazy_compile_s - lazy0,
            "train_time": train_time,
            "eval_time": eval_time,
            "wall_time": time.perf_counter() - t_start,
            "step_time": train_time / max(steps, 1),
            "examples_per_s": steps * self.program.batch_size / max(train_time, 1e-9),
        }
        return PackResult(state, final, np.asarray(jax.device_get(state.diverged_step)), timings)

    def _probe_due(self, step: int) -> bool:
        return bool(self.schedule.probe_every) and step % self.schedule.probe_every == 0

    def _train_epoch(self, state, hp, epoch, on_log, bar):
        """Run one epoch; returns the state, the epoch's mean train loss/acc per run and its last probe."""
        perm = self.perm_fn(hp.seed, epoch, self.num_train)
        base = epoch * self.steps_per_epoch
        probes = []  # (index in the epoch, {key: [K]}), probed before that step
        if self.loop == "scan":
            state, stacked = self.epoch_c(state, hp, self.data, perm)
            history = jax.device_get(stacked)  # key -> [steps, K]; probe keys NaN off probe steps
            probe_rows = {k: history.pop(k) for k in metrics.SMOOTH_KEYS if k in history}
            for i in range(self.steps_per_epoch):
                if self._probe_due(base + i):
                    probes.append((i, {k: v[i] for k, v in probe_rows.items()}))
            bar.update(self.steps_per_epoch)
        else:
            window, history_parts = [], []
            for i in range(self.steps_per_epoch):
                if self._probe_due(base + i):  # before the step, which donates the state's buffers
                    probes.append((i, self.probe_c(state, hp, self.data, perm, jnp.int32(i))))
                state, step_metrics = self.step_c(state, hp, self.data, perm, jnp.int32(i))
                window.append(step_metrics)
                if len(window) == self.schedule.log_every or i + 1 == self.steps_per_epoch:
                    part = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *window))
                    history_parts.append(part)
                    bar.update(len(window))
                    bar.set_postfix_str(f"loss {np.nanmean(part['loss'][-1]):.4f}")
                    window = []
            history = {k: np.concatenate([p[k] for p in history_parts]) for k in history_parts[0]}
            probes = jax.device_get(probes)
        jax.block_until_ready(state)
        self._emit_train_logs(history, probes, base, epoch, on_log)
        means = {"train/epoch_loss": history["loss"].mean(0), "train/epoch_acc": history["acc"].mean(0)}
        return state, means, (probes[-1][1] if probes else {})

    def _emit_train_logs(self, history, probes, base, epoch, on_log):
        """One record per `log_every` steps (window means of the per-step metrics) and one per probe.

        A probe before step i is logged at step base + i (the steps done when it looked); records
        that share a step are merged, and all go out in step order, as wandb requires.
        """
        n, every = self.steps_per_epoch, self.schedule.log_every
        records: dict[int, dict] = {}
        for i, probe in probes:
            records.setdefault(i, {}).update(probe)
        for start in range(0, n, every):
            end = min(start + every, n)
            window = {f"train/{k}": v[start:end].mean(0) for k, v in history.items() if k != "lr"}
            window["train/lr"] = history["lr"][end - 1]
            records.setdefault(end, {}).update(window)
        for i in sorted(records):
            on_log(base + i, epoch + i / n, records[i])


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


def _wrapped_batches(images, batch_size):
    """[B, batch, ...] batches of exactly `batch_size` real examples, for BN's batch mode.

    The last batch is topped up from the start of the split instead of padded, so batch statistics
    never see padding and every example is normalized with a full batch; the repeats' outputs are
    dropped. A split smaller than the batch is one batch of the whole split.
    """
    n = int(images.shape[0])
    batch_size = min(batch_size, n)
    nb = math.ceil(n / batch_size)
    return images[jnp.arange(nb * batch_size) % n].reshape(nb, batch_size, *images.shape[1:])


def summarize_final(result: PackResult) -> list[dict[str, Any]]:
    """Per-run final metrics and status from a pack result."""
    out = []
    for k, step in enumerate(result.diverged_step):
        row = {key: float(v[k]) for key, v in result.final.items()}
        row["status"] = "diverged" if step >= 0 else "done"
        row["diverged_step"] = int(step) if step >= 0 else None
        out.append(row)
    return out
