"""Normalization layers against hand computations: BN's forward and running statistics (and PyTorch's, when
installed), layer and group norm, the norm kinds as model arms, and the group-count validation."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnstudy.core import kernels, models
from conftest import build_model, init_variables, normal, setup_of

EPS = 1e-5


def numpy_bn(x, scale, bias, eps=EPS):
    """Train-mode BN in float64: normalize each channel (last axis) by the batch mean and biased variance."""
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axes), x.var(axes)
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def run_bn(bn, batches, scale, bias):
    """Train-mode outputs over a sequence of batches, running stats carried; then the eval-mode output."""
    variables = bn.init(jax.random.key(0), jnp.asarray(batches[0]))
    variables = {
        "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
        "batch_stats": variables["batch_stats"],
    }
    outs = []
    for x in batches:
        y, updates = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        variables = {**variables, "batch_stats": updates["batch_stats"]}
        outs.append(np.asarray(y))
    return outs, variables


def batches_of(shape, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=shape) * (1.0 + 2.0 * i) + 0.5 * i).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (5, 3)], ids=["conv", "dense"])
@pytest.mark.parametrize("running_var", ["unbiased", "biased"])
def test_batchnorm_forward_and_running_stats_match_hand_computation(shape, running_var):
    batches = batches_of(shape)
    c = shape[-1]
    scale, bias = np.linspace(0.5, 2.0, c).astype(np.float32), np.linspace(-1.0, 1.0, c).astype(np.float32)
    train_bn = models.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS, running_var=running_var)
    outs, variables = run_bn(train_bn, batches, scale, bias)

    n = int(np.prod(shape[:-1]))  # values per channel
    run_mean, run_var = np.zeros(c), np.ones(c)
    for x, y in zip(batches, outs):
        expected, mean, var = numpy_bn(x.astype(np.float64), scale, bias)
        np.testing.assert_allclose(y, expected, atol=1e-5)
        averaged = var * n / (n - 1) if running_var == "unbiased" else var
        run_mean, run_var = 0.9 * run_mean + 0.1 * mean, 0.9 * run_var + 0.1 * averaged
    np.testing.assert_allclose(variables["batch_stats"]["mean"], run_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variables["batch_stats"]["var"], run_var, rtol=1e-5)

    # Inference mode normalizes with the running averages.
    eval_bn = models.BatchNorm(use_running_average=True, momentum=0.9, epsilon=EPS, running_var=running_var)
    x = batches[0]
    y = eval_bn.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(y, (x - run_mean) / np.sqrt(run_var + EPS) * scale + bias, atol=1e-5)


def test_biased_running_var_is_flax_batchnorm_and_unbiased_is_n_over_n_minus_1_above_it():
    batches = batches_of((8, 4), n=1)  # the dense layer at batch 8: 8 values per channel
    ours = {
        kind: run_bn(models.BatchNorm(False, 0.0, EPS, kind), batches, np.ones(4, np.float32), np.zeros(4, np.float32))
        for kind in ("unbiased", "biased")
    }
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=EPS, use_fast_variance=False)
    flax_out, flax_vars = run_bn(flax_bn, batches, np.ones(4, np.float32), np.zeros(4, np.float32))
    np.testing.assert_allclose(ours["biased"][1]["batch_stats"]["var"], flax_vars["batch_stats"]["var"], rtol=1e-6)
    np.testing.assert_allclose(ours["biased"][0][0], flax_out[0], atol=1e-6)
    ratio = ours["biased"][1]["batch_stats"]["var"] / ours["unbiased"][1]["batch_stats"]["var"]
    np.testing.assert_allclose(ratio, 7 / 8, rtol=1e-6)


def test_unbiased_batchnorm_refuses_one_value_per_channel():
    bn = models.BatchNorm(False, 0.9, EPS, "unbiased")
    x = jnp.ones((1, 3))
    variables = bn.init(jax.random.key(0), x)  # init itself takes no statistics
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        bn.apply(variables, x, mutable=["batch_stats"])


@pytest.mark.parametrize("shape", [(6, 5, 5, 3), (7, 4)], ids=["BatchNorm2d", "BatchNorm1d"])
def test_batchnorm_matches_torch(shape):
    torch = pytest.importorskip("torch")
    batches = batches_of(shape, n=4, seed=1)
    c = shape[-1]
    scale, bias = np.linspace(0.5, 2.0, c).astype(np.float32), np.linspace(-1.0, 1.0, c).astype(np.float32)
    ours, variables = run_bn(models.BatchNorm(False, 0.9, EPS, "unbiased"), batches, scale, bias)

    conv = len(shape) == 4
    tbn = (torch.nn.BatchNorm2d if conv else torch.nn.BatchNorm1d)(c, eps=EPS, momentum=0.1)  # == bnstudy's 0.9
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(scale))
        tbn.bias.copy_(torch.from_numpy(bias))
    to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if conv else x))
    from_torch = lambda t: t.detach().numpy().transpose(0, 2, 3, 1) if conv else t.detach().numpy()
    tbn.train()
    for x, y in zip(batches, ours):
        np.testing.assert_allclose(y, from_torch(tbn(to_torch(x))), atol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["mean"], tbn.running_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["var"], tbn.running_var.numpy(), atol=1e-5)
    tbn.eval()
    y_eval = models.BatchNorm(True, 0.9, EPS, "unbiased").apply(variables, jnp.asarray(batches[0]))
    np.testing.assert_allclose(y_eval, from_torch(tbn(to_torch(batches[0]))), atol=1e-5)


def autodiff_bn(x, scale, bias):
    """Train-mode BN written as the plain formula, for JAX to differentiate: the closed form's reference."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    return (x - mean) * jax.lax.rsqrt(var + EPS) * scale + bias, mean, var


