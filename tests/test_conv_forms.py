"""The 3x3 convolution's forms (bnstudy.core.conv_forms): each direction of each form against
`lax.conv_general_dilated` and its autodiff, the custom gradient that mixes them, the per-shape choice, and the
2-conv CNN computing exactly what it computed before the forms existed."""

from __future__ import annotations

import ast

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnstudy.core import conv_choice, conv_forms
from conftest import build_model

# (N, H, W, C, O, stride): both strides, odd and even sizes, a one-pixel output.
SHAPES = [(2, 6, 6, 3, 4, 1), (2, 6, 6, 3, 4, 2), (3, 5, 7, 2, 3, 2), (2, 8, 8, 4, 5, 1), (1, 1, 1, 2, 2, 2)]


def operands(n, h, w, c, o, stride, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, c, o)), jnp.float32)
    out_shape = conv_forms.xla_conv(x, kernel, stride).shape
    return x, kernel, jnp.asarray(rng.normal(size=out_shape), jnp.float32)


def float32_roundoff(a, b, terms: int):
    """Two float32 sums of `terms` products of unit-scale numbers agree to a few ulps of their scale."""
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=8 * np.finfo(np.float32).eps * terms)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", conv_forms.FORMS)
def test_each_direction_of_each_form_is_xlas_convolution_and_its_autodiff(shape, form):
    n, h, w, c, o, stride = shape
    x, kernel, dout = operands(*shape)
    ref, vjp = jax.vjp(
        lambda x_, k_: jax.lax.conv_general_dilated(
            x_,
            k_,
            (stride, stride),
            "SAME" if stride == 1 else ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
        x,
        kernel,
    )
    ref_dx, ref_dk = vjp(dout)
    float32_roundoff(conv_forms.forward(x, kernel, stride, form), ref, 9 * c)
    float32_roundoff(conv_forms.input_grad(x, kernel, dout, stride, form), ref_dx, 9 * o)
    float32_roundoff(conv_forms.kernel_grad(x, kernel, dout, stride, form), ref_dk, n * h * w)


def test_an_unknown_form_is_refused_by_name():
    x, kernel, dout = operands(*SHAPES[0])
    for call in (
        lambda: conv_forms.forward(x, kernel, 1, "winograd"),
        lambda: conv_forms.input_grad(x, kernel, dout, 1, "winograd"),
        lambda: conv_forms.kernel_grad(x, kernel, dout, 1, "winograd"),
    ):
        with pytest.raises(ValueError, match="'winograd'.*xla"):
            call()


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_forms_have_autodiffs_gradients_also_under_vmap(stride):
    x, kernel, _ = operands(2, 8, 8, 4, 5, stride)
    forms = conv_forms.Forms("im2col", "taps", "im2col")

    def loss(conv, x_, k_):
        return jnp.sum(jnp.sin(conv(x_, k_)))

    ref = jax.grad(lambda *a: loss(lambda x_, k_: conv_forms.xla_conv(x_, k_, stride), *a), (0, 1))(x, kernel)
    got = jax.grad(lambda *a: loss(lambda x_, k_: conv_forms.conv3x3(x_, k_, stride, forms), *a), (0, 1))(x, kernel)
    for g, r in zip(got, ref):
        float32_roundoff(g, r, 2 * 8 * 8)
    # A pack of models: the kernel batched, the custom gradient vmapped.
    kernels = jnp.stack([kernel, 2 * kernel])
    packed = jax.vmap(jax.grad(lambda k_: loss(lambda x_, kk: conv_forms.conv3x3(x_, kk, stride, forms), x, k_)))(
        kernels
    )
    for i, k in enumerate(kernels):
        alone = jax.grad(lambda k_: loss(lambda x_, kk: conv_forms.xla_conv(x_, kk, stride), x, k_))(k)
        float32_roundoff(packed[i], alone, 2 * 8 * 8 * 2)


def test_a_shape_left_to_xla_is_xlas_convolution_itself_with_no_custom_gradient():
    x, kernel, _ = operands(2, 8, 8, 4, 5, 1)
    jaxpr = jax.make_jaxpr(lambda x_, k_: conv_forms.conv3x3(x_, k_, 1, conv_forms.XLA))(x, kernel)
    plain = jax.make_jaxpr(lambda x_, k_: conv_forms.xla_conv(x_, k_, 1))(x, kernel)
    assert str(jaxpr) == str(plain) and "custom_vjp" not in str(jaxpr)


def test_the_choice_is_xla_where_pinned_unmeasured_or_on_another_backend(monkeypatch):
    monkeypatch.setattr(conv_choice, "CHOSEN", {"cpu": {"8x8x64->64/1": ("im2col", "taps", "xla")}})
    assert conv_forms.chosen_forms((128, 8, 8, 64), (3, 3, 64, 64), 1, "cpu") == ("im2col", "taps", "xla")
    assert conv_forms.chosen_forms((2, 8, 8, 64), (3, 3, 64, 64), 1, "cpu") == ("im2col", "taps", "xla")  # any batch
    assert conv_forms.chosen_forms((128, 8, 8, 64), (3, 3, 64, 64), 1, "gpu") == conv_forms.XLA
    assert conv_forms.chosen_forms((128, 8, 8, 64), (3, 3, 64, 64), 2, "cpu") == conv_forms.XLA
    monkeypatch.setattr(conv_choice, "CHOSEN", {"cpu": {"14x14x32->64/1": ("im2col", "taps", "taps")}})
    assert conv_forms.chosen_forms((128, 14, 14, 32), (3, 3, 32, 64), 1, "cpu") == conv_forms.XLA  # pinned


def test_the_checked_in_choice_names_known_forms_and_well_formed_shapes():
    for backend, table in conv_choice.CHOSEN.items():
        assert isinstance(backend, str)
        for key, forms in table.items():
            head, stride = key.split("/")
            h, w, rest = head.split("x")
            c, o = rest.split("->")
            assert all(int(v) > 0 for v in (h, w, c, o)) and stride in ("1", "2"), key
            assert len(forms) == 3 and set(forms) <= set(conv_forms.FORMS) and key not in conv_choice.PINNED, key
    assert ast.parse(open(conv_choice.__file__).read())  # the benchmark rewrites it: it must stay Python


def cnn_step_outputs(model, images, labels):
    """Loss and gradients of one train-mode step of `model` (fresh init) on `images`."""
    variables = model.init(jax.random.key(0), images, train=True)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    return jax.value_and_grad(loss)(variables["params"])


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)], ids=["mnist", "cifar10"])
def test_the_2_conv_cnn_never_takes_a_custom_form_so_its_numbers_stay_bit_for_bit(monkeypatch, image_shape):
    """Whatever the table says of other shapes (here: every shape to the custom forms), the 2-conv CNN's
    convolutions are XLA's: the same program, so the same numbers, as before the forms existed."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(8, *image_shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 8))
    model = build_model("cnn", num_classes=10)
    before = cnn_step_outputs(model, images, labels)

    everything_custom = conv_forms.Forms("im2col", "taps", "im2col")
    monkeypatch.setattr(
        conv_forms, "custom_conv3x3", lambda *a: pytest.fail("the 2-conv CNN took a custom convolution form")
    )
    monkeypatch.setattr(conv_choice, "CHOSEN", {jax.default_backend(): {}})
    monkeypatch.setattr(
        conv_forms,
        "chosen_forms",
        lambda x_shape, k_shape, stride, backend=None: (
            conv_forms.XLA
            if conv_forms.shape_key(x_shape, k_shape, stride) in conv_choice.PINNED
            else everything_custom
        ),
    )
    after = cnn_step_outputs(model, images, labels)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), before, after))


def test_a_deep_network_with_custom_forms_matches_xlas_to_roundoff(monkeypatch):
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(4, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 4))
    model = build_model("resnet", depth=8)
    monkeypatch.setattr(conv_forms, "chosen_forms", lambda *a, **k: conv_forms.XLA)
    ref_loss, ref_grads = cnn_step_outputs(model, images, labels)
    monkeypatch.setattr(conv_forms, "chosen_forms", lambda *a, **k: conv_forms.Forms("taps", "im2col", "im2col"))
    loss, grads = cnn_step_outputs(model, images, labels)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-3, atol=1e-4 * float(jnp.abs(r).max()) + 1e-7)
