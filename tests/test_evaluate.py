"""Evaluation of a pack: batching of a split, running-mode loss and accuracy on named splits, and no
BN-mode keys for a model without BN."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bnstudy.core import engine, evaluate
from conftest import cnn_program, hparams, init_states


def test_batch_mode_batches_are_full_batches_of_real_examples_without_padding():
    images = jnp.arange(1, 24)[:, None]  # 23 distinct examples, none of them 0 (a padding value)
    batches = evaluate.wrapped_batches(images, 5)
    assert batches.shape == (5, 5, 1)
    flat = np.asarray(batches).reshape(-1)
    np.testing.assert_array_equal(flat[:23], np.arange(1, 24))  # each example once, in order, first
    np.testing.assert_array_equal(flat[23:], [1, 2])  # then repeats from the start, not padding


def test_padded_batches_mask_exactly_the_padding():
    images, labels = jnp.arange(1, 8)[:, None], jnp.arange(7)
    x, y, mask = evaluate.padded_batches(images, labels, 3)
    assert x.shape == (3, 3, 1) and mask.reshape(-1).tolist() == [1] * 7 + [0] * 2
    np.testing.assert_array_equal(np.asarray(x).reshape(-1)[:7], np.arange(1, 8))


def test_named_splits_give_their_own_loss_and_accuracy_and_no_bn_keys_without_bn(arrays):
    setup = cnn_program(norm="none")
    hp = hparams([{"seed": 0}, {"seed": 1}])
    state = init_states(setup, arrays.train_images.shape[1:], hp)
    val = (arrays.train_images[:40], arrays.train_labels[:40])
    splits = {"test": (arrays.test_images, arrays.test_labels), "val": val}
    ev = evaluate.PackEvaluator(setup, arrays, splits, {"test": splits["test"]}, batch_size=16, population_batches=2)
    out = ev.evaluate(state, hp, epoch=0)
    assert not ev.bn_modes_on and set(out) == {"test/loss", "test/acc", "val/loss", "val/acc"}
    for k in range(2):  # the same numbers as the model applied to the whole split at once
        params = jax.tree.map(lambda a, k=k: a[k], state.params)
        logits = jax.jit(partial(engine.eval_logits, setup))(params, {}, val[0])  # op by op, each op would compile
        loss = float(engine.cross_entropy(logits, val[1]).mean())
        acc = float(jnp.mean(jnp.argmax(logits, -1) == val[1]))
        np.testing.assert_allclose(out["val/loss"][k], loss, rtol=1e-5)
        assert out["val/acc"][k] == acc
