"""The host loop that trains one pack of K runs: compile once, step through epochs, evaluate, report.

It knows nothing of Hydra, wandb or files: it calls `on_log(step, epoch, metrics)` with [K]-shaped
numpy arrays and returns a `PackResult`; the app layer turns those into run folders and wandb runs.
The measurements of `bnstudy.core.metrics` ride along: smoothness probes every `probe_every` steps and
internal-covariate-shift probes every `ics_every` steps (each logged at the number of steps done when
probed, i.e. on the state before that step), and at each evaluation the three-mode BN evaluation and
the dead-unit fractions. Evaluations happen every `eval_every_steps` steps when that is set, else at
the end of every `eval_every`-th epoch, and always at the end of training (`evaluation_points`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnstudy.core import engine, metrics, sharding
from bnstudy.core.engine import ArrayData, HParams, Setup
from bnstudy.core.evaluate import CompileCache, PackEvaluator, Split, pack_permutation
from bnstudy.perf import traced
from bnstudy.perf.xla_flags import jit_rare

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
    discrepancy_every_eval: bool  # at every evaluation; False = at the last evaluation of training only
    population_batches: int  # training batches for the population statistics (at most one epoch's)
    discrepancy_train_subset: int  # first N training examples, also evaluated in the three modes
    ics_every: int  # steps between internal-covariate-shift probes; 0 = off
    eval_every_steps: int  # steps between evaluations; 0 = every `eval_every` epochs instead
    dead_units: bool  # relu/<layer>/dead_frac at each evaluation (on `units_split`)


@dataclasses.dataclass
class PackResult:
    state: engine.TrainState
    final: dict[str, np.ndarray]  # key -> [K]: the last evaluation's metrics, the last probe's, ICS medians
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


# Steps per call that `steps_per_call=auto` picks, per backend. MNIST CNN on a 2-core CPU
# (benchmarks/step_vs_torch.py), ms/step with 1/2/4/8 steps per call: 50.2/49.2/49.9/48.8 with
# bnstudy/allocator.py's malloc settings (without them each call faulted in fresh memory and chunks paid:
# 49.2/32.7/29.7 at 1/4/8, another sitting). So on CPU a chunk buys <3% while each unrolled step adds
# ~0.65 s of cold XLA compilation (the default job's train_steps program compiled in 11 s at k=8 against
# 2.9 s for one step) and ~0.2 s of tracing and lowering to every warm start. An accelerator pays a
# dispatch per call instead, which chunks amortize.
AUTO_STEPS_PER_CALL_CPU = 1
AUTO_STEPS_PER_CALL_ACCELERATOR = 8


def auto_steps_per_call(backend: str) -> int:
    return AUTO_STEPS_PER_CALL_CPU if backend == "cpu" else AUTO_STEPS_PER_CALL_ACCELERATOR


def resolve_steps_per_call(steps_per_call: int | str, steps_per_epoch: int, backend: str | None = None) -> int:
    """`steps_per_call` (an int >= 1, or "auto": `auto_steps_per_call` of `backend`, default JAX's) as a
    chunk length in 1..steps_per_epoch."""
    if steps_per_call == "auto":
        k = auto_steps_per_call(backend or jax.default_backend())
    else:
        k = int(steps_per_call)
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
    """The jitted, pack-vmapped training programs of one `Setup` (see `build_train_programs`)."""

    init: Callable  # (hp) -> TrainState
    step: Callable  # (state, hp, data, perm, index) -> (state, metrics); donates the state
    steps: Callable  # (state, hp, data, perm, index) -> (state, metrics [k, K]): k steps; donates the state
    probe: Callable  # (state, hp, data, perm, index) -> smooth/* metrics
    epoch: Callable  # (state, hp, data, perm) -> (state, metrics stacked over steps); donates the state
    ics: Callable | None = None  # (state, hp, data, perm, index) -> ics/* metrics
    segment: Callable | None = None  # (length) -> `epoch` over steps [start, start + length): (..., start)


PROBE_PREFIXES = ("smooth/", "ics/")  # keys of the probes taken before a step


@functools.lru_cache(maxsize=16)
def build_train_programs(
    setup: Setup,
    input_shape: tuple[int, ...],
    steps_per_epoch: int,
    probe_every: int,
    multipliers,
    ics_every: int,
    steps_per_call: int = 1,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainPrograms:
    """The training programs' jitted functions; memoized (the arguments must be hashable), so equal
    arguments give the same functions, and a later trainer of the same program in this process reuses
    their traces and `CompileCache`'s compiled programs. With a `mesh`, step/probe/epoch run per
    device on its slice of the models (`sharding.per_device`)."""
    p = setup
    vectorize = jax.default_backend() != "cpu"  # vmap over eta, except where grouped convs are slow
    # Everything the programs close over, for bnstudy.perf.traced's store; none with a mesh (it keeps
    # single-device programs only).
    settings = (
        f"{p!r} {input_shape=} {steps_per_epoch=} {probe_every=} {tuple(multipliers)=} {ics_every=} "
        f"{steps_per_call=} {vectorize=}"
    )
    label = (lambda name: None) if mesh is not None else (lambda name: f"train {settings} {name}")
    init = jit_rare(jax.vmap(partial(engine.init_state, p, input_shape)), label=label("init"))
    step = jax.vmap(partial(engine.train_step, p), in_axes=(0, 0, None, 0, None))
    # Metrics out on axis 1: [k, K], stacked over steps as the python loop's history is.
    steps = jax.vmap(partial(engine.train_steps, p, steps_per_call), in_axes=(0, 0, None, 0, None), out_axes=(0, 1))
    probe = jax.vmap(partial(metrics.smoothness_probe, p, tuple(multipliers), vectorize), in_axes=(0, 0, None, 0, None))

    ics = jax.vmap(partial(metrics.ics_probe, p), in_axes=(0, 0, None, 0, None))
    probes = [(every, fn) for every, fn in ((probe_every, probe), (ics_every, ics)) if every]

    def body(s, hp, data, perm, i):
        probed = {}
        for every, fn in probes:
            # Every model of a pack is at the same step, so model 0's counter is an unbatched predicate
            # and the cond stays a real branch: the probe's cost is paid only on probe steps.
            shapes = jax.eval_shape(fn, s, hp, data, perm, i)
            skipped = lambda shapes=shapes: jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype), shapes)
            probed |= jax.lax.cond(s.step[0] % every == 0, lambda fn=fn: fn(s, hp, data, perm, i), skipped)
        s, out = step(s, hp, data, perm, i)
        return s, {**out, **probed}

    models, stacked = sharding.P(sharding.MODEL_AXIS), sharding.P(None, sharding.MODEL_AXIS)  # [K], [steps, K]
    split = (True, True, False, True, False)  # (state, hp, data, perm, index)

    def scanned(length, state, hp, data, perm, start):
        return jax.lax.scan(lambda s, i: body(s, hp, data, perm, i), state, start + jnp.arange(length))

    @functools.cache
    def segment(length: int):
        per_device = sharding.per_device(partial(scanned, length), mesh, split, (models, stacked))  # index: start
        return traced.jit(per_device, label=label(f"segment {length}"), donate_argnums=0)

    def epoch(state, hp, data, perm):
        return scanned(steps_per_epoch, state, hp, data, perm, 0)

    return TrainPrograms(
        init=init,
        step=traced.jit(
            sharding.per_device(step, mesh, split, (models, models)), label=label("step"), donate_argnums=0
        ),
        steps=traced.jit(
            sharding.per_device(steps, mesh, split, (models, stacked)), label=label("steps"), donate_argnums=0
        ),
        probe=traced.jit(sharding.per_device(probe, mesh, split, models), label=label("probe")),
        epoch=traced.jit(
            sharding.per_device(epoch, mesh, split[:4], (models, stacked)), label=label("epoch"), donate_argnums=0
        ),
        ics=traced.jit(sharding.per_device(ics, mesh, split, models), label=label("ics")),
        segment=segment,
    )


def evaluation_splits(data: ArrayData, schedule: Schedule) -> tuple[dict[str, Split], dict[str, Split]]:
    """(splits evaluated with BN on running averages, splits also evaluated in BN's three modes).

    Every model gets `test`, `val` (when the data holds one out) and `train_subset` (the first
    `discrepancy_train_subset` training examples, all of them trained on, for the generalization gap)
    in inference mode; with `discrepancy`, `test` and `train_subset` also get BN's three modes."""
    test = (data.test_images, data.test_labels)
    splits = {"test": test}
    if data.val_images is not None:
        splits["val"] = (data.val_images, data.val_labels)
    n_subset = min(schedule.discrepancy_train_subset, int(data.train_images.shape[0]))
    if n_subset:
        splits["train_subset"] = (data.train_images[:n_subset], data.train_labels[:n_subset])
    bn_mode_names = ("test", "train_subset") if schedule.discrepancy else ()
    return splits, {name: splits[name] for name in bn_mode_names if name in splits}


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
            self.compiled_epoch(state, hp, perm)
        else:
            self.compiled_step(state, hp, perm)
            if self.steps_per_call > 1:
                self.compiled_steps(state, hp, perm)
            if self.schedule.probe_every:
                self.compiled_probe(state, hp, perm)
            if self.schedule.ics_every:
                self.compiled_ics(state, hp, perm)
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

    def compiled_ics(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.ics`: (state, hp, data, perm, index) -> ics/* metrics."""
        return self.cache.compiled(self.programs.ics, state, hp, self.data, perm, jnp.int32(0))

    def compiled_segment(self, state: engine.TrainState, hp: HParams, perm: jax.Array, length: int):
        """The compiled `programs.segment(length)`: (state, hp, data, perm, start) -> (state, stacked metrics)."""
        return self.cache.compiled(self.programs.segment(length), state, hp, self.data, perm, jnp.int32(0))

    def evaluation_points(self, epoch: int) -> tuple[int, ...]:
        """Steps into `epoch` (1..steps_per_epoch) after which the pack is evaluated: whenever the run's
        step count is a multiple of `eval_every_steps` when that is set (then `eval_every` is not used),
        else at the end of every `eval_every`-th epoch; always at the end of training."""
        s, n = self.schedule, self.steps_per_epoch
        if s.eval_every_steps:
            points = {i for i in range(1, n + 1) if (epoch * n + i) % s.eval_every_steps == 0}
        else:
            points = {n} if s.eval_every and (epoch + 1) % s.eval_every == 0 else set()
        if epoch + 1 == s.epochs:
            points.add(n)
        return tuple(sorted(points))

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
            self._emit_train_logs(history, probes, epoch * self.steps_per_epoch, epoch, on_log, evaluations)
            for i, probe in probes:
                last_probe |= probe
                if epoch * self.steps_per_epoch + i > 0:
                    ics_probes.append({k: v for k, v in probe.items() if k.startswith("ics/")})
            if evaluations:
                final = {**last_probe, **evaluations[max(evaluations)]}
            if on_epoch_end is not None:
                on_epoch_end(state, epoch)
        final |= ics_medians(ics_probes)
        eval_time = clock["eval"]
        steps = (s.epochs - start_epoch) * self.steps_per_epoch
        timings = {
            "compile_time": self.cache.compile_seconds - compile0,
            "train_time": train_time,
            "eval_time": eval_time,
            "wall_time": time.perf_counter() - t_start,
            "step_time": train_time / max(steps, 1),
            "examples_per_s": steps * self.setup.batch_size / max(train_time, 1e-9),
        }
        return PackResult(state, final, np.asarray(jax.device_get(state.diverged_step)), timings)

    def _probe_due(self, step: int, prefix: str = "smooth/") -> bool:
        every = self.schedule.ics_every if prefix == "ics/" else self.schedule.probe_every
        return bool(every) and step % every == 0

    def _train_epoch(self, state, hp, epoch, bar, evaluate):
        """Run one epoch, evaluating at its `evaluation_points` with `evaluate(state, epoch, steps into the
        epoch)`; returns the state, its per-step metrics (key -> [steps, K]), its probes [(index in the epoch, {key: [K]})] and its
        evaluations {steps into the epoch: record}, the one at the epoch's end (if any) with the epoch's mean
        train loss/acc."""
        perm = self.permutation(hp, epoch)
        n, base = self.steps_per_epoch, epoch * self.steps_per_epoch
        eval_at = self.evaluation_points(epoch)
        probes, evaluations = [], {}  # probes: probed before step `index`, i.e. on the state of `index` steps
        if self.loop == "scan":
            parts, bounds = [], (0, *(p for p in eval_at if p < n), n)
            for start, end in zip(bounds[:-1], bounds[1:]):
                if (start, end) == (0, n):
                    state, stacked = self.compiled_epoch(state, hp, perm)(state, hp, self.data, perm)
                else:  # an evaluation inside the epoch: scan up to it, evaluate, go on
                    run = self.compiled_segment(state, hp, perm, end - start)
                    state, stacked = run(state, hp, self.data, perm, jnp.int32(start))
                parts.append(jax.device_get(stacked))  # key -> [steps, K]; probe keys NaN off probe steps
                if end in eval_at:
                    evaluations[end] = evaluate(state, epoch, end)
                bar.update(end - start)
            history = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            probe_rows = {k: history.pop(k) for k in list(history) if k.startswith(PROBE_PREFIXES)}
            for i in range(n):
                row = {k: v[i] for k, v in probe_rows.items() if self._probe_due(base + i, k[: k.index("/") + 1])}
                if row:
                    probes.append((i, row))
        else:
            window, history_parts = [], []  # window: per-call metrics [n, K] not yet fetched
            calls = {1: self.compiled_step(state, hp, perm)}
            if self.steps_per_call > 1:
                calls[self.steps_per_call] = self.compiled_steps(state, hp, perm)
            probe = self.compiled_probe(state, hp, perm) if self.schedule.probe_every else None
            ics = self.compiled_ics(state, hp, perm) if self.schedule.ics_every else None
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
                    evaluations[i + m] = evaluate(state, epoch, i + m)
            history = {k: np.concatenate([p[k] for p in history_parts]) for k in history_parts[0]}
            probes = jax.device_get(probes)
        jax.block_until_ready(state)
        if n in evaluations:
            means = {"train/epoch_loss": history["loss"].mean(0), "train/epoch_acc": history["acc"].mean(0)}
            evaluations[n] = {**means, **evaluations[n]}
        return state, history, probes, evaluations

    def _emit_train_logs(self, history, probes, base, epoch, on_log, evaluations=None):
        """One record per `log_every` steps (window means of the per-step metrics), one per probe and
        one per evaluation.

        A probe before step i is logged at step base + i (the steps done when it looked), an evaluation
        after i steps at base + i; records that share a step are merged, and all go out in step order,
        as wandb requires.
        """
        n, every = self.steps_per_epoch, self.schedule.log_every
        records: dict[int, dict] = {}
        for i, probe in probes:
            records.setdefault(i, {}).update(probe)
        for i, record in (evaluations or {}).items():
            records.setdefault(i, {}).update(record)
        for start in range(0, n, every):
            end = min(start + every, n)
            window = {f"train/{k}": v[start:end].mean(0) for k, v in history.items() if k != "lr"}
            window["train/lr"] = history["lr"][end - 1]
            records.setdefault(end, {}).update(window)
        for i in sorted(records):
            on_log(base + i, epoch + i / n, records[i])


def units_split(splits: dict[str, Split]) -> str:
    """The split whose inference pass counts dead units: the validation split when there is one (it is
    evaluated in running mode only, so the counts ride on a pass made anyway), else the test split."""
    return "val" if "val" in splits else "test"


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
