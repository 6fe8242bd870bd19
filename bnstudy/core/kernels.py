"""Hand-written fast kernels of the models: same functions as the plain forms, faster on XLA:CPU.

`max_pool_2x2` (the pooling tree), `conv3x3_one_channel` (a one-channel 3x3 conv as a 9-tap stencil
with its own gradient), `batch_norm_train` (train-mode BN with its closed-form VJP) and
`batch_norm_train_one_channel_conv` (BN folded into the first conv's stencil). bnstudy.core.models
calls them through this module's namespace (`kernels.name`), so a benchmark can swap one for its plain
form by assigning the attribute here; tests/test_norms.py and tests/test_models.py check each against
autodiff of the formula, flax and torch.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnstudy.core import conv_forms


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 over an NHWC batch: `nn.max_pool(x, (2, 2), strides=(2, 2))`, faster.

    The maximum of each window's four corners, as three elementwise `maximum`s of strided views, so
    that value and derivative are each one loop fusion: `nn.max_pool`'s backward (select_and_scatter)
    is a slow scatter on CPU, and a reshape + `max` reduction's backward counts ties by an extra
    reduction (benchmarks/step_vs_torch.py has both as lever rows). Values equal `nn.max_pool`'s; so do gradients
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
    return conv_forms.taps(x, 1)


@jax.custom_vjp
def conv3x3_one_channel(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A 3x3 SAME convolution of a one-channel NHWC batch plus bias, as nine broadcast multiply-adds.

    XLA:CPU's convolution kernels are slow at one input channel (MNIST's first layer); this is one
    loop over the output. The kernel gradient is one matrix product of the 9 taps with the output
    gradient, rather than XLA's convolution-shaped one; the input gradient is the transposed stencil.
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
    Autodiff of the two-pass variance reads the activation some six times more in the backward pass,
    and on CPU a BN step is memory-bound (benchmarks/step_vs_torch.py has the autodiff form as a lever row).
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
