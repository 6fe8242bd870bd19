"""Internal covariate shift, dead units and steps-to-target: closed forms, constructed cases, and packs."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnstudy.analysis.convergence import steps_to_target
from bnstudy.core import engine, metrics
from conftest import cnn_program, hparams, init_states, make_arrays, permutations

SHAPE = (10, 10, 1)
CNN_LAYERS = ("conv1", "conv2", "dense1", "classifier")

# --------------------------------------------------------------------------- ICS (4.4)


def linear_chain_grads(w1, s, w2, w3, x, y):
    """Hand-derived gradients of L = ||W3 (s W2 (W1 X)) - Y||^2 / (2n) w.r.t. W1, W2, W3 (float64)."""
    n = x.shape[1]
    h1 = w1 @ x
    h2 = s * (w2 @ h1)
    r = (w3 @ h2 - y) / n
    return {"w1": s * w2.T @ w3.T @ r @ x.T, "w2": s * (w3.T @ r) @ h1.T, "w3": r @ h2.T}


def test_ics_of_a_linear_chain_matches_the_hand_derived_gradients():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 16)), rng.normal(size=(2, 16))
    p = {
        "w1": rng.normal(size=(4, 3)),
        "s": np.float64(1.3),
        "w2": rng.normal(size=(5, 4)),
        "w3": rng.normal(size=(2, 5)),
    }
    u = {k: 0.1 * rng.normal(size=np.shape(v)) for k, v in p.items()}  # any update; here not even a gradient step

    def loss(q):
        out = q["w3"] @ (q["s"] * (q["w2"] @ (q["w1"] @ x)))
        return 0.5 * jnp.sum((out - y) ** 2) / x.shape[1]

    params = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    update = {k: jnp.asarray(v, jnp.float32) for k, v in u.items()}
    # "s" is a parameter group without a measured layer, like a BN's scale: it moves, it is not reported.
    out = metrics.internal_covariate_shift(loss, params, update, ("w1", "s", "w2", "w3"), ("w1", "w2", "w3"))

    g = linear_chain_grads(p["w1"], p["s"], p["w2"], p["w3"], x, y)
    moved = {k: p[k] + u[k] for k in p}
    g_w2 = linear_chain_grads(moved["w1"], moved["s"], p["w2"], p["w3"], x, y)["w2"]  # w1 and s moved
    g_w3 = linear_chain_grads(moved["w1"], moved["s"], moved["w2"], p["w3"], x, y)["w3"]  # all before w3 moved
    for layer, g_new in (("w2", g_w2), ("w3", g_w3)):
        g_old = g[layer]
        np.testing.assert_allclose(out[f"ics/{layer}/l2"], np.linalg.norm(g_new - g_old), rtol=1e-4)
        cos = np.sum(g_new * g_old) / (np.linalg.norm(g_new) * np.linalg.norm(g_old))
        np.testing.assert_allclose(out[f"ics/{layer}/cos"], cos, rtol=1e-4)
        assert np.linalg.norm(g_new - g_old) > 0.01 * np.linalg.norm(g_old)  # a real shift, not a vacuous check
    # Nothing precedes the first layer.
    assert out["ics/w1/l2"] == 0.0
    np.testing.assert_allclose(out["ics/w1/cos"], 1.0, rtol=1e-6)
    # The layer's own update and later layers' updates play no part.
    later = {**update, "w3": update["w3"] * 100.0}
    again = metrics.internal_covariate_shift(loss, params, later, ("w1", "s", "w2", "w3"), ("w1", "w2", "w3"))
    np.testing.assert_array_equal(again["ics/w2/l2"], out["ics/w2/l2"])
    np.testing.assert_array_equal(again["ics/w3/l2"], out["ics/w3/l2"])


def tiny_arrays():
    return make_arrays(n_train=64, n_test=24, shape=SHAPE)


# One model with dropout, and its step and probe jitted once for the tests below (they run on one worker,
# `xdist_group`): each costs seconds of compiling, and a pack's members are measured against them alone.
# Dropout before the classifier: one mask of the step's key, as after every block would be three (each one's
# random bits compile in every program that uses them, forward and backward: twice the compile time).
PROGRAM = cnn_program("before_relu", batch_size=16, dropout_placement="before_classifier")
STEP = jax.jit(partial(engine.train_step, PROGRAM))
ICS_PROBE = jax.jit(partial(metrics.ics_probe, PROGRAM))
shares_programs = pytest.mark.xdist_group("measures_dropout_cnn")


def start(setup, rows, arrays):
    """Initial pack state (vmapped init) and epoch 0's permutation for `rows`."""
    hp = hparams(rows)
    state = init_states(setup, SHAPE, hp)
    perm = permutations(hp, arrays.train_images.shape[0])
    return hp, state, perm


