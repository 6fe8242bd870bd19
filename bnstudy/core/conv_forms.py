"""A 3x3 convolution in several forms, each direction by the form measured fastest for its shape.

The convolution is bnstudy's `Conv3x3` without its bias: NHWC input, HWIO kernel, stride 1 with SAME padding or
stride 2 with one row and column of zeros on each side (PyTorch's `padding=1`). It has three directions, each of
which can take its own form:

    forward         out = conv(x, kernel)
    input gradient  dx  = the forward's transpose applied to the output gradient
    kernel gradient dk  = the correlation of x's 3x3 neighbourhoods with the output gradient

and four forms:

    xla     `lax.conv_general_dilated` and XLA's own transposes of it (what autodiff gives)
    im2col  the nine shifted views ("taps") side by side on the channel axis, [positions, 9 C], and one matrix
            product with the kernel as [9 C, O]; the input gradient is the output gradient's own patches times
            the flipped kernel (stride 1), or the patch gradient folded back onto the input (stride 2); the
            kernel gradient is patches^T . output gradient, one product contracting every position
    rows    im2col one kernel row at a time: three products of [positions, 3 C] patches, a third of the copy
    taps    nine products of a shifted view with one kernel tap [C, O], summed (the input gradient: each
            output gradient times a tap's transpose, placed back where that tap read)

All are the same function to float32 round-off (tests/test_conv_forms.py checks each against
`lax.conv_general_dilated` and its autodiff). XLA:CPU computes a many-channel convolution's kernel gradient as a
convolution over transposed copies of both operands (benchmarks/README.md, profile_step.py), and its dot emitter
is a different code path from its convolution emitter, so which form is fastest depends on the shape and the
direction; `benchmarks/conv_forms.py` measures them and writes the choice into bnstudy/core/conv_choice.py.
`conv3x3` takes the chosen forms; where every direction is `xla` it *is* `lax.conv_general_dilated` (no custom
gradient), so a shape left to XLA computes exactly what it computed before the forms existed.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnstudy.core import conv_choice

FORMS = ("xla", "im2col", "rows", "taps")
DIRECTIONS = ("forward", "input_grad", "kernel_grad")


class Forms(NamedTuple):
    """The form of each direction of one convolution."""

    forward: str = "xla"
    input_grad: str = "xla"
    kernel_grad: str = "xla"


XLA = Forms()


def padding(stride: int) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """SAME at stride 1; one row and column on each side at stride 2 (XLA's SAME would pad only after)."""
    return "SAME" if stride == 1 else ((1, 1), (1, 1))


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding(stride), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def taps(x: jax.Array, stride: int) -> list[jax.Array]:
    """The nine shifted, strided views of the one-padded input that the kernel's taps (row, column order) read:
    each [N, H_out, W_out, C]."""
    h, w = x.shape[1:3]
    ho, wo = out_size(h, stride), out_size(w, stride)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    return [padded[:, i : i + span_h : stride, j : j + span_w : stride] for i in range(3) for j in range(3)]


def row_patches(views: list[jax.Array], row: int) -> jax.Array:
    """The three views of kernel row `row` side by side on the channel axis: [N, H_out, W_out, 3 C]."""
    return jnp.concatenate(views[3 * row : 3 * row + 3], axis=-1)


def place(tap_grad: jax.Array, tap: int, in_hw: tuple[int, int], stride: int) -> jax.Array:
    """The gradient of one tap's view, [N, H_out, W_out, C], put back on the input grid [N, H, W, C]: zeros
    where that tap read nothing (a strided pad, which XLA fuses with the sum over taps)."""
    i, j = divmod(tap, 3)
    (h, w), (ho, wo) = in_hw, tap_grad.shape[1:3]
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    grid = jax.lax.pad(
        tap_grad,
        jnp.zeros((), tap_grad.dtype),
        ((0, 0, 0), (i, h + 2 - i - span_h, stride - 1), (j, w + 2 - j - span_w, stride - 1), (0, 0, 0)),
    )
    return grid[:, 1 : h + 1, 1 : w + 1]


def forward(x: jax.Array, kernel: jax.Array, stride: int, form: str) -> jax.Array:
    if form == "xla":
        return xla_conv(x, kernel, stride)
    views = taps(x, stride)
    if form == "im2col":
        return jnp.concatenate(views, axis=-1) @ kernel.reshape(-1, kernel.shape[-1])
    if form == "rows":
        return sum(row_patches(views, i) @ kernel[i].reshape(-1, kernel.shape[-1]) for i in range(3))
    if form == "taps":
        return sum(view @ kernel[t // 3, t % 3] for t, view in enumerate(views))
    raise ValueError(f"unknown convolution form {form!r}; expected one of {FORMS}")


def input_grad(x: jax.Array, kernel: jax.Array, dout: jax.Array, stride: int, form: str) -> jax.Array:
    if form == "xla":
        return jax.vjp(lambda x_: xla_conv(x_, kernel, stride), x)[1](dout)[0]
    in_hw = x.shape[1:3]
    c = kernel.shape[2]
    if form in ("im2col", "rows") and stride == 1:
        # dx[y, x] = sum over taps (i, j) of dout[y + 1 - i, x + 1 - j] . kernel[i, j]^T: a SAME convolution of
        # dout with the kernel flipped in space and transposed in channels.
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        if form == "im2col":
            return jnp.concatenate(taps(dout, 1), axis=-1) @ flipped.reshape(-1, c)
        views = taps(dout, 1)
        return sum(row_patches(views, i) @ flipped[i].reshape(-1, c) for i in range(3))
    if form == "im2col":
        patch_grad = dout @ kernel.reshape(-1, kernel.shape[-1]).T  # [N, H_out, W_out, 9 C]
        return sum(place(patch_grad[..., t * c : (t + 1) * c], t, in_hw, stride) for t in range(9))
    if form == "rows":
        row_grads = [dout @ kernel[i].reshape(-1, kernel.shape[-1]).T for i in range(3)]  # each [..., 3 C]
        return sum(place(row_grads[t // 3][..., (t % 3) * c : (t % 3 + 1) * c], t, in_hw, stride) for t in range(9))
    if form == "taps":
        return sum(place(dout @ kernel[t // 3, t % 3].T, t, in_hw, stride) for t in range(9))
    raise ValueError(f"unknown convolution form {form!r}; expected one of {FORMS}")


def kernel_grad(x: jax.Array, kernel: jax.Array, dout: jax.Array, stride: int, form: str) -> jax.Array:
    if form == "xla":
        return jax.vjp(lambda k: xla_conv(x, k, stride), kernel)[1](dout)[0]
    views = taps(x, stride)
    if form == "im2col":
        patches = jnp.concatenate(views, axis=-1)
        return jnp.einsum("nhwk,nhwo->ko", patches, dout).reshape(kernel.shape)
    if form == "rows":
        return jnp.stack([jnp.einsum("nhwk,nhwo->ko", row_patches(views, i), dout) for i in range(3)]).reshape(
            kernel.shape
        )
    if form == "taps":
        return jnp.stack([jnp.einsum("nhwc,nhwo->co", view, dout) for view in views]).reshape(kernel.shape)
    raise ValueError(f"unknown convolution form {form!r}; expected one of {FORMS}")


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def custom_conv3x3(x: jax.Array, kernel: jax.Array, stride: int, forms: Forms) -> jax.Array:
    """The convolution with each direction computed by its form in `forms`."""
    return forward(x, kernel, stride, forms.forward)


def _custom_fwd(x, kernel, stride, forms):
    return forward(x, kernel, stride, forms.forward), (x, kernel)


def _custom_bwd(stride, forms, residuals, dout):
    x, kernel = residuals
    return input_grad(x, kernel, dout, stride, forms.input_grad), kernel_grad(
        x, kernel, dout, stride, forms.kernel_grad
    )


custom_conv3x3.defvjp(_custom_fwd, _custom_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int = 1, forms: Forms | None = None) -> jax.Array:
    """The convolution, each direction by `forms` (default: `chosen_forms` for this shape on JAX's backend);
    `lax.conv_general_dilated` itself where every direction is `xla`."""
    forms = chosen_forms(x.shape, kernel.shape, stride) if forms is None else forms
    return xla_conv(x, kernel, stride) if forms == XLA else custom_conv3x3(x, kernel, stride, forms)


def shape_key(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int) -> str:
    """'HxWxC->O/s': how conv_choice names a convolution (its batch left out: the choice was measured at the
    deep studies' batch of 128 and stands for every batch)."""
    _, h, w, c = x_shape
    return f"{h}x{w}x{c}->{kernel_shape[-1]}/{stride}"


def chosen_forms(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int, backend: str | None = None):
    """The forms `conv_choice.CHOSEN` gives this shape on `backend` (default: JAX's); XLA for any shape or backend
    not measured, and for the shapes `conv_choice.PINNED` keeps as they are."""
    backend = jax.default_backend() if backend is None else backend
    key = shape_key(x_shape, kernel_shape, stride)
    if key in conv_choice.PINNED:
        return XLA
    return Forms(*conv_choice.CHOSEN.get(backend, {}).get(key, XLA))
