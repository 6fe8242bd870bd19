"""A compiled chunk of k train steps is k single train steps, for one model and for a vmapped pack."""

from functools import partial

import jax
import numpy as np
import pytest

from bnstudy.core import engine, trainer
from bnstudy.core import schedule as schedule_lib
from conftest import (
    build_model,
    cnn_program,
    hparams,
    init_states,
    initial_state,
    make_arrays,
    permutations,
    schedule,
    setup_of,
)

K = 2
# The chunk is compiled as one program, so XLA may fuse and order the float32 arithmetic of k steps
# differently from k separate programs: equal up to round-off, not bitwise.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def arrays():
    # Small images: the programs compile faster. The shapes, model and batch of tests/test_measures.py's
    # dropout CNN, whose single step (seconds to compile) the chunk test then finds in the compilation cache.
    return make_arrays(n_train=64, n_test=24, shape=(10, 10, 1))


def single_steps(setup, state, hp, arrays, perm):
    step = jax.jit(partial(engine.train_step, setup))
    history = []
    for i in range(K):
        state, metrics = step(state, hp, arrays, perm, i)
        history.append(metrics)
    return state, {k: np.stack([m[k] for m in history]) for k in history[0]}


def assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


@pytest.mark.xdist_group("measures_dropout_cnn")  # after tests/test_measures.py on its worker
def test_chunk_of_k_steps_equals_k_single_steps(arrays):
    setup = cnn_program(batch_size=16, dropout_placement="before_classifier")  # one mask: faster compiles
    hp = jax.tree.map(lambda v: v[0], hparams([{"lr": 0.05, "weight_decay": 1e-4, "dropout_rate": 0.2, "seed": 3}]))
    state = initial_state(setup, arrays.train_images.shape[1:], hp)
    perm = jax.jit(engine.epoch_permutation, static_argnums=2)(hp.seed, 0, arrays.train_images.shape[0])
    alone, alone_metrics = single_steps(setup, state, hp, arrays, perm)
    chunk, chunk_metrics = jax.jit(partial(engine.train_steps, setup, K))(state, hp, arrays, perm, 0)
    assert int(chunk.step) == K
    assert chunk_metrics["loss"].shape == (K,)
    assert_close(chunk_metrics, alone_metrics)
    assert_close((chunk.params, chunk.batch_stats, chunk.opt_state), (alone.params, alone.batch_stats, alone.opt_state))


@pytest.mark.slow  # compiles a vmapped chunk and the single step: ~8 s
def test_chunk_vmaps_over_a_pack(arrays):
    setup = cnn_program(batch_size=16)
    hp = hparams([{"lr": 0.05, "seed": 0}, {"lr": 0.1, "seed": 1}])
    state = init_states(setup, arrays.train_images.shape[1:], hp)
    perm = permutations(hp, arrays.train_images.shape[0])
    chunk = jax.jit(jax.vmap(partial(engine.train_steps, setup, K), in_axes=(0, 0, None, 0, None)))
    _, metrics = chunk(state, hp, arrays, perm, 0)
    assert metrics["loss"].shape == (2, K)
    for k in range(2):
        one = jax.tree.map(lambda v, k=k: v[k], (state, hp, perm))
        _, alone = single_steps(setup, one[0], one[1], arrays, one[2])
        # vmap turns the convs into grouped convs: a pack agrees with solo training to float32 round-off.
        np.testing.assert_allclose(metrics["loss"][k], alone["loss"], rtol=2e-4)


def test_chunk_plan_starts_a_call_at_every_probe_step_and_runs_the_tail_singly():
    due = {4, 8}.__contains__
    assert schedule_lib.chunk_plan(0, 7, 3, due) == [(0, 3), (3, 1), (4, 3)]
    assert schedule_lib.chunk_plan(7, 14, 3, due) == [(7, 1), (8, 3), (11, 3)]
    assert schedule_lib.chunk_plan(0, 5, 1, due) == [(i, 1) for i in range(5)]
    plan = schedule_lib.chunk_plan(0, 62, 4, lambda j: False)
    assert [n for _, n in plan] == [4] * 15 + [1, 1]
    assert schedule_lib.resolve_steps_per_call(8, 5) == 5


def test_auto_steps_per_call_is_one_step_on_cpu_and_a_chunk_on_an_accelerator():
    assert schedule_lib.resolve_steps_per_call("auto", 62, backend="cpu") == 1
    assert (
        schedule_lib.resolve_steps_per_call("auto", 62, backend="gpu")
        == schedule_lib.AUTO_STEPS_PER_CALL_ACCELERATOR
        > 1
    )
    assert schedule_lib.resolve_steps_per_call("auto", 3, backend="gpu") == 3
    assert schedule_lib.resolve_steps_per_call("auto", 62) == schedule_lib.auto_steps_per_call(jax.default_backend())


def test_python_loop_in_chunks_logs_and_trains_as_one_step_per_call():
    """7 steps in chunks of 2 with a smoothness probe every 3 steps: calls (0, 2), (2, 1) before the probe
    at 3, (3, 2), (5, 1) before the probe at 6, and the tail (6, 1). Logged metrics, probes and the final state
    agree with one step per call to float32 round-off (rtol 1e-4 over 7 steps: the chunk is one XLA program,
    fused differently). Chunks of 2: the chunk's steps are unrolled, and each one more costs seconds of compile."""
    data = make_arrays(n_train=8 * 8, n_test=8, shape=(8, 8, 1))
    model = build_model("cnn")  # the loop is under test: 8x8 images keep the steps cheap (the CNN has no width)
    setup = setup_of(model, batch_size=8, input_mean=(0.13,), input_std=(0.31,))
    hp = hparams([{"lr": 0.05, "seed": 0}])

    def run(k):
        logs = []
        sched = schedule(
            epochs=1,
            max_steps_per_epoch=7,
            log_every=5,
            eval_batch_size=8,
            loop="python",
            steps_per_call=k,
            probe_every=3,
            probe_multipliers=(1.0,),
        )
        result = trainer.PackTrainer(setup, data, sched).train(hp, lambda s, e, m: logs.append((s, e, m)))
        return logs, result.state

    logs1, state1 = run(1)
    logs2, state2 = run(2)
    assert [(s, e, sorted(m)) for s, e, m in logs2] == [(s, e, sorted(m)) for s, e, m in logs1]
    assert any(key.startswith("smooth/") for _, _, m in logs2 for key in m)
    for (_, _, m2), (_, _, m1) in zip(logs2, logs1):
        for key in m1:
            np.testing.assert_allclose(m2[key], m1[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
