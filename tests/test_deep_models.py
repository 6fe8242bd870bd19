"""The deep models: the deep CNN (model.depth), ResNet-(6n+2) and VGG on the digits; their shapes and parameter
counts, the norm placement inside a residual block against a hand-built one, the depth's validation and run
identity, and the trainer's packs, probes and resume on each of them."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnstudy.app import config as config_lib
from bnstudy.app import runs
from bnstudy.core import models, resnet, trainer
from conftest import build_model, hparams, init_variables, make_arrays, normal, schedule, setup_of


def shapes(net, x_shape):
    """The variables' shapes of `net` on inputs of `x_shape`: inferred, nothing compiled."""
    return jax.eval_shape(partial(net.init, train=False), jax.random.key(0), jnp.zeros(x_shape))


def count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- architecture


def test_depth_2_cnn_is_the_default_cnn_module_for_module():
    assert build_model("cnn", depth=2) == build_model("cnn", depth=None)
    assert models.cnn_layout(2) == (32, "M", 64, "M")


@pytest.mark.parametrize(
    ("depth", "layout"),
    [
        (3, (32, "M", 64, 64, "M")),
        (4, (32, 32, "M", 64, 64, "M")),
        (6, (32, 32, "M", 64, 64, "M", 128, 128, "M")),
        (9, (32, 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M")),
    ],
)
def test_deep_cnn_layout_doubles_the_width_at_each_pool(depth, layout):
    assert models.cnn_layout(depth) == layout
    net = build_model("cnn", depth=depth)
    params = shapes(net, (2, 28, 28, 1))["params"]
    assert net.block_names() == (*(f"conv{i + 1}" for i in range(depth)), "dense1")
    flat = 128 * 3 * 3 if depth >= 6 else 64 * 7 * 7  # 28 -> 14 -> 7 (-> 3)
    assert params["dense1"]["kernel"].shape == (flat, 128)
    assert params[f"conv{depth}"]["kernel"].shape[-1] == layout[-2]


def test_resnet20_has_the_papers_shapes_and_0_27m_parameters():
    net = build_model("resnet")
    variables = shapes(net, (2, 32, 32, 3))
    params = variables["params"]
    # He et al.'s 269,722 (0.27M) plus the conv biases every bnstudy model keeps: 16 + 6 * (16 + 32 + 64).
    assert count(params) == 269_722 + 688
    assert len([k for k in params if not k.endswith("_norm")]) == 20  # 19 convs and the classifier
    assert params["s1b1_conv1"]["kernel"].shape == (3, 3, 16, 16)
    assert params["s2b1_conv1"]["kernel"].shape == (3, 3, 16, 32)  # option A: no projection parameters
    assert params["s3b3_conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert params["classifier"]["kernel"].shape == (64, 10)
    assert set(variables["batch_stats"]) == {f"{b}_norm" for b in net.block_names()}
    out = jax.eval_shape(partial(net.apply, train=False), variables, jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("depth", [32, 56])
def test_resnet_depth_is_6n_plus_2_weight_layers(depth):
    net = build_model("resnet", depth=depth)
    params = shapes(net, (1, 28, 28, 1))["params"]
    assert len(net.weight_layers()) == depth == len([k for k in params if not k.endswith("_norm")])
    n = (depth - 2) // 6
    assert f"s3b{n}_conv2" in params and f"s3b{n + 1}_conv1" not in params


def test_vgg_trains_on_the_digits_padded_to_32x32():
    net = build_model("vgg", width=0.125)
    variables = shapes(net, (2, 28, 28, 1))  # 28 -> 0 after five pools without the padding
    assert variables["params"]["dense1"]["kernel"].shape == (64, 64)  # 1x1 after five pools of 32x32
    assert models.pad_input(jnp.ones((1, 28, 28, 1)), 32).shape == (1, 32, 32, 1)
    assert float(models.pad_input(jnp.ones((1, 28, 28, 1)), 32)[0, :2].sum()) == 0.0


@pytest.mark.parametrize(("kind", "tag"), [("layer", "ln"), ("group", "gn")])
def test_resnet_takes_every_norm_kind(kind, tag):
    variables = shapes(build_model("resnet", depth=8, norm_kind=kind), (1, 28, 28, 1))
    assert "batch_stats" not in variables
    assert set(variables["params"]["s2b1_conv2_norm"]) == {tag}


# --------------------------------------------------------------------------- the block against a hand-built one


def _bn(h):
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    return (h - mean) / jnp.sqrt(var + 1e-5)  # scale 1, bias 0 at init


def _conv(h, p, stride=1):
    pad = "SAME" if stride == 1 else ((1, 1), (1, 1))
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(h, p["kernel"], (stride, stride), pad, dimension_numbers=dims) + p["bias"]


def hand_built_resnet8(params, x, norm):
    """ResNet-8 in train mode written out layer by layer: the placements as the docstring of resnet.py states."""
    relu = jax.nn.relu

    def unit(h, p, residual=0.0):  # layer -> {norm -> (+) -> ReLU | (+) -> ReLU -> norm | (+) -> ReLU}
        if norm == "before_relu":
            return relu(_bn(h) + residual)
        if norm == "after_relu":
            return _bn(relu(h + residual))
        return relu(h + residual)

    h = unit(_conv(x, params["conv1"]), None)
    for prefix, channels, stride in resnet.residual_blocks(8):
        inner = unit(_conv(h, params[f"{prefix}_conv1"], stride), None)
        shortcut = h[:, ::stride, ::stride, :]
        shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, channels - shortcut.shape[-1])))
        h = unit(_conv(inner, params[f"{prefix}_conv2"]), None, shortcut)
    c = params["classifier"]
    return h.mean((1, 2)) @ c["kernel"] + c["bias"]


@pytest.mark.parametrize("norm", ["before_relu", "after_relu", "none"])
def test_residual_block_placements_match_a_hand_built_resnet(norm):
    net = build_model("resnet", depth=8, norm=norm)
    x = normal(3, (4, 32, 32, 3))
    variables = init_variables(net, jax.random.key(1), x, train=False)
    out, _ = jax.jit(partial(net.apply, train=True, mutable=["batch_stats"]))(variables, x)
    expected = jax.jit(partial(hand_built_resnet8, norm=norm))(variables["params"], x)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


# --------------------------------------------------------------------------- config: validation and identity

DIGITS = {"dataset": {"name": "mnist_t10k"}}


@pytest.mark.parametrize(
    ("name", "depth", "expected"), [("resnet", 21, "6n+2"), ("cnn", 1, "integer >= 2"), ("vgg", 12, "11, 13, 16, 19")]
)
def test_an_invalid_depth_is_a_config_error_naming_the_key(name, depth, expected):
    with pytest.raises(config_lib.ConfigError, match=r"`model\.depth`") as err:
        config_lib.parse({**DIGITS, "model": {"name": name, "depth": depth}})
    assert expected in str(err.value) and f"got {depth}" in str(err.value)


def test_a_depth_list_is_refused_as_a_structural_key():
    with pytest.raises(config_lib.ConfigError, match="multirun"):
        config_lib.parse({**DIGITS, "model": {"name": "cnn", "depth": [2, 4]}})


# The default run's hash before model.depth existed: ids written then must name the same runs now.
DEFAULT_RUN_HASH = "e6413c77"


def test_the_standard_depth_keeps_the_run_ids_from_before_the_key():
    default = config_lib.parse(DIGITS)
    assert runs.config_hash(default) == DEFAULT_RUN_HASH
    same = config_lib.parse({**DIGITS, "model": {"depth": 2}})
    assert runs.run_id(same) == runs.run_id(default)
    deeper = config_lib.parse({**DIGITS, "model": {"depth": 4}})
    assert runs.config_hash(deeper) != DEFAULT_RUN_HASH
    assert runs.run_name(default) == runs.run_name(same) == "mnist_t10k-cnn-before_relu-lr0.1-bs128-s0"
    assert runs.run_name(deeper) == "mnist_t10k-cnn4-before_relu-lr0.1-bs128-s0"  # the depth in the name
    res = [config_lib.parse({**DIGITS, "model": {"name": "resnet", "depth": d}}) for d in (None, 20, 32)]
    assert runs.config_hash(res[0]) == runs.config_hash(res[1]) != runs.config_hash(res[2])
    assert [runs.run_name(r).split("-")[1] for r in res] == ["resnet", "resnet", "resnet32"]


# --------------------------------------------------------------------------- the trainer on every model

PROBED = schedule(
    epochs=1,
    log_every=1,
    max_steps_per_epoch=2,
    eval_batch_size=32,
    ics_every=1,
    probe_every=1,
    dead_units=True,
    discrepancy=True,
    population_batches=1,
    discrepancy_train_subset=16,
)
SMALL_MODELS = {
    "cnn3": dict(name="cnn", depth=3),
    "resnet8": dict(name="resnet", depth=8),
    "vgg": dict(name="vgg", width=1 / 16),
}


def _train(kw, rows, sched=PROBED, **train_kw):
    data = make_arrays(n_train=64, n_test=32, shape=(12, 12, 1))
    setup = setup_of(build_model(kw["name"], **{k: v for k, v in kw.items() if k != "name"}), batch_size=16)
    logs = []
    result = trainer.PackTrainer(setup, data, sched).train(hparams(rows), lambda s, e, m: logs.append(m), **train_kw)
    return setup.model, result, logs


@pytest.mark.slow  # a pack and one model alone, with every probe, for three models: minutes on 2 cores
@pytest.mark.parametrize("model", list(SMALL_MODELS))
def test_a_pack_with_every_probe_equals_each_model_alone(model):
    rows = [{"lr": 0.02, "seed": 0}, {"lr": 0.05, "seed": 1, "init_scale": 0.5}]
    net, packed, _ = _train(SMALL_MODELS[model], rows)
    blocks = net.block_names()
    keys = set(packed.final)
    assert {f"ics/{b}/l2" for b in (*blocks, "classifier")} <= keys
    assert {f"relu/{b}/dead_frac" for b in blocks} <= keys
    assert any(k.startswith("smooth/") for k in keys) and "disc/kl" in keys
    _, alone, _ = _train(SMALL_MODELS[model], rows[1:])  # the second member: its own lr, seed and init scale
    for key in ("test/loss", "disc/kl", f"ics/{blocks[-1]}/l2", f"relu/{blocks[0]}/dead_frac"):
        np.testing.assert_allclose(packed.final[key][1], alone.final[key][0], rtol=1e-3, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("model", ["resnet8", "cnn3"])
def test_training_resumes_from_an_epoch_end_state_on_deep_models(model):
    sched = schedule(epochs=2, log_every=1, max_steps_per_epoch=2, eval_batch_size=32)
    saved = {}

    def keep(state, epoch):
        saved.setdefault(epoch, jax.device_get(state))

    _, whole, _ = _train(SMALL_MODELS[model], [{"seed": 4}], sched, on_epoch_end=keep)
    _, resumed, _ = _train(SMALL_MODELS[model], [{"seed": 4}], sched, state=jax.device_put(saved[0]), start_epoch=1)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("lr", [0.1, 1e4])
def test_a_resnet_without_norm_ends_done_or_diverged(lr):
    sched = schedule(epochs=1, log_every=1, max_steps_per_epoch=3, eval_batch_size=32)
    _, result, _ = _train({"name": "resnet", "depth": 20, "norm": "none"}, [{"lr": lr}], sched)
    status = trainer.summarize_final(result)[0]["status"]
    assert status == ("done" if lr < 1 else "diverged")


# --------------------------------------------------------------------------- the PyTorch references of the benchmark


@pytest.mark.parametrize(("name", "depth", "trained_depth"), [("cnn", 6, 3), ("resnet", 20, 8)])
def test_torch_reference_has_the_deep_models_parameter_shapes_and_its_loss_falls(name, depth, trained_depth):
    pytest.importorskip("torch")
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import torch_reference  # found on the path set just above

    variables = shapes(build_model(name, depth=depth), (1, 28, 28, 1))
    ours = sorted(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    theirs = sorted(p.numel() for p in torch_reference.build(name, depth).parameters())
    assert ours == theirs
    # The loss check on a shallower member of the same family: the same layers, a fraction of the CPU time.
    first, last = torch_reference.loss_falls(steps=12, batch_size=32, model=name, depth=trained_depth)
    assert last < first