@pytest.mark.parametrize("shape", [(6, 5, 5, 3), (7, 4)], ids=["conv", "dense"])
def test_batchnorm_closed_form_gradient_equals_autodiff_of_the_formula(shape):
    rng = np.random.default_rng(3)
    c = shape[-1]
    x = jnp.asarray(rng.normal(size=shape) * 3.0 + 1.0, jnp.float32)
    scale, bias = jnp.linspace(0.5, 2.0, c), jnp.linspace(-1.0, 1.0, c)
    # A cotangent on every output, the mean and variance included (the app's are zero there).
    outs = autodiff_bn(x, scale, bias)
    cotangents = [jnp.asarray(rng.normal(size=o.shape), jnp.float32) for o in outs]
    pairing = lambda fn: lambda *a: sum(jnp.vdot(o, ct) for o, ct in zip(fn(*a), cotangents))
    closed = jax.grad(pairing(lambda *a: kernels.batch_norm_train(*a, EPS)), argnums=(0, 1, 2))(x, scale, bias)
    reference = jax.grad(pairing(autodiff_bn), argnums=(0, 1, 2))(x, scale, bias)
    for ours, ref in zip(closed, reference):
        np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6)
    for ours, ref in zip(kernels.batch_norm_train(x, scale, bias, EPS), outs):
        np.testing.assert_array_equal(ours, ref)


