"""Evaluating a pack of K models: loss and accuracy on named splits, and BN's three modes.

Every split in `splits` (name -> (uint8 images, int32 labels)) is evaluated with BN on its running
averages, giving `<name>/loss` and `<name>/acc` ([K] arrays). For a model with BN, every split in
`bn_mode_splits` is also evaluated with BN on each batch's own statistics (training batch size) and
on population statistics recomputed over training batches (`bnstudy.core.metrics`), giving
`<name>/{loss,acc}_{running,batch,population}`, `disc/*` (test split) and `bn/<layer>/*`; a split in
both gets its running-mode numbers from that pass. Models without BN log no `disc/*` or `bn/*`.
With `units_split` set, that split's running-mode pass also counts, per hidden block and ReLU unit, the
examples it fired on, giving `relu/<layer>/dead_frac` (the fraction never positive; inference mode).
Compiled programs are built once in `build_eval_programs`; `CompileCache` (bnstudy.core.compiled) compiles
them ahead of time per argument shape and counts the seconds spent, so evaluation time excludes compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnstudy.core import compiled, engine, metrics
from bnstudy.core.compiled import CompileCache
from bnstudy.core.engine import ArrayData, HParams, Setup, TrainState
from bnstudy.perf import traced
from bnstudy.perf.xla_flags import jit_rare

Split = tuple[jax.Array, jax.Array]  # uint8 images [N, ...], int32 labels [N]


@dataclasses.dataclass(frozen=True)
class EvalPrograms:
    """The jitted, pack-vmapped programs of an evaluation; the BN-mode ones are None without BN modes."""

    sums: Callable  # (params, batch_stats, images, labels, mask) -> {loss_sum, correct_sum}
    logits: Callable | None = None  # (params, stats, images) -> inference-mode logits
    batch_logits: Callable | None = None  # (params, stats, images) -> logits with BN on the batch's statistics
    population_batch: Callable | None = None  # one training batch's BN statistics (dropout off, and on)
    population: Callable | None = None  # pooled population statistics
    bn_metrics: Callable | None = None  # bn/<layer>/* from running vs population statistics
    split_metrics: dict[str, Callable] = dataclasses.field(default_factory=dict)  # per BN-mode split
    units: Callable | None = None  # sums plus relu_positive counts (metrics.eval_batch_with_units)
    dead_fractions: Callable | None = None  # relu_positive totals -> relu/<layer>/dead_frac


@compiled.memoized
def pack_permutation(num_examples: int) -> Callable:
    """(seed [K], epoch) -> [K, num_examples]: each run's order of the training set in an epoch. One
    jitted function per training-set size for the trainer and the evaluator, so each compiles once."""
    permutation = partial(engine.epoch_permutation, num_examples=num_examples)
    return jit_rare(jax.vmap(permutation, in_axes=(0, None)), label=f"permutation {num_examples=}")


@compiled.memoized
def build_eval_programs(setup: Setup, bn_mode_splits: tuple[str, ...], units: bool = False) -> EvalPrograms:
    """The evaluation's jitted programs; memoized, so equal arguments give the same functions (and with
    them `CompileCache`'s compiled programs)."""
    p = setup
    settings = f"{p!r} {bn_mode_splits=} {units=}"  # everything the programs close over (bnstudy.perf.traced)
    jit = lambda fn, name: traced.jit(fn, label=f"eval {settings} {name}")
    sums = jit(jax.vmap(partial(engine.eval_batch, p), in_axes=(0, 0, None, None, None)), "sums")
    unit_programs = {}
    if units:
        unit_programs = dict(
            units=jit(jax.vmap(partial(metrics.eval_batch_with_units, p), in_axes=(0, 0, None, None, None)), "units"),
            dead_fractions=jit(jax.vmap(metrics.dead_unit_fractions), "dead_fractions"),
        )
    if not bn_mode_splits:
        return EvalPrograms(sums, **unit_programs)
    dropout_layers = tuple(getattr(p.model, "dropout_fed_blocks", tuple)())
    population_batch = partial(metrics.population_batch, p, bool(dropout_layers))
    return EvalPrograms(
        sums,
        logits=jit(jax.vmap(partial(engine.eval_logits, p), in_axes=(0, 0, None)), "logits"),
        # One call per batch: vmapping several batches into one call is slower on XLA:CPU.
        batch_logits=jit(jax.vmap(partial(metrics.batch_mode_logits, p), in_axes=(0, 0, None)), "batch_logits"),
        population_batch=jit(jax.vmap(population_batch, in_axes=(0, 0, 0, None, 0, None)), "population_batch"),
        population=jit(jax.vmap(metrics.population), "population"),
        bn_metrics=jit(jax.vmap(partial(metrics.bn_metrics, dropout_layers, p.model.bn_epsilon)), "bn_metrics"),
        split_metrics={
            name: jit(jax.vmap(partial(metrics.split_metrics, name), in_axes=(0, None)), f"split_metrics {name}")
            for name in bn_mode_splits
        },
        **unit_programs,
    )


