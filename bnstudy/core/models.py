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

The hand-written kernels these layers call (pooling, the one-channel conv, BN's train-mode forms) live
in bnstudy.core.kernels; this module is the architecture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnstudy.core import conv_forms, kernels
from bnstudy.schema import STANDARD_DEPTHS

NORMS = ("none", "before_relu", "after_relu")
NORM_KINDS = ("batch", "layer", "group")
BN_RUNNING_VARS = ("unbiased", "biased")
RELU_COLLECTION = "relu"
DROPOUT_PLACEMENTS = ("none", "after_block", "before_classifier")
MODELS = ("cnn", "vgg", "resnet")
PADDED_SIZE = 32  # vgg and resnet zero-pad smaller inputs (28x28 digits) to 32x32, centered

# He-normal on fan-in; the study's init scale multiplies these kernels afterwards (engine.scale_kernels).
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# VGG-11/13/16/19 (configurations A, B, D, E in Simonyan & Zisserman); "M" is a 2x2 max-pool.
VGG_LAYOUTS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", *(256,) * 4, "M", *(512,) * 4, "M", *(512,) * 4, "M"),
}
VGG11_LAYOUT = VGG_LAYOUTS[11]
CNN_WIDTH = 32  # the deep CNN's first stage; each pooled stage doubles it