def test_batchnorm_gradient_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 5, 5, 3)).astype(np.float32) * 2.0 + 0.5
    dy = rng.normal(size=x.shape).astype(np.float32)
    scale, bias = np.float32([0.5, 1.0, 2.0]), np.float32([0.1, -0.2, 0.3])
    loss = lambda x, s, b: jnp.vdot(kernels.batch_norm_train(x, s, b, EPS)[0], dy)
    ours = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    tbn = torch.nn.BatchNorm2d(3, eps=EPS)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(scale))
        tbn.bias.copy_(torch.from_numpy(bias))
    (tbn(tx) * torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())).sum().backward()
    np.testing.assert_allclose(ours[0], tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(ours[1], tbn.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[2], tbn.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- BN folded into a one-channel conv


def numpy_conv3x3_one_channel(x, kernel, bias):
    """A 3x3 SAME convolution of a one-channel NHWC batch in float64."""
    h, w = x.shape[1:3]
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = np.stack([padded[:, i : i + h, j : j + w, 0] for i in range(3) for j in range(3)], -1)
    return taps @ kernel.reshape(9, -1).astype(np.float64) + bias


def one_channel_case(seed, shape=(6, 9, 7, 1), channels=5):
    """A one-channel batch, a kernel whose last channel sums to zero (an edge detector: the case where
    the folded variance cancels most), conv bias, BN scale and bias."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 2.0 + 0.7).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 1, channels)).astype(np.float32)
    kernel[..., -1] -= kernel[..., -1].mean()
    bias, scale, beta = (rng.normal(size=channels).astype(np.float32) for _ in range(3))
    return x, kernel, bias, scale, beta


def folded_bn(x, kernel, bias, scale, beta):
    return kernels.batch_norm_train_one_channel_conv(kernels.OneChannelConv(x, kernel, bias), scale, beta, EPS)


def unfolded_bn(x, kernel, bias, scale, beta):
    return kernels.batch_norm_train(kernels.conv3x3_one_channel(x, kernel, bias), scale, beta, EPS)


@pytest.mark.parametrize("seed", [0, 1])
def test_bn_folded_into_a_one_channel_conv_is_bn_of_the_conv_output_in_float64(seed):
    x, kernel, bias, scale, beta = one_channel_case(seed)
    y, mean, var = folded_bn(*map(jnp.asarray, (x, kernel, bias, scale, beta)))
    ref_y, ref_mean, ref_var = numpy_bn(numpy_conv3x3_one_channel(x, kernel, bias), scale, beta)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=2e-6)


def test_bn_folded_into_a_one_channel_conv_has_the_unfolded_gradient_and_none_for_the_conv_bias():
    x, *weights = map(jnp.asarray, one_channel_case(2))
    dy = normal(7, (*x.shape[:-1], weights[0].shape[-1]))
    loss = lambda fn: lambda *w: jnp.vdot(fn(x, *w)[0], dy)
    folded = jax.grad(loss(folded_bn), argnums=(0, 1, 2, 3))(*weights)
    unfolded = jax.grad(loss(unfolded_bn), argnums=(0, 1, 2, 3))(*weights)
    for name, ours, ref in zip(("kernel", "scale", "bias"), (folded[0], *folded[2:]), (unfolded[0], *unfolded[2:])):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(folded[1], 0.0)  # BN removes the conv bias exactly
    np.testing.assert_allclose(unfolded[1], 0.0, atol=1e-4)  # unfolded: zero up to rounding


def test_bn_folded_into_the_first_conv_keeps_float32_precision_on_real_digits():
    """The documented precision: on 128 embedded MNIST digits, normalized as the app does, with a
    He-normal and a zero-mean kernel, the batch variance within 2e-6 of float64 (relative)."""
    import gzip
    from pathlib import Path

    import bnstudy

    raw = (Path(bnstudy.__file__).parent / "app/datasets/mnist_t10k/t10k-images-idx3-ubyte.gz").read_bytes()
    digits = np.frombuffer(gzip.decompress(raw), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:128]
    x = ((digits / 255.0 - 0.1307) / 0.3081).astype(np.float32)
    rng = np.random.default_rng(5)
    kernel = (rng.normal(size=(3, 3, 1, 16)) * np.sqrt(2 / 9)).astype(np.float32)
    kernel[..., 8:] -= kernel[..., 8:].mean((0, 1, 2))
    zeros, ones = np.zeros(16, np.float32), np.ones(16, np.float32)
    _, mean, var = folded_bn(jnp.asarray(x), jnp.asarray(kernel), zeros, ones, zeros)
    _, ref_mean, ref_var = numpy_bn(numpy_conv3x3_one_channel(x, kernel, zeros), ones, zeros)
    np.testing.assert_allclose(var, ref_var, rtol=2e-6)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-6 * np.sqrt(ref_var).max())


def test_the_cnn_folds_its_first_bn_only_in_train_mode_and_matches_the_unfolded_model(monkeypatch):
    """The whole model: its first BN takes the folded form in train mode only, and the train-mode outputs
    and updated running statistics agree with the same model whose first BN normalizes the computed
    conv map (the gradients are compared above, layer by layer); eval mode is untouched."""
    net = build_model("cnn", norm="before_relu")
    x = normal(8, (8, 12, 12, 1), loc=0.3, scale=1.5)
    variables = init_variables(net, jax.random.key(0), x, train=True)

    def train_mode():  # a new function each time: traced again after the patch
        run = lambda v: net.apply(v, x, train=True, mutable=["batch_stats"])
        return jax.jit(run)(variables)

    eval_mode = lambda: jax.jit(lambda v: net.apply(v, x, train=False))(variables)
    calls = []
    fold = kernels.batch_norm_train_one_channel_conv
    monkeypatch.setattr(kernels, "batch_norm_train_one_channel_conv", lambda *a: calls.append(1) or fold(*a))
    folded, folded_eval = train_mode(), eval_mode()
    assert len(calls) == 1  # one trace of the train-mode model; none in eval mode
    unfold = lambda conv, *a: kernels.batch_norm_train(conv.output(), *a)
    monkeypatch.setattr(kernels, "batch_norm_train_one_channel_conv", unfold)
    for ours, ref in zip(jax.tree.leaves(folded), jax.tree.leaves(train_mode())):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(folded_eval, eval_mode())


# --------------------------------------------------------------------------- layer and group norm


def numpy_group_norm(x, groups, scale, bias, eps=EPS):
    """Wu & He's group norm in float64 on [N, ..., C]: per example, each of `groups` contiguous channel groups."""
    n, c = x.shape[0], x.shape[-1]
    g = x.reshape(n, -1, groups, c // groups)  # positions x groups x channels-in-group
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def apply_norm(kind, x, groups=2, train=True):
    norm = models.make_norm(kind, x.ndim, train, 0.9, EPS, groups, "unbiased")
    variables = norm.init(jax.random.key(0), jnp.asarray(x))
    c = x.shape[-1]
    scale, bias = np.linspace(0.5, 2.0, c).astype(np.float32), np.linspace(-1.0, 1.0, c).astype(np.float32)
    variables = {**variables, "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    return variables, np.asarray(norm.apply(variables, jnp.asarray(x))), scale, bias


@pytest.mark.parametrize("shape", [(3, 4, 4, 6), (5, 6)], ids=["conv", "dense"])
def test_layer_norm_pools_every_non_batch_axis_per_example(shape):
    x = batches_of(shape, n=1)[0] * 3.0 + 2.0
    variables, y, scale, bias = apply_norm("layer", x)
    assert set(variables) == {"params"}  # no running statistics
    np.testing.assert_allclose(y, numpy_group_norm(x.astype(np.float64), 1, scale, bias), atol=1e-5)
    # Per example, independent of the rest of the batch: the first example alone gives the same output.
    _, alone, _, _ = apply_norm("layer", x[:1])
    np.testing.assert_allclose(alone, y[:1], atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 4, 6), (5, 6)], ids=["conv", "dense"])
@pytest.mark.parametrize("groups", [2, 3])
def test_group_norm_normalizes_contiguous_channel_groups(shape, groups):
    x = batches_of(shape, n=1)[0] * 3.0 + 2.0
    variables, y, scale, bias = apply_norm("group", x, groups=groups)
    assert set(variables) == {"params"}
    np.testing.assert_allclose(y, numpy_group_norm(x.astype(np.float64), groups, scale, bias), atol=1e-5)


@pytest.mark.parametrize("kind", ["layer", "group"])
@pytest.mark.parametrize("norm", ["before_relu", "after_relu"])
def test_layer_and_group_norm_arms_have_no_running_stats_and_are_the_same_in_train_and_eval(kind, norm):
    net = build_model("cnn", norm=norm, norm_kind=kind, norm_groups=4)
    x = normal(0, (4, 28, 28, 1))
    variables = init_variables(net, jax.random.key(1), x, train=False)
    assert "batch_stats" not in variables
    tag = {"layer": "ln", "group": "gn"}[kind]
    assert set(variables["params"]["conv1_norm"]) == {tag}
    assert variables["params"]["dense1_norm"][tag]["scale"].shape == (128,)
    np.testing.assert_allclose(net.apply(variables, x, train=True), net.apply(variables, x, train=False), atol=1e-5)
    assert net.dropout_fed_blocks() == ()


@pytest.mark.parametrize("groups", [5, 0])
def test_group_count_that_does_not_divide_every_block_is_refused_with_the_channels(groups):
    with pytest.raises(ValueError, match="groups") as err:
        build_model("cnn", norm_kind="group", norm_groups=groups)
    if groups == 5:
        assert "conv1" in str(err.value) and "[1, 2, 4, 8, 16, 32]" in str(err.value)
    assert models.norm_groups_problem("cnn", 1.0, 32) is None
    build_model("cnn", norm_kind="batch", norm_groups=groups)  # unused by BN: not an error


def test_bn_model_keeps_its_variable_names():
    net = build_model("cnn", bn_running_var="biased")
    # Names only: the shapes JAX infers, nothing compiled.
    variables = jax.eval_shape(partial(net.init, train=False), jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
    assert set(variables["batch_stats"]["conv1_norm"]["bn"]) == {"mean", "var"}
    assert set(variables["params"]["conv1_norm"]["bn"]) == {"scale", "bias"}
    with pytest.raises(ValueError, match="running variance"):
        build_model("cnn", bn_running_var="sample")


# --------------------------------------------------------------------------- config keys


def parse(**model):
    from bnstudy.app import config as config_lib

    return config_lib.parse({"dataset": {"name": "mnist"}, "model": model})


def test_norm_kind_keys_default_to_pytorch_batch_norm_and_are_validated_before_anything_is_built():
    from bnstudy.app.config import ConfigError

    cfg = parse()
    assert (cfg.model.norm_kind, cfg.model.bn_running_var, cfg.model.norm_groups) == ("batch", "unbiased", 8)
    assert parse(norm_kind="group", norm_groups=16).model.norm_groups == 16
    with pytest.raises(ConfigError, match=r"`model.norm_groups`.*conv1"):
        parse(norm_kind="group", norm_groups=3)
    with pytest.raises(ConfigError) as err:  # ResNet-20's 19 blocks: grouped by width, not listed twice
        parse(name="resnet", norm_kind="group", norm_groups=3)
    assert "of 19 of 19 blocks (16 in conv1 and 6 more, 32 in s2b1_conv1 and 5 more" in str(err.value)
    assert len(str(err.value)) < 400
    with pytest.raises(ConfigError, match=r"`model.norm_kind` must be one of \['batch', 'layer', 'group'\]"):
        parse(norm_kind="instance")
    with pytest.raises(ConfigError, match=r"`model.bn_running_var`"):
        parse(bn_running_var="torch")
    with pytest.raises(ConfigError, match=r"`model.norm_kind`.*multirun"):
        parse(norm_kind=["batch", "layer"])
    from bnstudy.app import config as config_lib

    with pytest.raises(ConfigError, match=r"`train.batch_size` must be at least 2"):
        config_lib.parse({"dataset": {"name": "mnist"}, "train": {"batch_size": 1}})
    config_lib.parse({"dataset": {"name": "mnist"}, "train": {"batch_size": 1}, "model": {"bn_running_var": "biased"}})


@pytest.mark.parametrize("name", ["cnn", "vgg"])
def test_a_models_own_has_batch_norm_agrees_with_the_collections_of_its_init(name):
    from bnstudy.core import evaluate

    for norm, kind in [("none", "batch"), ("before_relu", "batch"), ("after_relu", "batch"), ("before_relu", "layer")]:
        kw = dict(norm_kind=kind, norm_groups=4) if kind != "batch" else {}
        setup = setup_of(build_model(name, norm=norm, width=0.125, **kw))
        shape = (32, 32, 3) if name == "vgg" else (28, 28, 1)
        assert (
            setup.model.has_batch_norm
            == evaluate.batch_stats_in_init(setup, shape)
            == (norm != "none" and kind == "batch")
        )
