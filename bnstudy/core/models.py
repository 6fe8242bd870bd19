"""Flax CNNs whose normalization placement, dropout and init scale are the things under study.

Every hidden layer is a *block*: layer -> {norm -> ReLU | ReLU -> norm | ReLU}, then a 2x2 max-pool in
the conv blocks that have one; placement chosen by `norm`, the norm's kind by `norm_kind`: batch (BN,
`<block>_norm/bn`), layer (`<block>_norm/ln`) or group (`<block>_norm/gn`). Only BN keeps running
statistics (`batch_stats`: `<block>_norm/bn/{mean,var}`), so metrics find BN layers, and only BN
layers, there, reported by their block name.
The dropout rate is a call argument (a traced value), not a module field, so runs with different
rates share one compiled program.

Each block sows, into the `relu` collection and only when a caller makes it mutable, the per-example
maximum of its ReLU output over the spatial positions ([N, channels]): what the dead-unit measurement
reads, at no cost to ordinary training or evaluation. (Where the ReLU runs after the pool, see
`Block`, that maximum is over the pooled map: the same number, as the windows tile the map.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("none", "before_relu", "after_relu")
NORM_KINDS = ("batch", "layer", "group")
BN_RUNNING_VARS = ("unbiased", "biased")
RELU_COLLECTION = "relu"
DROPOUT_PLACEMENTS = ("none", "after_block", "before_classifier")
MODELS = ("cnn", "vgg")

# He-normal on fan-in; the study's init scale multiplies these kernels afterwards (engine.scale_kernels).
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# VGG-11 ("A" in Simonyan & Zisserman); "M" is a 2x2 max-pool.
VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 over an NHWC batch: `nn.max_pool(x, (2, 2), strides=(2, 2))`, faster.

    The maximum of each window's four corners, as three elementwise `maximum`s of strided views, so
    that value and derivative are each one loop fusion: `nn.max_pool`'s backward (select_and_scatter)
    was about a third of a CPU train step; a reshape + `max` reduction's backward counts ties by a
    reduction that took ~14% of a profiled one-step call (before BN's closed-form gradient; on today's
    app step the two forms are within noise, benchmarks/step_vs_torch.py). Values equal `nn.max_pool`'s; so do gradients
    wherever a window has one maximum. Ties split pairwise, by JAX's rule for `maximum` (equal inputs
    share equally): (top-left, top-right) and (bottom-left, bottom-right) first, then the two winners,
    so a window of four equal values gives each a quarter, and the whole gradient reaches the window
    either way; `nn.max_pool` gives it all to the first. In these CNNs exact ties are windows of ReLU
    zeros, whose gradient the ReLU stops either way.
    An odd height or width drops its last row or column, as `nn.max_pool`'s VALID padding does.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)
    top = jnp.maximum(x[:, :, 0, :, 0], x[:, :, 0, :, 1])
    bottom = jnp.maximum(x[:, :, 1, :, 0], x[:, :, 1, :, 1])
    return jnp.maximum(top, bottom)


def _taps(x: jax.Array) -> list[jax.Array]:
    """The nine 3x3 SAME-padded neighbours of each position of an NHWC batch, in kernel (row, column) order."""
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]


@jax.custom_vjp
def conv3x3_one_channel(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A 3x3 SAME convolution of a one-channel NHWC batch plus bias, as nine broadcast multiply-adds.

    XLA:CPU's convolution kernels are slow at one input channel (MNIST's first layer: forward
    5-6 ms at batch 128 on a 2-core CPU, against ~0.7 ms here, one loop over the output). The kernel
    gradient is one matrix product of the 9 taps with the output gradient (forward and kernel
    gradient 8.1 -> 4.0 ms); the input gradient is the transposed stencil.
    """
    taps = _taps(x)
    out = bias
    for t, tap in enumerate(taps):
        out = out + tap * kernel[t // 3, t % 3, 0]
    return out


def _conv3x3_one_channel_fwd(x, kernel, bias):
    return conv3x3_one_channel(x, kernel, bias), (x, kernel)


def _conv3x3_one_channel_bwd(residuals, dout):
    x, kernel = residuals
    patches = jnp.stack(_taps(x)).reshape(9, -1)  # [taps, positions]: each tap one contiguous copy
    flat = dout.reshape(-1, dout.shape[-1])
    dkernel = (patches @ flat).reshape(kernel.shape)
    dbias = flat.sum(0)
    # Input gradient: each output position hands dout . kernel[tap] back to the input its tap read.
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(dout, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dx = sum(padded[:, 2 - i : 2 - i + h, 2 - j : 2 - j + w] @ kernel[i, j].T for i in range(3) for j in range(3))
    return dx, dkernel, dbias


conv3x3_one_channel.defvjp(_conv3x3_one_channel_fwd, _conv3x3_one_channel_bwd)


class OneChannelConv(NamedTuple):
    """A 3x3 SAME convolution of a one-channel batch, not computed yet (`Conv3x3(deferred=True)`): a
    train-mode BN right after it folds its normalization into the kernel
    (`batch_norm_train_one_channel_conv`); everything else takes `output()`."""

    x: jax.Array
    kernel: jax.Array
    bias: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.x.shape[:-1], self.kernel.shape[-1])

    @property
    def ndim(self) -> int:
        return self.x.ndim

    def output(self) -> jax.Array:
        return conv3x3_one_channel(self.x, self.kernel, self.bias)


def computed(h: jax.Array | OneChannelConv) -> jax.Array:
    """A layer's output as an array (a deferred convolution computed)."""
    return h.output() if isinstance(h, OneChannelConv) else h


class Conv3x3(nn.Module):
    """`nn.Conv(features, (3, 3), kernel_init=HE_NORMAL)`: the same parameters (`kernel` [3, 3, in, out],
    `bias`), initialization and function; a one-channel input takes `conv3x3_one_channel`, or with
    `deferred` is returned uncomputed (`OneChannelConv`) for the norm after it."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, deferred: bool = False) -> jax.Array | OneChannelConv:
        kernel = self.param("kernel", HE_NORMAL, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if x.shape[-1] == 1:
            conv = OneChannelConv(x, kernel, bias)
            return conv if deferred else conv.output()
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims) + bias


def dropout(x: jax.Array, rate: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with a traced rate; identity when rng is None (eval) or rate == 0."""
    if rng is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep, 0.0)


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel (last axis) mean and biased variance over every other axis, two-pass."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    return mean, jnp.square(x - mean).mean(axes)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Train-mode BN: (y, batch mean, batch variance), y = (x - mean) / sqrt(var + epsilon) * scale + bias.

    The same function as autodiff of the formula, with its gradient written in closed form:
        dx = scale / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat)),  xhat = normalized x,
        dscale = sum(dy * xhat), dbias = sum(dy)
    (plus the mean's and variance's own cotangents, zero where they only feed the running averages).
    Autodiff of the two-pass variance reads the activation some six times more in the backward pass;
    on a 2-core CPU this form made the MNIST CNN's train step 1.25x faster (benchmarks/step_vs_torch.py).
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    mean, var = batch_stats(x)
    inv_std = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * inv_std * scale + bias
    return (y, mean, var), (x, mean, inv_std, scale)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
    x, mean, inv_std, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    centered = x - mean
    xhat = centered * inv_std
    dbias = dy.sum(axes)
    dscale = (dy * xhat).sum(axes)
    dx = (scale * inv_std) * (dy - dbias / n - xhat * (dscale / n)) + dmean / n + centered * (dvar * (2.0 / n))
    return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm_train_one_channel_conv(conv: OneChannelConv, scale: jax.Array, bias: jax.Array, epsilon: float):
    """`batch_norm_train(conv.output(), scale, bias, epsilon)` with the normalization folded into the stencil.

    The convolution is linear in its nine taps t (shifted copies of the input): c = sum_t k_t t + b. So
    its batch moments per channel come from the taps' own, mean = sum_t k_t mean(t) + b and
    var = k^T Cov k, Cov the 9x9 covariance of the taps over all positions, taken two-pass (centered
    taps, no cancellation from the mean); and BN's output is itself one stencil, with kernel k * g and
    bias beta - (mean - b) * g, g = scale / sqrt(var + eps). XLA fuses it with the pool after it, so
    the [batch, 28, 28, channels] map that BN would read three times and write once is written once.
    The gradient is autodiff of this form (the conv bias gets exactly zero, its true gradient through
    BN). Against float64 on MNIST digits, He-normal and zero-mean kernels: variance within 9e-7
    relative (the two-pass variance of the computed map: 3e-7), mean within 2e-8 standard deviations.
    """
    n, h, w, _ = conv.x.shape
    taps = jnp.stack(_taps(conv.x)).reshape(9, n * h, w)  # [taps, image rows, columns]
    tap_mean = taps.mean((1, 2))
    centered = taps - tap_mean[:, None, None]
    # Summed row by row, then over the rows: one [9, P] x [P, 9] product (and XLA's reduction of the
    # elementwise products) lost ~1e-5 relative on MNIST digits, this form ~2e-7.
    cov = jnp.einsum("trw,srw->rts", centered, centered).mean(0) / w
    k = conv.kernel.reshape(9, -1)
    shift = (tap_mean[:, None] * k).sum(0)  # the map's mean minus the conv bias
    var = jnp.maximum(jnp.einsum("tf,ts,sf->f", k, cov, k), 0.0)
    gain = scale * jax.lax.rsqrt(var + epsilon)
    y = conv3x3_one_channel(conv.x, (k * gain).reshape(conv.kernel.shape), bias - shift * gain)
    return y, shift + conv.bias, var