class Conv3x3(nn.Module):
    """`nn.Conv(features, (3, 3), kernel_init=HE_NORMAL)`: the same parameters (`kernel` [3, 3, in, out],
    `bias`), initialization and function; a one-channel input takes `conv3x3_one_channel`, or with
    `deferred` is returned uncomputed (`OneChannelConv`) for the norm after it; any other takes
    `conv_forms.conv3x3`, each direction in the form measured fastest for its shape. With `strides` 2 it pads one
    row and column on each side, as PyTorch's `padding=1` does (XLA's SAME would pad only after)."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, deferred: bool = False) -> jax.Array | kernels.OneChannelConv:
        kernel = self.param("kernel", HE_NORMAL, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if x.shape[-1] == 1 and self.strides == 1:
            conv = kernels.OneChannelConv(x, kernel, bias)
            return conv if deferred else conv.output()
        return conv_forms.conv3x3(x, kernel, self.strides) + bias


def dropout(x: jax.Array, rate: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with a traced rate; identity when rng is None (eval) or rate == 0."""
    if rng is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep, 0.0)


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
    def __call__(self, x: jax.Array | kernels.OneChannelConv) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if self.use_running_average:
            x = kernels.computed(x)
            return (x - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon) * scale + bias
        if isinstance(x, kernels.OneChannelConv):
            y, mean, var = kernels.batch_norm_train_one_channel_conv(x, scale, bias, self.epsilon)
        else:
            y, mean, var = kernels.batch_norm_train(x, scale, bias, self.epsilon)
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
    and ends it with the 2x2 max-pool when `pool` is set.

    A `residual` (a residual block's shortcut) is added just before the ReLU: layer -> norm -> (+) -> ReLU
    (before_relu), layer -> (+) -> ReLU -> norm (after_relu), layer -> (+) -> ReLU (none)."""

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
    def __call__(
        self, h: jax.Array | kernels.OneChannelConv, train: bool, residual: jax.Array | None = None
    ) -> jax.Array:
        pool = kernels.max_pool_2x2 if self.pool else (lambda x: x)
        add = (lambda x: x) if residual is None else (lambda x: x + residual)
        if not (self.norm == "before_relu" and self.norm_kind == "batch"):
            h = kernels.computed(h)  # only BN right after the layer takes a deferred convolution
        norm = None
        if self.norm != "none":
            norm = make_norm(
                self.norm_kind, h.ndim, train, self.bn_momentum, self.bn_epsilon, self.norm_groups, self.bn_running_var
            )
        if self.norm == "after_relu":
            return pool(norm(self._relu(add(h))))
        h = add(h if norm is None else norm(h))
        # ReLU and max commute exactly (values and gradients, ties included), so the ReLU runs on the
        # pooled quarter of the map; its per-unit maximum is the same wherever the windows tile the map.
        if self.pool and h.shape[1] % 2 == 0 and h.shape[2] % 2 == 0:
            return self._relu(pool(h))
        return pool(self._relu(h))


def pad_input(x: jax.Array, size: int) -> jax.Array:
    """Zero-pad an NHWC batch smaller than size x size to size x size, centered (28 -> 32: 2 on each side).

    The padding is added after the input's normalization, so it is the dataset mean, the value a SAME
    convolution pads with too; inputs already that large pass unchanged."""
    pad_h, pad_w = max(0, size - x.shape[1]), max(0, size - x.shape[2])
    if not (pad_h or pad_w):
        return x
    return jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))


class NamedBlocks:
    """What the probes read of a model with blocks named by `block_names()` (each block's layer is the
    top-level params group `<block>`, its norm `<block>_norm`) and fields norm, norm_kind, dropout_placement."""

    @property
    def has_batch_norm(self) -> bool:
        """Whether the model keeps BN running statistics (a `batch_stats` collection), read from its
        settings instead of tracing its init."""
        return self.norm != "none" and self.norm_kind == "batch"

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


class _Net(NamedBlocks, nn.Module):
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
    pad_to: int = 0  # inputs smaller than pad_to x pad_to are zero-padded to it (pad_input); 0 = never

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

    @nn.compact
    def __call__(self, x, *, train: bool, dropout_rate=0.0, dropout_rng=None):
        n_blocks = len(self.conv_blocks) + len(self.dense_widths)
        rngs = [None] * n_blocks if dropout_rng is None else list(jax.random.split(dropout_rng, n_blocks))
        after_block = self.dropout_placement == "after_block"
        h = pad_input(x, self.pad_to) if self.pad_to else x
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


def cnn_layout(depth: int) -> tuple[int | str, ...]:
    """The deep CNN's conv layout: `depth` 3x3 conv blocks in pooled stages of CNN_WIDTH x 2^stage channels.

    One stage per two blocks, at least 2 (the depth-2 network is conv32-pool-conv64-pool) and at most 3
    (a 28x28 input is 3x3 after three pools); the later stages take the blocks left over. E.g. depth 6:
    32, 32, M, 64, 64, M, 128, 128, M."""
    stages = min(3, max(2, depth // 2))
    per_stage = [depth // stages + (s >= stages - depth % stages) for s in range(stages)]
    return tuple(item for s, n in enumerate(per_stage) for item in (*(CNN_WIDTH * 2**s,) * n, "M"))


def depth_problem(name: str, depth: int) -> str | None:
    """What depth model `name` takes, if `depth` is not one of them; None if it is."""
    if name == "cnn" and not (isinstance(depth, int) and depth >= 2):
        return "an integer >= 2 for model 'cnn' (its conv blocks)"
    if name == "vgg" and depth not in VGG_LAYOUTS:
        return f"one of {list(VGG_LAYOUTS)} for model 'vgg' (VGG-11/13/16/19)"
    if name == "resnet" and not (isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0):
        return "6n+2 for an integer n >= 1 for model 'resnet' (20, 32, 44, 56, 110, ...)"
    return None


def resolved_depth(name: str, depth: int | None) -> int:
    """`depth`, or model `name`'s standard depth when it is None; raises ValueError for a depth it lacks."""
    depth = STANDARD_DEPTHS[name] if depth is None else depth
    if problem := depth_problem(name, depth):
        raise ValueError(f"model {name!r} cannot have depth {depth!r}: the depth must be {problem}")
    return depth


def _layout(name: str, width: float, depth: int) -> tuple[tuple[int | str, ...], tuple[int, ...]]:
    """(conv layout, dense widths) of model `name` ("cnn" or "vgg")."""
    if name == "cnn":
        return cnn_layout(depth), (128,)
    layout = tuple(c if c == "M" else max(1, round(c * width)) for c in VGG_LAYOUTS[depth])
    return layout, (max(1, round(512 * width)),)


def block_channels(name: str, width: float = 1.0, depth: int | None = None) -> dict[str, int]:
    """{block: channels (conv) or features (dense)} of model `name`, input to output."""
    depth = resolved_depth(name, depth)
    if name == "resnet":
        from bnstudy.core import resnet  # resnet builds on this module's blocks

        return resnet.block_channels(depth)
    layout, dense_widths = _layout(name, width, depth)
    convs = [c for c, _ in conv_blocks_from_layout(layout)]
    return {f"conv{i + 1}": c for i, c in enumerate(convs)} | {f"dense{j + 1}": w for j, w in enumerate(dense_widths)}


def norm_groups_problem(name: str, width: float, groups: int, depth: int | None = None) -> str | None:
    """Why group norm with `groups` groups cannot be built for this model, or None if it can."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        return f"the number of groups must be an integer >= 1, got {groups!r}"
    channels = block_channels(name, width, depth)
    bad: dict[int, list[str]] = {}  # channel count -> the blocks of that width that `groups` does not divide
    for block, c in channels.items():
        if c % groups:
            bad.setdefault(c, []).append(block)
    if bad:
        divisors = sorted(d for d in range(1, min(channels.values()) + 1) if all(c % d == 0 for c in channels.values()))
        widths = ", ".join(f"{c} in {_first_and_count(blocks)}" for c, blocks in bad.items())
        return (
            f"{groups} groups do not divide the channels of {sum(map(len, bad.values()))} of {len(channels)} "
            f"blocks ({widths}); every block must split into equal groups, so choose one of {divisors}"
        )
    return None


def _first_and_count(blocks: list[str]) -> str:
    return blocks[0] if len(blocks) == 1 else f"{blocks[0]} and {len(blocks) - 1} more"


def _check_choices(name, norm, norm_kind, bn_running_var, dropout_placement) -> None:
    for value, choices, what in (
        (name, MODELS, "model"),
        (norm, NORMS, "norm"),
        (norm_kind, NORM_KINDS, "norm kind"),
        (bn_running_var, BN_RUNNING_VARS, "BN running variance"),
        (dropout_placement, DROPOUT_PLACEMENTS, "dropout placement"),
    ):
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}; expected one of {choices}")


def build_model(
    name: str,
    *,
    norm: str,
    num_classes: int,
    dropout_placement: str,
    bn_momentum: float,
    bn_epsilon: float,
    width: float,
    depth: int | None,
    norm_kind: str,
    norm_groups: int,
    bn_running_var: str,
) -> nn.Module:
    """The model named `name` ("cnn" for MNIST, "vgg" and "resnet" for CIFAR-10, both padding the digits to
    32x32) with the given depth (None: the model's standard one), norm placement and kind.

    No defaults: `bnstudy.core.from_config` passes the config's values, whose defaults live in bnstudy.schema.
    norm_groups is used by norm_kind "group" only; width by vgg only.
    """
    _check_choices(name, norm, norm_kind, bn_running_var, dropout_placement)
    depth = resolved_depth(name, depth)
    if norm_kind == "group" and (problem := norm_groups_problem(name, width, norm_groups, depth)):
        raise ValueError(f"group norm for model {name!r}: {problem}")
    common = dict(
        num_classes=num_classes,
        norm=norm,
        dropout_placement=dropout_placement,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        norm_kind=norm_kind,
        norm_groups=norm_groups,
        bn_running_var=bn_running_var,
    )
    if name == "resnet":
        from bnstudy.core import resnet

        return resnet.ResNet(depth=depth, **common)
    layout, dense_widths = _layout(name, width, depth)
    pad_to = PADDED_SIZE if name == "vgg" else 0
    return _Net(conv_blocks=conv_blocks_from_layout(layout), dense_widths=dense_widths, pad_to=pad_to, **common)
