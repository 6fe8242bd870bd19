"""The host loop that trains one pack of K runs: compile once, step through epochs, evaluate, report.

It knows nothing of Hydra, wandb or files: it calls `on_log(step, epoch, metrics)` with [K]-shaped
numpy arrays and returns a `PackResult`; the app layer turns those into run folders and wandb runs.
The measurements of `bnstudy.metrics` ride along: smoothness probes every `probe_every` steps (logged
at the number of steps done when probed) and the three-mode BN evaluation at each evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnstudy import engine, metrics
from bnstudy.engine import ArrayData, HParams, Program
from bnstudy.evaluate import CompileCache, PackEvaluator, Split

LogFn = Callable[[int, float, dict[str, np.ndarray]], None]
EpochEndFn = Callable[[engine.TrainState, int], None]  # (state after the epoch, epoch index from 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """How long to train and how often to look. No defaults here: the app fills every field from the
    config schema (bnstudy/config.py), the one home of default values."""

    epochs: int
    eval_every: int  # epochs; 0 = only at the end
    log_every: int  # steps
    eval_batch_size: int
    loop: str  # python | scan | auto (scan on accelerators, python on CPU)
    steps_per_call: int | str  # python loop: train steps per compiled call (unrolled), or "auto"
    max_steps_per_epoch: int | None  # cap for quick runs and tests
    probe_every: int  # steps between loss-smoothness probes; 0 = off
    probe_multipliers: tuple[float, ...]  # probe step sizes, multiples of the lr
    discrepancy: bool  # evaluate in the three BN modes (models with BN only)
    population_batches: int  # training batches for the population statistics (at most one epoch's)
    discrepancy_train_subset: int  # first N training examples, also evaluated in the three modes


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


# Steps per call that `steps_per_call=auto` picks. MNIST CNN on a 2-core CPU, ms/step with 1/2/4/8 unrolled
# steps per call: 36.7/29.5/27.4/25.9; each unrolled step adds ~0.65 s of compilation, so 4 takes most
# of the gain for a third of 8's compile time.
AUTO_STEPS_PER_CALL = 4


def resolve_steps_per_call(steps_per_call: int | str, steps_per_epoch: int) -> int:
    """`steps_per_call` (an int >= 1, or "auto") as a chunk length in 1..steps_per_epoch."""
    k = AUTO_STEPS_PER_CALL if steps_per_call == "auto" else int(steps_per_call)
    return max(1, min(k, steps_per_epoch))


def chunk_plan(start: int, stop: int, k: int, starts_chunk: Callable[[int], bool]) -> list[tuple[int, int]]:
    """The python loop's calls over the steps [start, stop): (first step, number of steps), each k or 1.

    A chunk of k runs only where none of its steps but the first must start a call (`starts_chunk`:
    a probe looks before that step, so the step before it ends a call); elsewhere, and for an epoch's
    tail shorter than k, single steps run. Two programs (k steps and 1 step) cover every epoch length.
    """
    plan, i = [], start
    while i < stop:
        n = k if i + k <= stop and not any(starts_chunk(j) for j in range(i + 1, i + k)) else 1
        plan.append((i, n))
        i += n
    return plan


@dataclasses.dataclass(frozen=True)
class TrainPrograms:
    """The jitted, pack-vmapped training programs of one `Program` (see `build_train_programs`)."""

    init: Callable  # (hp) -> TrainState
    permutation: Callable  # (seed, epoch, num_examples) -> the epoch's training order
    step: Callable  # (state, hp, data, perm, index) -> (state, metrics); donates the state
    steps: Callable  # (state, hp, data, perm, index) -> (state, metrics [k, K]): k steps; donates the state
    probe: Callable  # (state, hp, data, perm, index) -> smooth/* metrics
    epoch: Callable  # (state, hp, data, perm) -> (state, metrics stacked over steps); donates the state


def build_train_programs(
    program: Program,
    input_shape: tuple[int, ...],
    steps_per_epoch: int,
    probe_every: int,
    multipliers,
    steps_per_call: int = 1,
) -> TrainPrograms:
    p = program
    init = jax.jit(jax.vmap(partial(engine.init_state, p, input_shape)))
    permutation = jax.jit(jax.vmap(engine.epoch_permutation, in_axes=(0, None, None)), static_argnums=2)
    step = jax.vmap(partial(engine.train_step, p), in_axes=(0, 0, None, 0, None))
    # Metrics out on axis 1: [k, K], stacked over steps as the python loop's history is.
    steps = jax.vmap(
        partial(engine.train_steps, p, steps_per_call), in_axes=(0, 0, None, 0, None), out_axes=(0, 1)
    )
    vectorize = jax.default_backend() != "cpu"  # vmap over eta, except where grouped convs are slow
    probe = jax.vmap(
        partial(metrics.smoothness_probe, p, tuple(multipliers), vectorize), in_axes=(0, 0, None, 0, None)
    )

    def body(s, hp, data, perm, i):
        if not probe_every:
            return step(s, hp, data, perm, i)
        # Every model of a pack is at the same step, so model 0's counter is an unbatched predicate
        # and the cond stays a real branch: the probe's cost is paid only on probe steps.
        shapes = jax.eval_shape(probe, s, hp, data, perm, i)
        skipped = lambda: jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype), shapes)
        probed = jax.lax.cond(s.step[0] % probe_every == 0, lambda: probe(s, hp, data, perm, i), skipped)
        s, out = step(s, hp, data, perm, i)
        return s, {**out, **probed}

    def epoch(state, hp, data, perm):
        return jax.lax.scan(lambda s, i: body(s, hp, data, perm, i), state, jnp.arange(steps_per_epoch))

    return TrainPrograms(
        init=init,
        permutation=permutation,
        step=jax.jit(step, donate_argnums=0),
        steps=jax.jit(steps, donate_argnums=0),
        probe=jax.jit(probe),
        epoch=jax.jit(epoch, donate_argnums=0),
    )


def evaluation_splits(data: ArrayData, schedule: Schedule) -> tuple[dict[str, Split], dict[str, Split]]:
    """(splits evaluated with BN on running averages, splits also evaluated in BN's three modes)."""
    test = (data.test_images, data.test_labels)
    if not schedule.discrepancy:
        return {"test": test}, {}
    bn_mode = {"test": test}
    n_subset = min(schedule.discrepancy_train_subset, int(data.train_images.shape[0]))
    if n_subset:
        bn_mode["train_subset"] = (data.train_images[:n_subset], data.train_labels[:n_subset])
    return {"test": test}, bn_mode


class PackTrainer:
    """Trains a pack of K runs of one `Program` on one dataset; `evaluator` evaluates it."""

    def __init__(self, program: Program, data: ArrayData, schedule: Schedule):
        self.program, self.data, self.schedule = program, data, schedule
        self.num_train = int(data.train_images.shape[0])
        if program.batch_size > self.num_train:
            raise ValueError(f"batch size {program.batch_size} exceeds the {self.num_train} training examples")
        self.steps_per_epoch = self.num_train // program.batch_size
        if schedule.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, schedule.max_steps_per_epoch)
        self.loop = resolve_loop(schedule.loop)
        self.steps_per_call = resolve_steps_per_call(schedule.steps_per_call, self.steps_per_epoch)
        self.input_shape = tuple(data.train_images.shape[1:])
        self.cache = CompileCache()  # shared with the evaluator; later packs of the same K reuse it
        splits, bn_mode_splits = evaluation_splits(data, schedule)
        self.evaluator = PackEvaluator(
            program,
            data,
            splits,
            bn_mode_splits,
            batch_size=schedule.eval_batch_size,
            population_batches=schedule.population_batches,
            cache=self.cache,
        )
        self.programs = build_train_programs(
            program,
            self.input_shape,
            self.steps_per_epoch,
            schedule.probe_every,
            schedule.probe_multipliers,
            self.steps_per_call,
        )

    def permutation(self, hp: HParams, epoch: int) -> jax.Array:
        """[K, num_train]: each run's order of the training set in `epoch`."""
        return self.programs.permutation(hp.seed, epoch, self.num_train)

    def compile(self, hp: HParams) -> tuple[engine.TrainState, float]:
        """Compile every program ahead of time (no-op for a pack shape seen before); returns the initial
        state and the compile seconds."""
        t0 = time.perf_counter()
        state = self.cache.compiled(self.programs.init, hp)(hp)
        perm = self.permutation(hp, 0)
        if self.loop == "scan":
            self.compiled_epoch(state, hp, perm)
        else:
            self.compiled_step(state, hp, perm)
            if self.steps_per_call > 1:
                self.compiled_steps(state, hp, perm)
            if self.schedule.probe_every:
                self.compiled_probe(state, hp, perm)
        self.evaluator.compile(state)
        jax.block_until_ready(state)
        return state, time.perf_counter() - t0

    def compiled_step(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.step` for this pack's shapes: (state, hp, data, perm, index) -> (state, metrics)."""
        return self.cache.compiled(self.programs.step, state, hp, self.data, perm, jnp.int32(0))

    def compiled_steps(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.steps`: `steps_per_call` steps from an index -> (state, metrics [k, K])."""
        return self.cache.compiled(self.programs.steps, state, hp, self.data, perm, jnp.int32(0))

    def compiled_probe(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.probe`: (state, hp, data, perm, index) -> smooth/* metrics."""
        return self.cache.compiled(self.programs.probe, state, hp, self.data, perm, jnp.int32(0))

    def compiled_epoch(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.epoch`: (state, hp, data, perm) -> (state, metrics stacked over steps)."""
        return self.cache.compiled(self.programs.epoch, state, hp, self.data, perm)

    def train(
        self,
        hp: HParams,
        on_log: LogFn,
        progress_factory=None,
        *,
        state: engine.TrainState | None = None,
        start_epoch: int = 0,
        on_epoch_end: EpochEndFn | None = None,
    ) -> PackResult:
        """Train the pack from `start_epoch` to the schedule's end, calling `on_log` with [K] arrays at
        each log point and `on_epoch_end(state, epoch)` after each epoch (and its evaluation).

        `state` (default: a fresh init from `hp`) is where training starts, e.g. a restored checkpoint.
        """
        s = self.schedule
        progress_factory = progress_factory or (lambda **kw: NullProgress())
        t_start = time.perf_counter()
        compile0 = self.cache.compile_seconds
        fresh, _ = self.compile(hp)
        state = fresh if state is None else state
        train_time = eval_time = 0.0
        epoch_means: dict[str, np.ndarray] = {}
        final: dict[str, np.ndarray] = {}
        last_probe: dict[str, np.ndarray] = {}
        for epoch in range(start_epoch, s.epochs):
            bar = progress_factory(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{s.epochs}")
            t0 = time.perf_counter()
            state, history, probes = self._train_epoch(state, hp, epoch, bar)
            train_time += time.perf_counter() - t0  # the steps and probes only: logging is the caller's time
            bar.close()
            self._emit_train_logs(history, probes, epoch * self.steps_per_epoch, epoch, on_log)
            epoch_means = {"train/epoch_loss": history["loss"].mean(0), "train/epoch_acc": history["acc"].mean(0)}
            last_probe = probes[-1][1] if probes else last_probe
            last = epoch + 1 == s.epochs
            if last or (s.eval_every and (epoch + 1) % s.eval_every == 0):
                t0, compiled0 = time.perf_counter(), self.cache.compile_seconds
                record = {**epoch_means, **self.evaluator.evaluate(state, hp, epoch)}
                eval_time += time.perf_counter() - t0 - (self.cache.compile_seconds - compiled0)
                on_log(int((epoch + 1) * self.steps_per_epoch), float(epoch + 1), dict(record))
                final = {**last_probe, **record}
            if on_epoch_end is not None:
                on_epoch_end(state, epoch)
        steps = (s.epochs - start_epoch) * self.steps_per_epoch
        timings = {
            "compile_time": self.cache.compile_seconds - compile0,
            "train_time": train_time,
            "eval_time": eval_time,
            "wall_time": time.perf_counter() - t_start,
            "step_time": train_time / max(steps, 1),
            "examples_per_s": steps * self.program.batch_size / max(train_time, 1e-9),
        }
        return PackResult(state, final, np.asarray(jax.device_get(state.diverged_step)), timings)

    def _probe_due(self, step: int) -> bool:
        return bool(self.schedule.probe_every) and step % self.schedule.probe_every == 0

    def _starts_call(self, step: int) -> bool:
        """Whether a call of the python loop must start at `step`: a measurement looks before that step."""
        return self._probe_due(step)

    def _train_epoch(self, state, hp, epoch, bar):
        """Run one epoch; returns the state, its per-step metrics (key -> [steps, K]) and its probes
        ((index in the epoch, {key: [K]}), each taken before that step)."""
        perm = self.permutation(hp, epoch)
        base = epoch * self.steps_per_epoch
        probes = []  # (index in the epoch, {key: [K]}), probed before that step
        if self.loop == "scan":
            state, stacked = self.compiled_epoch(state, hp, perm)(state, hp, self.data, perm)
            history = jax.device_get(stacked)  # key -> [steps, K]; probe keys NaN off probe steps
            probe_rows = {k: history.pop(k) for k in metrics.SMOOTH_KEYS if k in history}
            for i in range(self.steps_per_epoch):
                if self._probe_due(base + i):
                    probes.append((i, {k: v[i] for k, v in probe_rows.items()}))
            bar.update(self.steps_per_epoch)
        else:
            window, history_parts = [], []  # window: per-call metrics [n, K] not yet fetched
            calls = {1: self.compiled_step(state, hp, perm)}
            if self.steps_per_call > 1:
                calls[self.steps_per_call] = self.compiled_steps(state, hp, perm)
            probe = self.compiled_probe(state, hp, perm) if self.schedule.probe_every else None
            plan = chunk_plan(0, self.steps_per_epoch, self.steps_per_call, lambda j: self._starts_call(base + j))
            for i, n in plan:
                if self._probe_due(base + i):  # before the step, which donates the state's buffers
                    probes.append((i, probe(state, hp, self.data, perm, jnp.int32(i))))
                state, call_metrics = calls[n](state, hp, self.data, perm, jnp.int32(i))
                window.append((n, call_metrics))
                done = sum(m for m, _ in window)
                if done >= self.schedule.log_every or i + n == self.steps_per_epoch:
                    # Stacked on the host: eager device ops would each compile a program per window shape.
                    fetched = [(m, jax.device_get(w)) for m, w in window]
                    part = {k: np.concatenate([w[k] if m > 1 else w[k][None] for m, w in fetched]) for k in fetched[0][1]}
                    history_parts.append(part)
                    bar.update(done)
                    bar.set_postfix_str(f"loss {np.nanmean(part['loss'][-1]):.4f}")
                    window = []
            history = {k: np.concatenate([p[k] for p in history_parts]) for k in history_parts[0]}
            probes = jax.device_get(probes)
        jax.block_until_ready(state)
        return state, history, probes

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


def summarize_final(result: PackResult) -> list[dict[str, Any]]:
    """Per-run final metrics and status from a pack result."""
    out = []
    for k, step in enumerate(result.diverged_step):
        row = {key: float(v[k]) for key, v in result.final.items()}
        row["status"] = "diverged" if step >= 0 else "done"
        row["diverged_step"] = int(step) if step >= 0 else None
        out.append(row)
    return out
