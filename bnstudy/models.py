"""Flax CNNs whose normalization placement, dropout and init scale are the things under study.

Every hidden layer is a *block*: layer -> {BN -> ReLU | ReLU -> BN | ReLU}, chosen by `norm`.
BatchNorm layers live at `<block>_norm/bn` (e.g. `conv1_norm/bn`) so that metrics can report them
by their block name. The dropout rate is a call argument (a traced value), not a module field, so
runs with different rates share one compiled program.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("none", "before_relu", "after_relu")
DROPOUT_PLACEMENTS = ("none", "after_block", "before_classifier")
MODELS = ("cnn", "vgg")

# He-normal on fan-in; the study's init scale multiplies these kernels afterwards (engine.scale_kernels).
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# VGG-11 ("A" in Simonyan & Zisserman); "M" is a 2x2 max-pool.
VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _first_max_mask(windows: jax.Array, maxima: jax.Array) -> jax.Array:
    """True at the first input (row-major) of each 2x2 window that equals the window's maximum."""
    hits = windows == maxima[:, :, None, :, None]
    h00, h01, h10, h11 = hits[:, :, 0, :, 0], hits[:, :, 0, :, 1], hits[:, :, 1, :, 0], hits[:, :, 1, :, 1]
    first01 = h01 & ~h00
    first10 = h10 & ~(h00 | h01)
    first11 = h11 & ~(h00 | h01 | h10)
    return jnp.stack([jnp.stack([h00, first01], axis=3), jnp.stack([first10, first11], axis=3)], axis=2)


@jax.custom_jvp
def _window_max(windows: jax.Array) -> jax.Array:
    return windows.max(axis=(2, 4))


@_window_max.defjvp
def _window_max_jvp(primals, tangents):
    # The max passes on the tangent of the first maximal input only, as nn.max_pool's select_and_scatter
    # does; the transpose of this select is elementwise, so the backward fuses into loops.
    (windows,), (tangent,) = primals, tangents
    maxima = windows.max(axis=(2, 4))
    return maxima, jnp.where(_first_max_mask(windows, maxima), tangent, 0.0).sum(axis=(2, 4))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 over an NHWC batch: `nn.max_pool(x, (2, 2), strides=(2, 2))`, faster.

    A reshape and a max whose derivative is elementwise code, where `nn.max_pool`'s backward
    (select_and_scatter) was about a third of a CPU train step. Values and gradients equal
    `nn.max_pool`'s, ties included: where several inputs of a window share its maximum, the first in
    row-major order receives the window's whole gradient. An odd height or width drops its last row or
    column, as `nn.max_pool`'s VALID padding does.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return _window_max(x.reshape(b, h // 2, 2, w // 2, 2, c))


def dropout(x: jax.Array, rate: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with a traced rate; identity when rng is None (eval) or rate == 0."""
    if rng is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep, 0.0)


class Block(nn.Module):
    """Wraps a layer's output in the norm/activation order given by `norm`."""

    norm: str
    bn_momentum: float
    bn_epsilon: float

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> jax.Array:
        if self.norm == "none":
            return nn.relu(h)
        bn = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            name="bn",
        )
        if self.norm == "before_relu":
            return nn.relu(bn(h))
        return bn(nn.relu(h))


class _Net(nn.Module):
    """Conv blocks (each optionally followed by a 2x2 max-pool), dense blocks, then a classifier."""

    conv_blocks: Sequence[tuple[int, bool]]  # (channels, pool after the block)
    dense_widths: Sequence[int]
    num_classes: int
    norm: str
    dropout_placement: str
    bn_momentum: float
    bn_epsilon: float

    def _block(self, h, name, train):
        return Block(self.norm, self.bn_momentum, self.bn_epsilon, name=f"{name}_norm")(h, train)

    def block_names(self) -> tuple[str, ...]:
        return tuple(f"conv{i + 1}" for i in range(len(self.conv_blocks))) + tuple(
            f"dense{j + 1}" for j in range(len(self.dense_widths))
        )

    def dropout_fed_blocks(self) -> tuple[str, ...]:
        """Blocks whose BN input lies downstream of a dropout: where Li et al.'s variance shift applies."""
        if self.norm == "none" or self.dropout_placement != "after_block":
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
            h = self._block(nn.Conv(channels, (3, 3), kernel_init=HE_NORMAL, name=name)(h), name, train)
            if pool:
                h = max_pool_2x2(h)
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


def build_model(
    name: str,
    *,
    norm: str = "before_relu",
    num_classes: int = 10,
    dropout_placement: str = "none",
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
    width: float = 1.0,
) -> nn.Module:
    """The model named `name` ("cnn" for MNIST, "vgg" for CIFAR-10) with the given BN placement."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if dropout_placement not in DROPOUT_PLACEMENTS:
        raise ValueError(f"unknown dropout placement {dropout_placement!r}; expected one of {DROPOUT_PLACEMENTS}")
    if name == "cnn":
        layout, dense_widths = (32, "M", 64, "M"), (128,)
    else:
        layout = tuple(c if c == "M" else max(1, round(c * width)) for c in VGG11_LAYOUT)
        dense_widths = (max(1, round(512 * width)),)
    return _Net(
        conv_blocks=conv_blocks_from_layout(layout),
        dense_widths=dense_widths,
        num_classes=num_classes,
        norm=norm,
        dropout_placement=dropout_placement,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
    )