def has_batch_norm(setup: Setup, input_shape: tuple[int, ...]) -> bool:
    """Whether the model has BN running statistics: its own `has_batch_norm` when it says (tracing its
    init would cost every start a trace), else from the shapes of its init."""
    known = getattr(setup.model, "has_batch_norm", None)
    if isinstance(known, bool):
        return known
    return batch_stats_in_init(setup, input_shape)


def batch_stats_in_init(setup: Setup, input_shape: tuple[int, ...]) -> bool:
    shapes = jax.eval_shape(partial(setup.model.init, train=False), jax.random.key(0), jnp.zeros((1, *input_shape)))
    return bool(jax.tree.leaves(shapes.get("batch_stats", {})))


def on_devices_of(source, values: np.ndarray) -> jax.Array:
    """`values` placed as `source` is (its devices and sharding). The evaluation batches are cut on the
    host: as eager device ops, each concatenate and reshape would compile a program of its own."""
    return jax.device_put(values, getattr(source, "sharding", None))


def padded_batches(images, labels, batch_size):
    """A split as [B, batch, ...] device arrays padded to full batches, with a validity mask."""
    x, y = np.asarray(images), np.asarray(labels)
    n = int(x.shape[0])
    batch_size = min(batch_size, n)
    nb = math.ceil(n / batch_size)
    pad = nb * batch_size - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    shape = lambda a: a.reshape(nb, batch_size, *a.shape[1:])
    return on_devices_of(images, shape(x)), on_devices_of(labels, shape(y)), on_devices_of(images, shape(mask))


def wrapped_batches(images, batch_size):
    """[B, batch, ...] batches of exactly `batch_size` real examples, for BN's batch mode.

    The last batch is topped up from the start of the split instead of padded, so batch statistics
    never see padding and every example is normalized with a full batch; the repeats' outputs are
    dropped. A split smaller than the batch is one batch of the whole split.
    """
    x = np.asarray(images)
    n = int(x.shape[0])
    batch_size = min(batch_size, n)
    nb = math.ceil(n / batch_size)
    return on_devices_of(images, x[np.arange(nb * batch_size) % n].reshape(nb, batch_size, *x.shape[1:]))


