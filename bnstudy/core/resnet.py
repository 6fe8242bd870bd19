"""ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2), built from bnstudy.core.models' blocks.

A 3x3 conv stem of 16 channels, three stages of n basic blocks each (16, 32, 64 channels; the first
block of stages 2 and 3 halves the map with stride 2), global average pooling and the classifier:
ResNet-20 is n = 3. A basic block is two 3x3 conv blocks whose second adds the shortcut just before
its ReLU (models.Block with a residual), so the placement `norm` means, inside a residual block:

    before_relu  x -> conv -> norm -> ReLU -> conv -> norm -> (+ x) -> ReLU     (He et al.'s block)
    after_relu   x -> conv -> ReLU -> norm -> conv -> (+ x) -> ReLU -> norm
    none         x -> conv -> ReLU -> conv -> (+ x) -> ReLU

and the stem is conv -> {norm -> ReLU | ReLU -> norm | ReLU}; `norm_kind` picks BN, layer or group norm.
The shortcut is the paper's option A, parameter-free: the identity, and where a stage changes the shape,
the input subsampled by 2 and zero-padded with the new channels after the old ones. The convs keep a
bias as every model of bnstudy does, so with norm none they still have one: ResNet-20 on CIFAR-10 has
270,410 parameters (the paper's 0.27M; 269,722 without the 688 conv biases). Inputs smaller than
32x32 (the 28x28 digits) are zero-padded to 32x32 (models.pad_input).

Blocks, and so parameter groups and every probe's per-layer keys, are named `conv1` (the stem) and
`s<stage>b<block>_conv<1|2>` (e.g. `s2b1_conv2`), each with its norm in `<name>_norm`. Dropout
`after_block` follows the stem and every residual block; `before_classifier` the pooled features.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnstudy.core.models import HE_NORMAL, PADDED_SIZE, Block, Conv3x3, NamedBlocks, dropout, pad_input

STAGE_WIDTHS = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    """n of ResNet-(6n+2)."""
    return (depth - 2) // 6


def residual_blocks(depth: int) -> tuple[tuple[str, int, int], ...]:
    """(name prefix, channels, stride) of each residual block, input to output."""
    n = blocks_per_stage(depth)
    return tuple(
        (f"s{s + 1}b{b + 1}", width, 2 if s > 0 and b == 0 else 1)
        for s, width in enumerate(STAGE_WIDTHS)
        for b in range(n)
    )


def block_channels(depth: int) -> dict[str, int]:
    """{conv block: channels}, input to output."""
    out = {"conv1": STAGE_WIDTHS[0]}
    for prefix, width, _ in residual_blocks(depth):
        out |= {f"{prefix}_conv1": width, f"{prefix}_conv2": width}
    return out


def option_a_shortcut(x: jax.Array, channels: int, stride: int) -> jax.Array:
    """He et al.'s option A: the identity, or x subsampled by `stride` with zero channels appended."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    extra = channels - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))


class ResNet(NamedBlocks, nn.Module):
    """ResNet-`depth` (6n+2) with the given norm placement and kind; see the module docstring."""

    depth: int
    num_classes: int
    norm: str
    dropout_placement: str
    bn_momentum: float
    bn_epsilon: float
    norm_kind: str = "batch"
    norm_groups: int = 8
    bn_running_var: str = "unbiased"

    def block_names(self) -> tuple[str, ...]:
        return tuple(block_channels(self.depth))

    def _conv_block(self, h, name, channels, train, stride=1, residual=None):
        conv = Conv3x3(channels, stride, name=name)(h, deferred=residual is None and stride == 1)
        block = Block(
            self.norm,
            self.bn_momentum,
            self.bn_epsilon,
            self.norm_kind,
            self.norm_groups,
            self.bn_running_var,
            name=f"{name}_norm",
        )
        return block(conv, train, residual)

    @nn.compact
    def __call__(self, x, *, train: bool, dropout_rate=0.0, dropout_rng=None):
        blocks = residual_blocks(self.depth)
        n_drops = len(blocks) + 2  # the stem, each residual block, the pooled features
        rngs = [None] * n_drops if dropout_rng is None else list(jax.random.split(dropout_rng, n_drops))
        after_block = self.dropout_placement == "after_block"
        h = self._conv_block(pad_input(x, PADDED_SIZE), "conv1", STAGE_WIDTHS[0], train)
        if after_block:
            h = dropout(h, dropout_rate, rngs[0])
        for i, (prefix, channels, stride) in enumerate(blocks):
            inner = self._conv_block(h, f"{prefix}_conv1", channels, train, stride)
            shortcut = option_a_shortcut(h, channels, stride)
            h = self._conv_block(inner, f"{prefix}_conv2", channels, train, residual=shortcut)
            if after_block:
                h = dropout(h, dropout_rate, rngs[i + 1])
        h = h.mean(axis=(1, 2))  # global average pooling
        if self.dropout_placement == "before_classifier":
            h = dropout(h, dropout_rate, rngs[-1])
        return nn.Dense(self.num_classes, kernel_init=HE_NORMAL, name="classifier")(h)
