"""Programs compiled with `jit_rare`'s lighter options give the bits the default compilation gives."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnstudy.core import engine
from bnstudy.core.evaluate import pack_permutation
from bnstudy.perf import xla_flags
from conftest import build_model, cnn_program, hparams, setup_of


def same_bits(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize(
    "setup, shape",
    [
        (cnn_program("before_relu"), (28, 28, 1)),
        pytest.param(
            setup_of(build_model("vgg", norm="after_relu", width=0.125), batch_size=8),
            (32, 32, 3),
            marks=pytest.mark.slow,  # ~20 s: the default compilation of VGG's initializers
        ),
    ],
    ids=["cnn", "vgg"],
)
def test_initial_states_of_a_pack_are_bit_identical_to_the_default_compilation(setup, shape):
    hp = hparams([{"seed": 3, "init_scale": 0.5}, {"seed": 7, "init_scale": 2.0, "lr": 0.3}])
    init = jax.vmap(partial(engine.init_state, setup, shape))
    assert same_bits(xla_flags.jit_rare(init)(hp), jax.jit(init)(hp))


def test_epoch_permutations_are_bit_identical_to_the_default_compilation():
    seeds = jnp.arange(4, dtype=jnp.int32)
    default = jax.jit(jax.vmap(engine.epoch_permutation, in_axes=(0, None, None)), static_argnums=2)
    assert same_bits(pack_permutation(8000)(seeds, jnp.int32(2)), default(seeds, 2, 8000))


def test_rare_programs_get_the_lighter_options_on_cpu_only():
    assert xla_flags.rare_program_options("cpu") == {"xla_backend_optimization_level": 1}
    assert xla_flags.rare_program_options("gpu") == {} and xla_flags.rare_program_options("tpu") == {}