class PackEvaluator:
    """Evaluates the models of a pack (any K) on named splits; see the module docstring for the keys."""

    def __init__(
        self,
        setup: Setup,
        data: ArrayData,
        splits: dict[str, Split],
        bn_mode_splits: dict[str, Split],
        *,
        batch_size: int,
        population_batches: int,
        cache: CompileCache | None = None,
        units_split: str | None = None,
    ):
        """`units_split`: the split (a key of `splits`) whose inference pass also gives the dead-unit
        fractions; None = no dead units."""
        if units_split is not None and units_split not in splits:
            raise ValueError(f"units_split {units_split!r} is not one of the evaluated splits {sorted(splits)}")
        self.units_split = units_split
        self.setup, self.data = setup, data
        self.cache = cache or CompileCache()
        self.num_train = int(data.train_images.shape[0])
        input_shape = tuple(data.train_images.shape[1:])
        self.bn_modes_on = bool(bn_mode_splits) and has_batch_norm(setup, input_shape)
        self.bn_mode_splits = dict(bn_mode_splits) if self.bn_modes_on else {}
        self.population_batches = max(1, min(population_batches, self.num_train // setup.batch_size))
        # name -> ([B, batch, ...] images, labels, mask) for the running mode; split sizes by name
        self.running_batches = {name: padded_batches(x, y, batch_size) for name, (x, y) in splits.items()}
        self.sizes = {name: int(y.shape[0]) for name, (_, y) in {**splits, **self.bn_mode_splits}.items()}
        self._mode_batches = {  # name -> (inference batches, batch-mode batches, labels)
            name: (padded_batches(x, y, batch_size)[0], wrapped_batches(x, setup.batch_size), y)
            for name, (x, y) in self.bn_mode_splits.items()
        }
        self.programs = build_eval_programs(setup, tuple(self.bn_mode_splits), units=units_split is not None)

    def compile(self, state: TrainState) -> None:
        """Compile the running-mode program for these splits ahead of time (no-op once done)."""
        for name, (images, labels, mask) in self.running_batches.items():
            fn = self.programs.units if name == self.units_split else self.programs.sums
            self.cache.compiled(fn, state.params, state.batch_stats, images[0], labels[0], mask[0])

    def evaluate(self, state: TrainState, hp: HParams, epoch: int, bn_modes: bool = True) -> dict[str, np.ndarray]:
        """Every key of the module docstring as [K] numpy arrays; population statistics come from
        the first `population_batches` batches of `epoch`'s training order. `bn_modes=False`: the
        running-mode keys only (an evaluation between the ones that measure the discrepancy)."""
        from_modes = self.bn_mode_splits if self.bn_modes_on and bn_modes else {}
        out: dict[str, Any] = self.bn_modes(state, hp, epoch) if from_modes else {}
        for name in self.running_batches:
            if name in from_modes:
                out[f"{name}/loss"], out[f"{name}/acc"] = out[f"{name}/loss_running"], out[f"{name}/acc_running"]
            elif name == self.units_split:  # one pass gives the loss, the accuracy and the units
                out |= self.running_with_units(state, name)
            else:
                out |= self.running(state, name)
        if self.units_split in from_modes:  # its running numbers came from the BN-mode pass
            with_units = self.running_with_units(state, self.units_split)
            out |= {k: v for k, v in with_units.items() if k.startswith("relu/")}
        return jax.device_get(out)

    def running(self, state: TrainState, name: str) -> dict[str, np.ndarray]:
        """`<name>/loss` and `<name>/acc` with BN on its running averages."""
        totals = self._batch_totals(self.programs.sums, state, name)
        n = float(self.sizes[name])
        return {f"{name}/loss": totals["loss_sum"] / n, f"{name}/acc": totals["correct_sum"] / n}

    def running_with_units(self, state: TrainState, name: str) -> dict[str, Any]:
        """`running`'s keys and relu/<layer>/dead_frac over the whole split, from one inference pass."""
        totals = self._batch_totals(self.programs.units, state, name)
        n = float(self.sizes[name])
        dead = self.cache.call(self.programs.dead_fractions, jax.device_put(totals["relu_positive"]))
        return {f"{name}/loss": totals["loss_sum"] / n, f"{name}/acc": totals["correct_sum"] / n, **dead}

    def _batch_totals(self, fn, state: TrainState, name: str) -> dict[str, Any]:
        """`fn`'s per-batch sums over the split's running batches, added on the host in batch order (as
        eager device ops, each add would compile a program of its own in every process)."""
        images, labels, mask = self.running_batches[name]
        per_batch = [
            self.cache.call(fn, state.params, state.batch_stats, images[b], labels[b], mask[b])
            for b in range(images.shape[0])
        ]
        return functools.reduce(lambda a, b: jax.tree.map(np.add, a, b), jax.device_get(per_batch))

    def bn_modes(self, state: TrainState, hp: HParams, epoch: int) -> dict[str, jax.Array]:
        """The BN-mode splits with BN on running, batch and population statistics; disc/* and bn/*."""
        pop_stats, out = self.population_stats(state, hp, epoch)
        progs = self.programs
        for name, (batches, wrapped, labels) in self._mode_batches.items():
            n = int(labels.shape[0])
            logits = {
                "running": self._logits(progs.logits, state.params, state.batch_stats, batches, n),
                "batch": self._logits(progs.batch_logits, state.params, state.batch_stats, wrapped, n),
                "population": self._logits(progs.logits, state.params, pop_stats, batches, n),
            }
            out |= self.cache.call(progs.split_metrics[name], logits, labels)
        return out

    def population_stats(self, state: TrainState, hp: HParams, epoch: int):
        """Each model's population BN statistics (a tree like `batch_stats`) and its bn/* metrics."""
        progs = self.programs
        perm = self.cache.call(pack_permutation(self.num_train), hp.seed, jnp.int32(epoch))
        per_batch = tuple(
            self.cache.call(progs.population_batch, state.params, state.batch_stats, hp, self.data, perm, jnp.int32(b))
            for b in range(self.population_batches)
        )
        pop, pop_dropout = self.cache.call(progs.population, per_batch)
        return pop, self.cache.call(progs.bn_metrics, state.batch_stats, pop, pop_dropout)

    def _logits(self, fn, params, stats, batches, n):
        """[K, n, classes] logits of the first n examples of a batched split (padding and repeats dropped)."""
        parts = [self.cache.call(fn, params, stats, batches[b]) for b in range(batches.shape[0])]
        return on_devices_of(batches, np.concatenate(jax.device_get(parts), axis=1)[:, :n])  # cut on the host
