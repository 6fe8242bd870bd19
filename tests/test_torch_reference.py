"""The PyTorch reference the CPU benchmark times is bnstudy's CNN, and it trains."""

import pathlib
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_model


@pytest.fixture(scope="module")
def torch_reference():
    """benchmarks/torch_reference.py, imported when a test here first runs: importing torch at collection
    costs every worker ~3 s, whichever runs these tests."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import torch_reference  # found on the path set just above

    return torch_reference


def test_reference_has_bnstudys_parameter_shapes_layer_by_layer(torch_reference):
    net = build_model("cnn", norm="before_relu")
    # Shapes only: inferred, nothing compiled.
    variables = jax.eval_shape(partial(net.init, train=False), jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    ours = sorted(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    theirs = sorted(p.numel() for p in torch_reference.build_cnn().parameters())
    assert ours == theirs
    running = sorted(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["batch_stats"]))
    buffers = [b for n, b in torch_reference.build_cnn().named_buffers() if n.endswith(("running_mean", "running_var"))]
    assert running == sorted(b.numel() for b in buffers)


@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_loss_falls_on_generated_digits(torch_reference, channels_last):
    first, last = torch_reference.loss_falls(steps=12, batch_size=64, channels_last=channels_last)
    assert last < 0.5 * first