def one(tree, k):
    return jax.tree.map(lambda a: a[k], tree)


@shares_programs
def test_optimizer_update_is_the_train_steps_parameter_change_and_ics_probe_reports_every_weight_layer():
    setup, step, probe = PROGRAM, STEP, ICS_PROBE
    arrays = tiny_arrays()
    hp, state, perm = start(setup, [{"dropout_rate": 0.3, "weight_decay": 1e-3}], arrays)
    hp, state, perm = one(hp, 0), one(state, 0), perm[0]
    state, _ = step(state, hp, arrays, perm, 0)  # a non-zero momentum buffer from here on

    @jax.jit
    def update_of(state, hp, perm):
        x, labels, key = engine.step_inputs(setup, state, hp, arrays, perm, 1)
        loss = lambda p: engine.forward_train(setup, p, state.batch_stats, x, labels, hp.dropout_rate, key)[0]
        return metrics.optimizer_update(setup, state, hp, jax.grad(loss)(state.params))

    update = update_of(state, hp, perm)
    after, _ = step(state, hp, arrays, perm, 1)
    for u, new, old in zip(jax.tree.leaves(update), jax.tree.leaves(after.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(old + u, new, rtol=1e-6, atol=1e-7)

    out = probe(state, hp, arrays, perm, 1)
    assert set(out) == {f"ics/{layer}/{m}" for layer in CNN_LAYERS for m in ("l2", "rel", "cos")}
    assert float(out["ics/conv1/l2"]) == 0.0
    for layer in CNN_LAYERS[1:]:
        assert float(out[f"ics/{layer}/l2"]) > 0.0 and -1.0 <= float(out[f"ics/{layer}/cos"]) <= 1.0 + 1e-6
    # With a zero learning rate and no momentum yet nothing moves: no shift anywhere but float32 rounding
    # (G and G' come from differently fused programs: the folded first BN rounds its statistics in each).
    hp0, state0, perm0 = start(setup, [{"lr": 1e-30}], arrays)
    zero = probe(one(state0, 0), one(hp0, 0), arrays, perm0[0], 0)
    assert float(zero["ics/conv1/l2"]) == 0.0
    for layer in CNN_LAYERS:
        assert float(zero[f"ics/{layer}/l2"]) < 1e-5 and float(zero[f"ics/{layer}/cos"]) > 1.0 - 1e-6


# --------------------------------------------------------------------------- dead units (4.5)


def set_leaf(params, path, values):
    tree = jax.tree.map(lambda a: a, params)  # a copy
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = jnp.asarray(values, jnp.float32)
    return tree


@pytest.mark.parametrize("norm", ["none", "before_relu"])
def test_dead_fraction_of_a_constructed_layer(norm):
    setup = cnn_program(norm)
    arrays = make_arrays(n_train=8, n_test=12, shape=SHAPE)
    _, state, _ = start(setup, [{}], arrays)
    params, stats = one(state.params, 0), one(state.batch_stats, 0)
    # 8 of conv1's 32 channels and 32 of dense1's 128 features can never fire; all the others always do.
    conv_dead, dense_dead = np.arange(32) < 8, np.arange(128) % 4 == 0
    if norm == "none":  # a zero kernel leaves the bias as the pre-activation: -1 never fires, +1 always does
        for layer, dead in (("conv1", conv_dead), ("dense1", dense_dead)):
            params = set_leaf(params, (layer, "kernel"), np.zeros(params[layer]["kernel"].shape))
            params = set_leaf(params, (layer, "bias"), np.where(dead, -1.0, 1.0))
    else:  # BN's output is its bias when its scale is 0
        for block, dead, c in (("conv1_norm", conv_dead, 32), ("dense1_norm", dense_dead, 128)):
            params = set_leaf(params, (block, "bn", "scale"), np.zeros(c))
            params = set_leaf(params, (block, "bn", "bias"), np.where(dead, -1.0, 1.0))
    images, labels = arrays.test_images, arrays.test_labels
    mask = jnp.asarray(np.arange(12) < 10, jnp.float32)  # the last two are padding
    units = jax.jit(partial(metrics.eval_batch_with_units, setup))
    sums = units(params, stats, images, labels, mask)
    out = metrics.dead_unit_fractions(sums["relu_positive"])
    assert set(out) == {"relu/conv1/dead_frac", "relu/conv2/dead_frac", "relu/dense1/dead_frac"}
    assert float(out["relu/conv1/dead_frac"]) == 8 / 32
    assert float(out["relu/dense1/dead_frac"]) == 32 / 128
    np.testing.assert_array_equal(sums["relu_positive"]["conv1"], np.where(conv_dead, 0, 10))  # padding not counted
    # The same pass gives engine.eval_batch's sums.
    plain = jax.jit(partial(engine.eval_batch, setup))(params, stats, images, labels, mask)
    for key in plain:
        np.testing.assert_allclose(sums[key], plain[key], rtol=1e-6)
    # Nothing evaluated: nothing fired.
    none = units(params, stats, images, labels, jnp.zeros(12))
    assert all(float(v) == 1.0 for v in metrics.dead_unit_fractions(none["relu_positive"]).values())


# --------------------------------------------------------------------------- pack of 3


@shares_programs
def test_pack_of_three_measures_what_each_run_measures_alone():
    """vmapped convs become grouped convs on XLA:CPU, so a pack agrees with single runs to float32
    rounding (rtol 1e-4 on ICS), not bitwise; dead-unit counts are integers and must agree exactly."""
    setup = PROGRAM
    arrays = tiny_arrays()
    rows = [{"seed": 0, "dropout_rate": 0.2}, {"seed": 1, "lr": 0.2}, {"seed": 2, "lr": 0.01, "weight_decay": 1e-3}]
    hp, state, perm = start(setup, rows, arrays)
    # A first step gives each member a state of its own to measure (a momentum buffer, moved weights); the
    # measurements, not the step, are what is packed here.
    stepped = [STEP(one(state, k), one(hp, k), arrays, perm[k], 0)[0] for k in range(3)]
    state = jax.tree.map(lambda *members: jnp.stack(members), *stepped)
    ics = jax.vmap(partial(metrics.ics_probe, setup), in_axes=(0, 0, None, 0, None))
    units = jax.vmap(partial(metrics.eval_batch_with_units, setup), in_axes=(0, 0, None, None, None))
    images, labels, mask = arrays.test_images, arrays.test_labels, jnp.ones(24)
    packed_ics = jax.jit(ics)(state, hp, arrays, perm, 1)
    packed_units = jax.jit(units)(state.params, state.batch_stats, images, labels, mask)["relu_positive"]
    ics_alone = ICS_PROBE
    units_alone = jax.jit(partial(metrics.eval_batch_with_units, setup))
    for k in range(3):
        alone = ics_alone(one(state, k), one(hp, k), arrays, perm[k], 1)
        for key, v in alone.items():
            np.testing.assert_allclose(packed_ics[key][k], v, rtol=1e-4, atol=1e-7, err_msg=key)
        counts = units_alone(one(state.params, k), one(state.batch_stats, k), images, labels, mask)["relu_positive"]
        for name, c in counts.items():
            np.testing.assert_array_equal(packed_units[name][k], c, err_msg=name)
    assert len({float(packed_ics["ics/dense1/l2"][k]) for k in range(3)}) == 3  # the runs really differ


# --------------------------------------------------------------------------- steps to target (4.5)


def test_steps_to_target_is_the_first_evaluated_step_reaching_it():
    history = [
        {"step": 0, "train/loss": 2.3},
        {"step": 50, "val/acc": 0.62},
        {"step": 75, "train/loss": 0.5},
        {"step": 150, "val/acc": 0.97},
        {"step": 100, "val/acc": 0.95},  # out of order on purpose
        {"step": 200, "val/acc": 0.93},
    ]
    assert steps_to_target(history, 0.95) == 100
    assert steps_to_target(history, 0.96) == 150
    assert steps_to_target(history, 0.62) == 50
    assert steps_to_target(history, 0.98) is None
    assert steps_to_target([], 0.5) is None
    assert steps_to_target([{"step": 10, "val/acc": float("nan")}, {"step": 20, "val/acc": 0.5}], 0.1) == 20
    assert steps_to_target(history, 0.9, key="test/acc") is None
    with pytest.raises(ValueError, match="no 'step'"):
        steps_to_target([{"val/acc": 0.99}], 0.5)
