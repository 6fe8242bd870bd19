"""Stored traces (bnstudy.perf.traced): a program compiled from its stored export computes exactly what the
directly jitted program computes, keeps its donation and compiler options, is keyed by its label and
argument shapes, and any case the store does not cover falls back to the direct compile."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bnstudy.core import compiled, engine
from bnstudy.core.compiled import CompileCache
from bnstudy.core.trainer import PackTrainer
from bnstudy.perf import traced, xla_flags
from conftest import cnn_program, hparams, make_arrays, schedule

SHAPE = (12, 12, 1)  # two 2x2 pools: 12 -> 6 -> 3


def same_bits(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in pairs
    )


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_a_stored_program_donates_the_leaves_of_its_donated_arguments(tmp_path):
    def update(state, data):
        return {"w": state["w"] + data["x"], "n": state["n"] + 1}, data["x"].sum()

    setup = traced.jit(update, label="update", donate_argnums=0)
    state, data = {"w": jnp.zeros(3), "n": jnp.int32(0)}, {"x": jnp.ones(3)}
    expected = update(copy(state), data)
    compiled = traced.TracedStore(tmp_path).compile(setup, (state, data))
    assert same_bits(compiled(state, data), expected)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert not data["x"].is_deleted()


def test_the_key_is_the_label_and_the_argument_shapes_and_weak_types(tmp_path):
    fn = lambda x: x * 2
    store = traced.TracedStore(tmp_path)
    for setup, x in [
        (traced.jit(fn, label="double"), jnp.ones(3)),
        (traced.jit(fn, label="double"), jnp.ones(4)),  # another shape
        (traced.jit(fn, label="twice"), jnp.ones(3)),  # another label
        (traced.jit(fn, label="double"), jnp.asarray(1.0)),  # weak-typed scalar
        (traced.jit(fn, label="double"), jnp.float32(1.0)),  # the same value, strongly typed
    ]:
        np.testing.assert_array_equal(store.compile(setup, (x,))(x), x * 2)
    assert store.stores == 5 and len(list(tmp_path.rglob("*.jaxexport"))) == 5
    store.compile(traced.jit(fn, label="double"), (jnp.zeros(3),))  # same label and shape: found
    assert store.hits == 1


def test_programs_outside_the_store_fall_back_to_the_direct_compile(tmp_path):
    store = traced.TracedStore(tmp_path)
    x = jnp.ones(3)
    assert store.compile(jax.jit(lambda x: x + 1), (x,)) is None  # not made by traced.jit
    assert store.compile(traced.jit(lambda x: x + 1), (x,)) is None  # no label
    static = traced.jit(lambda x, n: x * n, label="scaled", static_argnums=1)
    assert store.compile(static, (x, 3)) is None  # a static argument
    cache = CompileCache(store)
    np.testing.assert_array_equal(cache.call(traced.jit(lambda x: x + 1), x), x + 1)  # compiled directly
    assert not list(tmp_path.rglob("*.jaxexport"))


def test_a_torn_stored_file_is_traced_again_and_replaced(tmp_path):
    setup, x = traced.jit(lambda x: x - 1, label="minus one"), jnp.arange(3.0)
    traced.TracedStore(tmp_path).compile(setup, (x,))
    (path,) = tmp_path.rglob("*.jaxexport")
    path.write_bytes(path.read_bytes()[:20])
    store = traced.TracedStore(tmp_path)
    np.testing.assert_array_equal(store.compile(setup, (x,))(x), x - 1)
    assert store.stores == 1 and store.hits == 0
    assert traced.TracedStore(tmp_path).compile(setup, (x,)) is not None


def test_a_trainer_with_a_traced_folder_trains_the_same_numbers_and_a_second_one_traces_nothing(tmp_path):
    hp = hparams([dict(seed=0), dict(seed=1, lr=0.1)])
    data = make_arrays(n_train=64, n_test=32, shape=SHAPE)
    sched = schedule(max_steps_per_epoch=2)
    logs = lambda records: lambda step, epoch, m: records.append((step, jax.device_get(m)))
    results = []
    for traced_dir in (None, tmp_path, tmp_path):
        if results and traced_dir is not None:  # as a fresh process: the store, not this process, has them
            compiled.forget_compiled_programs()
        trainer = PackTrainer(cnn_program(batch_size=16), data, sched, traced_dir=traced_dir)
        records = []
        result = trainer.train(hp, logs(records))
        results.append((result, records, trainer.cache.traced_store))
    (direct, direct_logs, _), (first, first_logs, stored), (second, second_logs, found) = results
    # The initial state, the step and the evaluation programs; the epoch order has a static argument.
    assert stored.stores >= 3 and stored.hits == 0 and found.hits == stored.stores and found.stores == 0
    for result, records in ((first, first_logs), (second, second_logs)):
        assert same_bits(result.state, direct.state) and same_bits(result.final, direct.final)
        assert same_bits(records, direct_logs)


def test_jit_rare_programs_are_recorded_with_their_compiler_options():
    setup = xla_flags.jit_rare(jax.vmap(partial(engine.init_state, cnn_program(), SHAPE)), label="init")
    spec = traced.spec_of(setup)
    assert spec.label == "init"
    assert spec.jit_kwargs["compiler_options"] == (xla_flags.rare_program_options(jax.default_backend()) or None)


def test_a_later_trainer_of_the_same_program_in_this_process_compiles_nothing_and_trains_the_same():
    hp = hparams([dict(seed=0)])
    data = make_arrays(n_train=64, n_test=32, shape=SHAPE)
    sched = schedule(max_steps_per_epoch=2)
    compiled.forget_compiled_programs()  # whatever earlier tests of this process compiled
    first, second = (PackTrainer(cnn_program(batch_size=16), data, sched) for _ in range(2))
    assert first.programs is second.programs  # equal programs: the same jitted functions
    a = first.train(hp, lambda *a: None)
    b = second.train(hp, lambda *a: None)
    assert first.cache.compile_seconds > 0 and second.cache.compile_seconds == 0
    assert same_bits(a.state, b.state) and same_bits(a.final, b.final)
