"""A compiled chunk of k train steps is k single train steps, for one model and for a vmapped pack."""

from functools import partial

import jax
import numpy as np
import pytest
from conftest import cnn_program, hparams, make_arrays

from bnstudy import engine

K = 2
# The chunk is compiled as one program, so XLA may fuse and order the float32 arithmetic of k steps
# differently from k separate programs: equal up to round-off, not bitwise.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def arrays():
    return make_arrays(n_train=64, n_test=16, shape=(12, 12, 1))  # small images: the programs compile faster


def single_steps(program, state, hp, arrays, perm):
    step = jax.jit(partial(engine.train_step, program))
    history = []
    for i in range(K):
        state, metrics = step(state, hp, arrays, perm, i)
        history.append(metrics)
    return state, {k: np.stack([m[k] for m in history]) for k in history[0]}


def assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def test_chunk_of_k_steps_equals_k_single_steps(arrays):
    program = cnn_program(batch_size=16, dropout_placement="after_block")
    hp = jax.tree.map(lambda v: v[0], hparams([{"lr": 0.05, "weight_decay": 1e-4, "dropout_rate": 0.2, "seed": 3}]))
    state = engine.init_state(program, arrays.train_images.shape[1:], hp)
    perm = engine.epoch_permutation(hp.seed, 0, arrays.train_images.shape[0])
    alone, alone_metrics = single_steps(program, state, hp, arrays, perm)
    chunk, chunk_metrics = jax.jit(partial(engine.train_steps, program, K))(state, hp, arrays, perm, 0)
    assert int(chunk.step) == K
    assert chunk_metrics["loss"].shape == (K,)
    assert_close(chunk_metrics, alone_metrics)
    assert_close((chunk.params, chunk.batch_stats, chunk.opt_state), (alone.params, alone.batch_stats, alone.opt_state))


@pytest.mark.slow  # compiles a vmapped chunk and the single step: ~8 s
def test_chunk_vmaps_over_a_pack(arrays):
    program = cnn_program(batch_size=16)
    hp = hparams([{"lr": 0.05, "seed": 0}, {"lr": 0.1, "seed": 1}])
    state = jax.vmap(partial(engine.init_state, program, arrays.train_images.shape[1:]))(hp)
    perm = jax.vmap(engine.epoch_permutation, in_axes=(0, None, None))(hp.seed, 0, arrays.train_images.shape[0])
    chunk = jax.jit(jax.vmap(partial(engine.train_steps, program, K), in_axes=(0, 0, None, 0, None)))
    _, metrics = chunk(state, hp, arrays, perm, 0)
    assert metrics["loss"].shape == (2, K)
    for k in range(2):
        one = jax.tree.map(lambda v, k=k: v[k], (state, hp, perm))
        _, alone = single_steps(program, one[0], one[1], arrays, one[2])
        # vmap turns the convs into grouped convs: a pack agrees with solo training to float32 round-off.
        np.testing.assert_allclose(metrics["loss"][k], alone["loss"], rtol=2e-4)
