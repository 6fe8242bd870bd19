"""The host loop that trains one pack of K runs: compile once, step through epochs, evaluate, report.

It knows nothing of Hydra, wandb or files: it calls `on_log(step, epoch, metrics)` with [K]-shaped
numpy arrays and returns a `PackResult`; the app layer turns those into run folders and wandb runs.
The measurements of `bnstudy.core.metrics` ride along: smoothness probes every `probe_every` steps and
internal-covariate-shift probes every `ics_every` steps (each logged at the number of steps done when
probed, i.e. on the state before that step), and at each evaluation the three-mode BN evaluation and
the dead-unit fractions. Evaluations happen every `eval_every_steps` steps when that is set, else at
the end of every `eval_every`-th epoch, and always at the end of training (`evaluation_points`).
The programs it runs come from bnstudy.core.train_programs (compiled through bnstudy.core.compiled), when
to evaluate and probe from bnstudy.core.schedule; this module is the epoch loop and its clock.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnstudy.core import engine, sharding
from bnstudy.core import schedule as schedule_lib
from bnstudy.core.compiled import CompileCache
from bnstudy.core.engine import ArrayData, HParams, Setup
from bnstudy.core.evaluate import PackEvaluator, pack_permutation
from bnstudy.core.schedule import (
    Schedule,
    chunk_plan,
    evaluation_splits,
    resolve_loop,
    resolve_steps_per_call,
    units_split,
)
from bnstudy.core.train_programs import PROBE_PREFIXES, CompiledTrain, build_train_programs
from bnstudy.perf import traced

LogFn = Callable[[int, float, dict[str, np.ndarray]], None]
EpochEndFn = Callable[[engine.TrainState, int], None]  # (state after the epoch, epoch index from 0)


@dataclasses.dataclass
class PackResult:
    state: engine.TrainState
    final: dict[str, np.ndarray]  # key -> [K]: the last evaluation's metrics, the last probe's, ICS medians
    diverged_step: np.ndarray  # [K], -1 where the run did not diverge
    timings: dict[str, float]
    epochs_trained: int  # the last epoch trained, counted from 1: short of the schedule when every run diverged


class NullProgress:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


class PackTrainer:
    """Trains a pack of K runs of one `Setup` on one dataset; `evaluator` evaluates it.

    With a `mesh` (`sharding.pack_mesh`), the pack's models are split over its devices (K a multiple of
    their number) and the data replicated on each; the same compiled programs then run SPMD.
    """

    def __init__(
        self,
        setup: Setup,
        data: ArrayData,
        schedule: Schedule,
        mesh: jax.sharding.Mesh | None = None,
        traced_dir: str | None = None,
    ):
        """`traced_dir`: a folder where the programs' traces are kept for later processes (bnstudy.perf.traced);
        None: every process traces them."""
        data = sharding.replicate(data, mesh)
        self.setup, self.data, self.schedule, self.mesh = setup, data, schedule, mesh
        self.num_train = int(data.train_images.shape[0])
        if setup.batch_size > self.num_train:
            raise ValueError(f"batch size {setup.batch_size} exceeds the {self.num_train} training examples")
        self.steps_per_epoch = self.num_train // setup.batch_size
        if schedule.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, schedule.max_steps_per_epoch)
        # The lr schedule over this run's steps: a static part of the program, like the steps per epoch.
        setup = dataclasses.replace(setup, lr_schedule=setup.lr_schedule.over(schedule.epochs * self.steps_per_epoch))
        self.setup = setup
        self.loop = resolve_loop(schedule.loop)
        self.steps_per_call = resolve_steps_per_call(schedule.steps_per_call, self.steps_per_epoch)
        self.input_shape = tuple(data.train_images.shape[1:])
        # Shared with the evaluator; later packs of the same K reuse it.
        self.cache = CompileCache(traced.TracedStore(traced_dir) if traced_dir else None)
        splits, bn_mode_splits = evaluation_splits(data, schedule)
        self.evaluator = PackEvaluator(
            setup,
            data,
            splits,
            bn_mode_splits,
            batch_size=schedule.eval_batch_size,
            population_batches=schedule.population_batches,
            cache=self.cache,
            units_split=units_split(splits) if schedule.dead_units else None,
        )
        self.programs = build_train_programs(
            setup,
            self.input_shape,
            self.steps_per_epoch,
            schedule.probe_every,
            tuple(schedule.probe_multipliers),
            schedule.ics_every,
            self.steps_per_call,
            mesh,
        )
        self.compiled = CompiledTrain(self.programs, self.cache, data)

    def permutation(self, hp: HParams, epoch: int) -> jax.Array:
        """[K, num_train]: each run's order of the training set in `epoch`."""
        return self.cache.call(pack_permutation(self.num_train), hp.seed, jnp.int32(epoch))

    def compile(self, hp: HParams) -> tuple[engine.TrainState, float]:
        """Compile every program ahead of time (no-op for a pack shape seen before); returns the initial
        state and the compile seconds."""
        t0 = time.perf_counter()
        hp = sharding.split_models(hp, self.mesh)
        state = sharding.split_models(self.cache.compiled(self.programs.init, hp)(hp), self.mesh)
        perm = self.permutation(hp, 0)
        if self.loop == "scan":
            self.compiled.epoch(state, hp, perm)
        else:
            self.compiled.step(state, hp, perm)
            if self.steps_per_call > 1:
                self.compiled.steps(state, hp, perm)
            if self.schedule.probe_every:
                self.compiled.probe(state, hp, perm)
            if self.schedule.ics_every:
                self.compiled.ics(state, hp, perm)
        self.evaluator.compile(state)
        jax.block_until_ready(state)
        return state, time.perf_counter() - t0

    def evaluation_points(self, epoch: int) -> tuple[int, ...]:
        """Steps into `epoch` (1..steps_per_epoch) after which the pack is evaluated (`schedule.evaluation_points`)."""
        return schedule_lib.evaluation_points(self.schedule, self.steps_per_epoch, epoch)

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
        each log point and `on_epoch_end(state, epoch)` after each epoch (and its evaluation). A pack whose
        every run has diverged stops at the end of that epoch: what is left would be NaN arithmetic (slower
        than finite on a CPU) that changes no result, since a diverged run's outcome is its divergence step.

        `state` (default: a fresh init from `hp`) is where training starts, e.g. a restored checkpoint.
        """
        s = self.schedule
        progress_factory = progress_factory or (lambda **kw: NullProgress())
        t_start = time.perf_counter()
        compile0 = self.cache.compile_seconds
        hp = sharding.split_models(hp, self.mesh)
        fresh, _ = self.compile(hp)
        state = fresh if state is None else sharding.split_models(state, self.mesh)
        train_time = 0.0
        clock = {"eval": 0.0, "eval_wall": 0.0}  # evaluation seconds without / with its compilation
        final: dict[str, np.ndarray] = {}
        last_probe: dict[str, np.ndarray] = {}
        ics_probes: list[dict[str, np.ndarray]] = []  # every ICS probe after step 0, for the medians

        def evaluate(st, epoch, steps_into_epoch):
            t0, compiled0 = time.perf_counter(), self.cache.compile_seconds
            last = epoch + 1 == s.epochs and steps_into_epoch == self.steps_per_epoch
            record = self.evaluator.evaluate(st, hp, epoch, bn_modes=s.discrepancy_every_eval or last)
            wall = time.perf_counter() - t0
            clock["eval_wall"] += wall
            clock["eval"] += wall - (self.cache.compile_seconds - compiled0)
            return record

        epochs_trained = start_epoch
        for epoch in range(start_epoch, s.epochs):
            bar = progress_factory(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{s.epochs}")
            t0, compiled0, before = time.perf_counter(), self.cache.compile_seconds, dict(clock)
            state, history, probes, evaluations = self._train_epoch(state, hp, epoch, bar, evaluate)
            eval_wall = clock["eval_wall"] - before["eval_wall"]
            eval_compile = eval_wall - (clock["eval"] - before["eval"])
            train_compile = self.cache.compile_seconds - compiled0 - eval_compile  # scan segments, first use
            train_time += time.perf_counter() - t0 - eval_wall - train_compile
            bar.close()
            # Logging is the caller's time, not the steps': emitted after the epoch's clock stopped.
            n = self.steps_per_epoch
            emit_train_logs(history, probes, evaluations, epoch * n, epoch, n, s.log_every, on_log)
            for i, probe in probes:
                last_probe |= probe
                if epoch * self.steps_per_epoch + i > 0:
                    ics_probes.append({k: v for k, v in probe.items() if k.startswith("ics/")})
            if evaluations:
                final = {**last_probe, **evaluations[max(evaluations)]}
            epochs_trained = epoch + 1
            if on_epoch_end is not None:
                on_epoch_end(state, epoch)
            if all_diverged(state):
                break
        final |= ics_medians(ics_probes)
        eval_time = clock["eval"]
        steps = (epochs_trained - start_epoch) * self.steps_per_epoch
        timings = {
            "compile_time": self.cache.compile_seconds - compile0,
            "train_time": train_time,
            "eval_time": eval_time,
            "wall_time": time.perf_counter() - t_start,
            "step_time": train_time / max(steps, 1),
            "examples_per_s": steps * self.setup.batch_size / max(train_time, 1e-9),
        }
        return PackResult(state, final, np.asarray(jax.device_get(state.diverged_step)), timings, epochs_trained)

    def _probe_due(self, step: int, prefix: str = "smooth/") -> bool:
        return schedule_lib.probe_due(self.schedule, step, prefix)

    def _train_epoch(self, state, hp, epoch, bar, evaluate):
        """Run one epoch, evaluating at its `evaluation_points` with `evaluate(state, epoch, steps into the
        epoch)`; returns the state, its per-step metrics (key -> [steps, K]), its probes [(index in the epoch, {key: [K]})] and its
        evaluations {steps into the epoch: record}, the one at the epoch's end (if any) with the epoch's mean
        train loss/acc."""
        perm = self.permutation(hp, epoch)
        n, base = self.steps_per_epoch, epoch * self.steps_per_epoch
        eval_at = self.evaluation_points(epoch)
        evaluations = {}

        def evaluate_at(st, steps_into_epoch):
            evaluations[steps_into_epoch] = evaluate(st, epoch, steps_into_epoch)

        # probes: probed before step `index`, i.e. on the state of `index` steps
        epoch_of = self._scan_epoch if self.loop == "scan" else self._python_epoch
        state, history, probes = epoch_of(state, hp, perm, base, eval_at, bar, evaluate_at)
        jax.block_until_ready(state)
        if n in evaluations:
            means = {"train/epoch_loss": history["loss"].mean(0), "train/epoch_acc": history["acc"].mean(0)}
            evaluations[n] = {**means, **evaluations[n]}
        return state, history, probes, evaluations

    def _scan_epoch(self, state, hp, perm, base, eval_at, bar, evaluate_at):
        """The epoch as scans: one over the whole epoch, or segments up to each evaluation inside it."""
        n, probes = self.steps_per_epoch, []
        parts, bounds = [], (0, *(p for p in eval_at if p < n), n)
        for start, end in zip(bounds[:-1], bounds[1:]):
            if (start, end) == (0, n):
                state, stacked = self.compiled.epoch(state, hp, perm)(state, hp, self.data, perm)
            else:  # an evaluation inside the epoch: scan up to it, evaluate, go on
                run = self.compiled.segment(state, hp, perm, end - start)
                state, stacked = run(state, hp, self.data, perm, jnp.int32(start))
            parts.append(jax.device_get(stacked))  # key -> [steps, K]; probe keys NaN off probe steps
            if end in eval_at:
                evaluate_at(state, end)
            bar.update(end - start)
        history = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        probe_rows = {k: history.pop(k) for k in list(history) if k.startswith(PROBE_PREFIXES)}
        for i in range(n):
            row = {k: v[i] for k, v in probe_rows.items() if self._probe_due(base + i, k[: k.index("/") + 1])}
            if row:
                probes.append((i, row))
        return state, history, probes

    def _python_epoch(self, state, hp, perm, base, eval_at, bar, evaluate_at):
        """The epoch as compiled calls of 1 or `steps_per_call` steps, probes before the steps they look at."""
        n, probes = self.steps_per_epoch, []
        window, history_parts = [], []  # window: per-call metrics [n, K] not yet fetched
        calls = {1: self.compiled.step(state, hp, perm)}
        if self.steps_per_call > 1:
            calls[self.steps_per_call] = self.compiled.steps(state, hp, perm)
        probe = self.compiled.probe(state, hp, perm) if self.schedule.probe_every else None
        ics = self.compiled.ics(state, hp, perm) if self.schedule.ics_every else None
        # A call starts where a probe looks before its step or an evaluation follows the step before.
        starts_call = lambda j: self._probe_due(base + j) or self._probe_due(base + j, "ics/") or j in eval_at
        for i, m in chunk_plan(0, n, self.steps_per_call, starts_call):
            row = {}  # probes before the step, which donates the state's buffers
            if self._probe_due(base + i):
                row |= probe(state, hp, self.data, perm, jnp.int32(i))
            if self._probe_due(base + i, "ics/"):
                row |= ics(state, hp, self.data, perm, jnp.int32(i))
            if row:
                probes.append((i, row))
            state, call_metrics = calls[m](state, hp, self.data, perm, jnp.int32(i))
            window.append((m, call_metrics))
            done = sum(c for c, _ in window)
            if done >= self.schedule.log_every or i + m == n or i + m in eval_at:
                # Stacked on the host: eager device ops would each compile a program per window shape.
                fetched = [(c, jax.device_get(w)) for c, w in window]
                part = {
                    key: np.concatenate([w[key] if c > 1 else w[key][None] for c, w in fetched])
                    for key in fetched[0][1]
                }
                history_parts.append(part)
                bar.update(done)
                bar.set_postfix_str(f"loss {np.nanmean(part['loss'][-1]):.4f}")
                window = []
            if i + m in eval_at:
                evaluate_at(state, i + m)
        history = {k: np.concatenate([p[k] for p in history_parts]) for k in history_parts[0]}
        probes = jax.device_get(probes)
        return state, history, probes


def emit_train_logs(history, probes, evaluations, base, epoch, steps_per_epoch, log_every, on_log) -> None:
    """One record per `log_every` steps (window means of the per-step metrics), one per probe and
    one per evaluation.

    A probe before step i is logged at step base + i (the steps done when it looked), an evaluation
    after i steps at base + i; records that share a step are merged, and all go out in step order,
    as wandb requires.
    """
    n, every = steps_per_epoch, log_every
    records: dict[int, dict] = {}
    for i, probe in probes:
        records.setdefault(i, {}).update(probe)
    for i, record in evaluations.items():
        records.setdefault(i, {}).update(record)
    for start in range(0, n, every):
        end = min(start + every, n)
        window = {f"train/{k}": v[start:end].mean(0) for k, v in history.items() if k != "lr"}
        window["train/lr"] = history["lr"][end - 1]
        records.setdefault(end, {}).update(window)
    for i in sorted(records):
        on_log(base + i, epoch + i / n, records[i])


def all_diverged(state: engine.TrainState) -> bool:
    return bool(np.all(np.asarray(jax.device_get(state.diverged_step)) >= 0))


def ics_medians(probes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`<key>_median` for each ics/* key: the median over the given probes ([K]; NaN probes of a diverged
    run skipped, NaN if none is left). The studies compare these rather than one noisy last probe."""
    if not probes:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slice: a run diverged before any probe
        return {f"{k}_median": np.nanmedian(np.stack([p[k] for p in probes]), axis=0) for k in probes[0]}


def summarize_final(result: PackResult) -> list[dict[str, Any]]:
    """Per-run final metrics and status from a pack result."""
    out = []
    for k, step in enumerate(result.diverged_step):
        row = {key: float(v[k]) for key, v in result.final.items()}
        row["status"] = "diverged" if step >= 0 else "done"
        row["diverged_step"] = int(step) if step >= 0 else None
        out.append(row)
    return out
