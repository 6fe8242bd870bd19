"""The jitted, pack-vmapped training programs of one `Setup` (`build_train_programs`), and a pack's
compiled forms of them for its shapes (`CompiledTrain`), through the process's one compile memo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from bnstudy.core import compiled, engine, metrics, sharding
from bnstudy.core.compiled import CompileCache
from bnstudy.core.engine import ArrayData, HParams, Setup
from bnstudy.perf import traced
from bnstudy.perf.xla_flags import jit_rare


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


@compiled.memoized
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

    @compiled.memoized
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


class CompiledTrain:
    """A pack's training programs compiled for its shapes (state, hp, data, perm, index), from `cache`."""

    def __init__(self, programs: TrainPrograms, cache: CompileCache, data: ArrayData):
        self.programs, self.cache, self.data = programs, cache, data

    def step(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.step`: (state, hp, data, perm, index) -> (state, metrics)."""
        return self.cache.compiled(self.programs.step, state, hp, self.data, perm, jnp.int32(0))

    def steps(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.steps`: `steps_per_call` steps from an index -> (state, metrics [k, K])."""
        return self.cache.compiled(self.programs.steps, state, hp, self.data, perm, jnp.int32(0))

    def probe(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.probe`: (state, hp, data, perm, index) -> smooth/* metrics."""
        return self.cache.compiled(self.programs.probe, state, hp, self.data, perm, jnp.int32(0))

    def epoch(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.epoch`: (state, hp, data, perm) -> (state, metrics stacked over steps)."""
        return self.cache.compiled(self.programs.epoch, state, hp, self.data, perm)

    def ics(self, state: engine.TrainState, hp: HParams, perm: jax.Array):
        """The compiled `programs.ics`: (state, hp, data, perm, index) -> ics/* metrics."""
        return self.cache.compiled(self.programs.ics, state, hp, self.data, perm, jnp.int32(0))

    def segment(self, state: engine.TrainState, hp: HParams, perm: jax.Array, length: int):
        """The compiled `programs.segment(length)`: (state, hp, data, perm, start) -> (state, stacked metrics)."""
        return self.cache.compiled(self.programs.segment(length), state, hp, self.data, perm, jnp.int32(0))