class BatchNorm(nn.Module):
    """Batch normalization over every axis but the last, as torch.nn.BatchNorm1d/2d computes it.

    Train mode normalizes with the batch mean and the *biased* batch variance (both libraries do).
    The running averages move as running = momentum * running + (1 - momentum) * batch, so
    bnstudy's momentum 0.9 is PyTorch's momentum=0.1. What is averaged into the running variance is
    `running_var`:
      unbiased  the batch variance x n / (n - 1), n = values per channel (batch x positions): PyTorch's
                choice (torch.nn.BatchNorm2d docs: "the running sum of the variance is calculated via
                the unbiased estimator"), so the population variance is not underestimated at small n;
      biased    the batch variance itself: flax.linen.BatchNorm's choice (7/8 of PyTorch's at n = 8).
    Variables keep flax's names (params scale, bias; batch_stats mean, var; init 1, 0, 0, 1) so a
    checkpoint or metric that reads nn.BatchNorm reads this too. Variances are two-pass (mean of
    squared deviations), not E[x^2] - E[x]^2, to agree with PyTorch to float32 rounding.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    running_var: str = "unbiased"

    @nn.compact
    def __call__(self, x: jax.Array | OneChannelConv) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if self.use_running_average:
            x = computed(x)
            return (x - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon) * scale + bias
        if isinstance(x, OneChannelConv):
            y, mean, var = batch_norm_train_one_channel_conv(x, scale, bias, self.epsilon)
        else:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            n = math.prod(x.shape[:-1])
            if self.running_var == "unbiased":
                if n < 2:
                    raise ValueError(
                        f"BatchNorm with running_var='unbiased' needs at least 2 values per channel to "
                        f"estimate a variance; its input {x.shape} has {n}. Use a batch size >= 2 or "
                        f"running_var='biased' (PyTorch refuses this case too)."
                    )
                averaged = var * (n / (n - 1))
            elif self.running_var == "biased":
                averaged = var
            else:
                raise ValueError(f"unknown running_var {self.running_var!r}; expected one of {BN_RUNNING_VARS}")
            m = self.momentum
            running_mean.value = m * running_mean.value + (1.0 - m) * mean
            running_var.value = m * running_var.value + (1.0 - m) * averaged
        return y


def make_norm(
    kind: str, ndim: int, train: bool, momentum: float, epsilon: float, groups: int, running_var: str
) -> nn.Module:
    """The normalization layer of a block whose output has `ndim` axes, named by kind (`bn`, `ln`, `gn`).

    Layer and group norm normalize each example on its own, so train and inference mode are the same
    computation and there are no running statistics. Layer norm (Ba et al. 2016) pools every
    non-batch axis: channels and positions of a conv output, the features of a dense one; that is
    group norm with one group. Group norm (Wu & He 2018) splits the channels into `groups`
    contiguous groups and pools each over its channels and all positions; on a dense block's
    [N, features] output a group is `features / groups` contiguous features of one example. Both
    keep a learned scale and bias per channel and share BN's epsilon.
    """
    if kind == "batch":
        return BatchNorm(not train, momentum, epsilon, running_var, name="bn")
    if kind == "layer":
        # flax's LayerNorm pools only the last axis by default; here every axis but the batch.
        axes = tuple(range(1, ndim))
        return nn.LayerNorm(epsilon, reduction_axes=axes, use_fast_variance=False, name="ln")
    if kind == "group":
        return nn.GroupNorm(num_groups=groups, epsilon=epsilon, use_fast_variance=False, name="gn")
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")


class Block(nn.Module):
    """Wraps a layer's output in the norm/activation order given by `norm`, the norm's kind by `norm_kind`,
    and ends it with the 2x2 max-pool when `pool` is set."""

    norm: str
    bn_momentum: float
    bn_epsilon: float
    norm_kind: str = "batch"
    norm_groups: int = 8
    bn_running_var: str = "unbiased"
    pool: bool = False  # a 2x2 max-pool ends the block

    def _relu(self, h: jax.Array) -> jax.Array:
        out = nn.relu(h)
        # Per example and channel, the largest activation over positions: > 0 iff that unit fired there.
        self.sow(RELU_COLLECTION, "max", out.max(axis=tuple(range(1, out.ndim - 1))) if out.ndim > 2 else out)
        return out

    @nn.compact
    def __call__(self, h: jax.Array | OneChannelConv, train: bool) -> jax.Array:
        pool = max_pool_2x2 if self.pool else (lambda x: x)
        if not (self.norm == "before_relu" and self.norm_kind == "batch"):
            h = computed(h)  # only BN right after the layer takes a deferred convolution
        norm = None
        if self.norm != "none":
            norm = make_norm(
                self.norm_kind, h.ndim, train, self.bn_momentum, self.bn_epsilon, self.norm_groups, self.bn_running_var
            )
        if self.norm == "after_relu":
            return pool(norm(self._relu(h)))
        h = h if norm is None else norm(h)
        # ReLU and max commute exactly (values and gradients, ties included), so the ReLU runs on the
        # pooled quarter of the map; its per-unit maximum is the same wherever the windows tile the map.
        if self.pool and h.shape[1] % 2 == 0 and h.shape[2] % 2 == 0:
            return self._relu(pool(h))
        return pool(self._relu(h))


class _Net(nn.Module):
    """Conv blocks (each optionally followed by a 2x2 max-pool), dense blocks, then a classifier."""

    conv_blocks: Sequence[tuple[int, bool]]  # (channels, pool after the block)
    dense_widths: Sequence[int]
    num_classes: int
    norm: str
    dropout_placement: str
    bn_momentum: float
    bn_epsilon: float
    norm_kind: str = "batch"
    norm_groups: int = 8
    bn_running_var: str = "unbiased"

    @property
    def has_batch_norm(self) -> bool:
        """Whether the model keeps BN running statistics (a `batch_stats` collection), read from its
        settings instead of tracing its init."""
        return self.norm != "none" and self.norm_kind == "batch"

    def _block(self, h, name, train, pool=False):
        block = Block(
            self.norm,
            self.bn_momentum,
            self.bn_epsilon,
            self.norm_kind,
            self.norm_groups,
            self.bn_running_var,
            pool,
            name=f"{name}_norm",
        )
        return block(h, train)

    def block_names(self) -> tuple[str, ...]:
        return tuple(f"conv{i + 1}" for i in range(len(self.conv_blocks))) + tuple(
            f"dense{j + 1}" for j in range(len(self.dense_widths))
        )

    def weight_layers(self) -> tuple[str, ...]:
        """The layers with weights (kernel and bias), input to output: every block's layer, then the classifier."""
        return (*self.block_names(), "classifier")

    def param_order(self) -> tuple[str, ...]:
        """Top-level parameter groups in the order the input meets them: each layer, then its block's norm.

        (A params dict that went through jax.tree.map has its keys sorted, so the order lives here.)
        Groups a model does not have, e.g. `conv1_norm` with norm none, are simply absent from its params.
        """
        return (*(g for b in self.block_names() for g in (b, f"{b}_norm")), "classifier")

    def dropout_fed_blocks(self) -> tuple[str, ...]:
        """Blocks whose BN input lies downstream of a dropout: where Li et al.'s variance shift applies."""
        if self.norm == "none" or self.norm_kind != "batch" or self.dropout_placement != "after_block":
            return ()  # before_classifier dropout feeds only the classifier, which has no BN
        return self.block_names()[1:]

    @nn.compact
    def __call__(self, x, *, train: bool, dropout_rate=0.0, dropout_rng=None):
        n_blocks = len(self.conv_blocks) + len(self.dense_widths)
        rngs = [None] * n_blocks if dropout_rng is None else list(jax.random.split(dropout_rng, n_blocks))
        after_block = self.dropout_placement == "after_block"
        h = x
        for i, (channels, pool) in enumerate(self.conv_blocks):
            name = f"conv{i + 1}"
            h = self._block(Conv3x3(channels, name=name)(h, deferred=True), name, train, pool)
            if after_block:
                h = dropout(h, dropout_rate, rngs[i])
        h = h.reshape(h.shape[0], -1)
        for j, width in enumerate(self.dense_widths):
            name = f"dense{j + 1}"
            h = self._block(nn.Dense(width, kernel_init=HE_NORMAL, name=name)(h), name, train)
            is_last = j + 1 == len(self.dense_widths)
            if after_block or (is_last and self.dropout_placement == "before_classifier"):
                h = dropout(h, dropout_rate, rngs[len(self.conv_blocks) + j])
        return nn.Dense(self.num_classes, kernel_init=HE_NORMAL, name="classifier")(h)


