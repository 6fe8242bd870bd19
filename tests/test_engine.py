"""The pure per-model functions: augmentation, the optimizer update, and a core free of the app stack."""

from functools import partial

import numpy as np

from conftest import cnn_program, hparams, init_states, make_arrays, normal


def test_cifar_augmentation_is_a_padded_crop_or_its_mirror():
    import jax
    import jax.numpy as jnp

    from bnstudy.core import engine

    images = normal(0, (16, 8, 8, 3))
    out = np.asarray(engine.augment(images, jax.random.key(1)))
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    flipped = 0
    for i in range(16):
        crops = [padded[i, r : r + 8, c : c + 8] for r in range(9) for c in range(9)]
        plain = any(np.array_equal(out[i], crop) for crop in crops)
        mirror = any(np.array_equal(out[i], crop[:, ::-1]) for crop in crops)
        assert plain or mirror
        flipped += mirror and not plain
    assert 0 < flipped < 16  # both flipped and unflipped examples occur
    assert not np.array_equal(out, np.asarray(engine.augment(images, jax.random.key(2))))
    assert out.shape == images.shape and jnp.asarray(out).dtype == images.dtype


def test_core_imports_none_of_the_app_stack():
    import subprocess
    import sys

    code = (
        "import sys, bnstudy.core.models, bnstudy.core.engine, bnstudy.core.trainer, bnstudy.core.evaluate, bnstudy.core.metrics, "
        "bnstudy.core.pack_size, bnstudy.core.from_config, bnstudy.core.datasets, bnstudy.schema, bnstudy.app.provenance, "
        "bnstudy.perf.xla_flags; "
        "bad = {'hydra', 'omegaconf', 'wandb', 'tensorflow_datasets', 'tensorflow', 'tqdm', 'orbax', 'pandas'} "
        "& set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def member(tree, k):
    """Run k of a pack's tree."""
    import jax

    return jax.tree.map(lambda a: a[k], tree)


def first_sgd_update_by_hand(setup, state, hp, data, perm):
    """p0 - lr * (g + wd * p0): SGD's first step (the momentum buffer starts at the gradient)."""
    import jax

    from bnstudy.core import engine

    x, labels, key = engine.step_inputs(setup, state, hp, data, perm, 0)
    loss = lambda p: engine.forward_train(setup, p, state.batch_stats, x, labels, 0.0, key)[0]
    grads = jax.grad(loss)(state.params)
    return jax.tree.map(lambda p, g: p - hp.lr * (g + hp.weight_decay * p), state.params, grads)


def test_the_update_uses_hp_lr_exactly_as_sgd_says():
    """Each lr of a pack moves its model as SGD says, with the lr of the step's hp, not the one the state
    was initialized with."""
    import jax
    import jax.numpy as jnp

    from bnstudy.core import engine

    arrays = make_arrays(n_train=64, n_test=24, shape=(10, 10, 1))  # small images: faster compiles
    setup = cnn_program(norm="none")
    hp = hparams([{"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.3, "weight_decay": 0.1}])
    hp = hp._replace(seed=jnp.zeros_like(hp.seed))  # same init and batch, only the lr differs
    init_hp = hp._replace(lr=jnp.full_like(hp.lr, 0.05))
    # Jitted as the trainer does: op by op, each of hundreds of primitives would compile on its own.
    state = init_states(setup, arrays.train_images.shape[1:], init_hp)
    perm = jnp.stack([jnp.arange(arrays.train_images.shape[0])] * 2)
    step = jax.jit(jax.vmap(partial(engine.train_step, setup), in_axes=(0, 0, None, 0, None)))
    new, _ = step(state, hp, arrays, perm, 0)
    by_hand = jax.jit(partial(first_sgd_update_by_hand, setup))
    for k in range(2):
        expected = by_hand(member(state, k), member(hp, k), arrays, perm[k])
        for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(member(new.params, k)), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-7)
    moved = [jax.tree.leaves(member(new.params, k))[0] - jax.tree.leaves(member(state.params, k))[0] for k in range(2)]
    ratio = np.asarray(moved[1]) / np.asarray(moved[0])
    np.testing.assert_allclose(ratio[np.isfinite(ratio)], 30.0, rtol=1e-3)  # the step scales with hp.lr alone
