"""The models are what they claim: BN placement, momentum, init scale, dropout placement, VGG layout."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnstudy.core import kernels, models
from conftest import build_model, hparams, init_states, init_variables, initial_state, normal, setup_of

X = normal(0, (64, 8, 8, 4), loc=1.5, scale=3.0)


def apply_block(norm):
    block = models.Block(norm, bn_momentum=0.9, bn_epsilon=1e-5)
    h = normal(1, (256, 16), loc=0.7, scale=2.0)
    variables = block.init(jax.random.key(2), h, train=True)
    out, _ = block.apply(variables, h, train=True, mutable=["batch_stats"])
    return variables, h, out


def test_after_relu_block_output_is_normalized_per_channel():
    _, _, out = apply_block("after_relu")
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var(0), 1.0, atol=1e-3)


def test_before_relu_block_output_is_nonnegative_and_normalized_before_the_relu():
    _, h, out = apply_block("before_relu")
    assert float(out.min()) >= 0.0
    normalized = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
    np.testing.assert_allclose(out, jax.nn.relu(normalized), atol=1e-4)


def test_none_block_is_relu_and_model_has_no_batch_stats():
    variables, h, out = apply_block("none")
    assert "batch_stats" not in variables
    np.testing.assert_array_equal(out, jax.nn.relu(h))
    net = build_model("cnn", norm="none")
    assert "batch_stats" not in jax.eval_shape(
        partial(net.init, train=False), jax.random.key(0), jnp.zeros((1, 28, 28, 1))
    )


@pytest.mark.parametrize("norm", ["before_relu", "after_relu"])
def test_bn_layers_named_by_block(norm):
    net = build_model("cnn", norm=norm)
    x = jnp.zeros((16, 28, 28, 1))
    # Names and shapes only: inferred, nothing compiled.
    variables = jax.eval_shape(partial(net.init, train=False), jax.random.key(1), x)
    assert set(variables["batch_stats"]) == {"conv1_norm", "conv2_norm", "dense1_norm"}
    assert jax.eval_shape(partial(net.apply, train=False), variables, x).shape == (16, 10)


def test_bn_running_stats_move_by_one_minus_momentum():
    # running = 0.9 * running + 0.1 * batch: PyTorch's momentum=0.1 convention, not Flax's 0.99 default.
    block = models.Block("before_relu", bn_momentum=0.9, bn_epsilon=1e-5)
    h = jnp.ones((8, 3)) * 5.0
    variables = block.init(jax.random.key(0), h, train=True)
    _, updates = block.apply(variables, h, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["bn"]["mean"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["bn"]["var"], 0.9, rtol=1e-6)  # batch var is 0


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_init_scale_multiplies_kernel_std_exactly(scale):
    setup = setup_of(build_model("cnn"))
    states = init_states(setup, (28, 28, 1), hparams([{}, {"init_scale": scale}]))
    base, scaled = (jax.tree.map(lambda a, k=k: a[k], states) for k in range(2))
    for name in ("conv1", "conv2", "dense1", "classifier"):
        k0, k1 = base.params[name]["kernel"], scaled.params[name]["kernel"]
        np.testing.assert_allclose(k1, scale * k0, rtol=1e-6)
        np.testing.assert_allclose(float(k1.std() / k0.std()), scale, rtol=1e-5)
        np.testing.assert_array_equal(scaled.params[name]["bias"], 0.0)
    np.testing.assert_array_equal(scaled.params["conv1_norm"]["bn"]["scale"], 1.0)


def test_he_normal_std_matches_fan_in():
    setup = setup_of(build_model("cnn"))
    state = initial_state(setup, (28, 28, 1), jax.tree.map(lambda a: a[0], hparams([{}])))
    kernel = state.params["dense1"]["kernel"]  # fan-in 7*7*64 = 3136
    np.testing.assert_allclose(float(kernel.std()), np.sqrt(2.0 / 3136), rtol=0.05)


@pytest.mark.parametrize("placement", ["after_block", "before_classifier"])
def test_dropout_changes_train_output_only_when_rate_positive(placement):
    net = build_model("cnn", norm="none", dropout_placement=placement)
    x = normal(0, (4, 28, 28, 1))
    variables = init_variables(net, jax.random.key(1), x, train=False)
    key = jax.random.key(2)
    plain = net.apply(variables, x, train=True)
    off = net.apply(variables, x, train=True, dropout_rate=0.0, dropout_rng=key)
    on = net.apply(variables, x, train=True, dropout_rate=0.5, dropout_rng=key)
    np.testing.assert_allclose(off, plain, rtol=1e-6)
    assert not np.allclose(on, plain)


def test_dropout_keeps_expectation():
    x = jnp.ones((200_000,))
    y = models.dropout(x, 0.3, jax.random.key(0))
    assert abs(float(y.mean()) - 1.0) < 0.01
    np.testing.assert_allclose(float((y == 0).mean()), 0.3, atol=0.01)


def test_vgg_layout_and_width():
    net = build_model("vgg", norm="before_relu", width=0.125)
    x = jnp.zeros((2, 32, 32, 3))
    # Shapes only: run op by op, the 8-conv net's init would compile each primitive on its own.
    variables = jax.eval_shape(partial(net.init, train=False), jax.random.key(0), x)
    convs = sorted(k for k in variables["params"] if k.startswith("conv") and not k.endswith("_norm"))
    assert len(convs) == 8
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 8)  # 64 * 0.125
    assert variables["params"]["dense1"]["kernel"].shape == (64, 64)  # 512*0.125 channels at 1x1 after 5 pools
    assert jax.eval_shape(partial(net.apply, train=False), variables, x).shape == (2, 10)


def test_unknown_choices_are_rejected():
    with pytest.raises(ValueError, match="norm"):
        build_model("cnn", norm="middle")
    with pytest.raises(ValueError, match="model"):
        build_model("alexnet")
    with pytest.raises(ValueError, match="6n"):
        build_model("resnet", depth=21)


def nn_max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


# Continuous values (no ties), even and odd sizes; then integers (many ties, whole windows of equal values).
TIE_FREE = [normal(0, (3, 8, 6, 5)), normal(1, (2, 7, 9, 3))]
WITH_TIES = [jnp.round(normal(2, (3, 8, 6, 5))), jnp.round(normal(3, (2, 7, 9, 3), scale=0.3))]


@pytest.mark.parametrize("x", TIE_FREE)
def test_max_pool_2x2_equals_nn_max_pool_in_value_and_gradient_without_ties(x):
    cotangent = normal(4, nn_max_pool(x).shape)
    ours, ours_vjp = jax.vjp(kernels.max_pool_2x2, x)
    ref, ref_vjp = jax.vjp(nn_max_pool, x)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours_vjp(cotangent)[0], ref_vjp(cotangent)[0])


@pytest.mark.parametrize("x", WITH_TIES)
def test_max_pool_2x2_equals_nn_max_pool_in_value_with_ties_and_passes_the_whole_gradient_on(x):
    np.testing.assert_array_equal(kernels.max_pool_2x2(x), nn_max_pool(x))
    cotangent = normal(4, nn_max_pool(x).shape)
    ours = jax.vjp(kernels.max_pool_2x2, x)[1](cotangent)[0]
    ref = jax.vjp(nn_max_pool, x)[1](cotangent)[0]
    np.testing.assert_allclose(ours.sum(), ref.sum(), rtol=1e-5)  # the same total reaches the inputs


def test_max_pool_2x2_splits_a_tied_windows_gradient_pairwise():
    grad = lambda window: jax.grad(lambda v: kernels.max_pool_2x2(v).sum())(jnp.asarray(window).reshape(1, 2, 2, 1))
    np.testing.assert_array_equal(grad([[1.0, 3.0], [3.0, 0.0]]).ravel(), [0, 0.5, 0.5, 0])
    np.testing.assert_array_equal(grad([[1.0, 1.0], [1.0, 1.0]]).ravel(), [0.25, 0.25, 0.25, 0.25])
    # Three tied: the top pair halves its share, the bottom winner keeps its own.
    np.testing.assert_array_equal(grad([[3.0, 3.0], [3.0, 0.0]]).ravel(), [0.25, 0.25, 0.5, 0])


@pytest.mark.parametrize("norm", ["none", "before_relu", "after_relu"])
def test_a_pooled_block_is_the_block_then_its_pool_in_values_gradients_and_relu_maxima(norm):
    """The block's ReLU may run after its pool: it stays the composition block -> pool, ties included,
    with the same per-unit ReLU maxima (the dead-unit counts), whatever the placement."""
    x = jnp.round(normal(5, (6, 8, 8, 3), scale=4.0)) / 4.0  # ties, ReLU zeros
    pooled = models.Block(norm, 0.9, 1e-5, pool=True)
    plain = models.Block(norm, 0.9, 1e-5)
    variables = plain.init(jax.random.key(0), x, train=True)
    cotangent = normal(6, (6, 4, 4, 3))

    def run(block, post):
        def f(x, params):
            out, sown = block.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats", "relu"])
            return jnp.vdot(post(out), cotangent), sown["relu"]

        (_, sown), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, variables.get("params", {}))
        return grads, sown

    (gx, gp), sown = run(pooled, lambda out: out)
    (rx, rp), ref_sown = run(plain, kernels.max_pool_2x2)
    np.testing.assert_allclose(gx, rx, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), gp, rp)
    jax.tree.map(np.testing.assert_array_equal, sown, ref_sown)


@pytest.mark.parametrize("in_channels", [1, 3], ids=["one-channel stencil", "XLA convolution"])
def test_conv3x3_is_nn_conv_in_parameters_values_and_gradients(in_channels):
    x = normal(0, (4, 7, 6, in_channels))  # odd width: SAME padding at both edges
    ours, ref = models.Conv3x3(5, name="c"), nn.Conv(5, (3, 3), kernel_init=models.HE_NORMAL, name="c")
    init = init_variables(ours, jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, init, init_variables(ref, jax.random.key(1), x))  # same init, names
    variables = {"params": {"kernel": init["params"]["kernel"], "bias": jnp.arange(5.0)}}
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), atol=1e-5)
    cotangent = normal(2, (4, 7, 6, 5))
    grad = lambda conv: jax.grad(lambda v, x: jnp.vdot(conv.apply(v, x), cotangent), argnums=(0, 1))(variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), grad(ours), grad(ref))