def conv_blocks_from_layout(layout: Sequence[int | str]) -> tuple[tuple[int, bool], ...]:
    """(64, "M", 128, ...) -> ((64, True), (128, ...), ...): each conv with whether a pool follows it."""
    blocks = []
    for item in layout:
        if item == "M":
            blocks[-1] = (blocks[-1][0], True)
        else:
            blocks.append((int(item), False))
    return tuple(blocks)


def _layout(name: str, width: float) -> tuple[tuple[int | str, ...], tuple[int, ...]]:
    """(conv layout, dense widths) of model `name`."""
    if name == "cnn":
        return (32, "M", 64, "M"), (128,)
    layout = tuple(c if c == "M" else max(1, round(c * width)) for c in VGG11_LAYOUT)
    return layout, (max(1, round(512 * width)),)


def block_channels(name: str, width: float = 1.0) -> dict[str, int]:
    """{block: channels (conv) or features (dense)} of model `name`, input to output."""
    layout, dense_widths = _layout(name, width)
    convs = [c for c, _ in conv_blocks_from_layout(layout)]
    return {f"conv{i + 1}": c for i, c in enumerate(convs)} | {f"dense{j + 1}": w for j, w in enumerate(dense_widths)}


def norm_groups_problem(name: str, width: float, groups: int) -> str | None:
    """Why group norm with `groups` groups cannot be built for this model, or None if it can."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        return f"the number of groups must be an integer >= 1, got {groups!r}"
    channels = block_channels(name, width)
    bad = {block: c for block, c in channels.items() if c % groups}
    if bad:
        divisors = sorted(d for d in range(1, min(channels.values()) + 1) if all(c % d == 0 for c in channels.values()))
        return (
            f"{groups} groups do not divide the channels of block(s) {bad} (all channels: {channels}); "
            f"every block must split into equal groups, so choose one of {divisors}"
        )
    return None


def build_model(
    name: str,
    *,
    norm: str,
    num_classes: int,
    dropout_placement: str,
    bn_momentum: float,
    bn_epsilon: float,
    width: float,
    norm_kind: str,
    norm_groups: int,
    bn_running_var: str,
) -> nn.Module:
    """The model named `name` ("cnn" for MNIST, "vgg" for CIFAR-10) with the given norm placement and kind.

    No defaults: the app passes the config's values, whose defaults live in the schema (bnstudy/config.py).
    norm_groups is used by norm_kind "group" only.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if norm_kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {norm_kind!r}; expected one of {NORM_KINDS}")
    if bn_running_var not in BN_RUNNING_VARS:
        raise ValueError(f"unknown BN running variance {bn_running_var!r}; expected one of {BN_RUNNING_VARS}")
    if dropout_placement not in DROPOUT_PLACEMENTS:
        raise ValueError(f"unknown dropout placement {dropout_placement!r}; expected one of {DROPOUT_PLACEMENTS}")
    if norm_kind == "group" and (problem := norm_groups_problem(name, width, norm_groups)):
        raise ValueError(f"group norm for model {name!r}: {problem}")
    layout, dense_widths = _layout(name, width)
    return _Net(
        conv_blocks=conv_blocks_from_layout(layout),
        dense_widths=dense_widths,
        num_classes=num_classes,
        norm=norm,
        dropout_placement=dropout_placement,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        norm_kind=norm_kind,
        norm_groups=norm_groups,
        bn_running_var=bn_running_var,
    )
