"""The app's XLA flags are appended to the user's, never override them, and reach the compiler."""

import os
import subprocess
import sys

import pytest

from bnstudy.perf import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_flags_are_appended_after_the_users_own():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.add_xla_flags([FLAG], env) == f"--xla_force_host_platform_device_count=2 {FLAG}"
    assert xla_flags.add_xla_flags([FLAG], env) == f"--xla_force_host_platform_device_count=2 {FLAG}"  # once


def test_a_flag_the_user_set_wins():
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    assert xla_flags.add_xla_flags([FLAG], env) == "--xla_cpu_experimental_ynn_fusion_type="
    assert xla_flags.add_xla_flags([FLAG], {}) == FLAG


def test_no_flags_on_a_jaxlib_they_were_not_measured_on(monkeypatch):
    monkeypatch.setattr(xla_flags, "jaxlib_minor", lambda: (0, 4))
    env = {}
    assert xla_flags.add_xla_flags(environ=env) == "" and env == {}


CONV_HLO = """
from bnstudy.perf import xla_flags
xla_flags.add_xla_flags()
import jax, jax.numpy as jnp
conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print(conv.lower(jnp.ones((8, 14, 14, 32)), jnp.ones((3, 3, 32, 64))).compile().as_text())
"""


@pytest.mark.skipif(not xla_flags.speed_flags(), reason="no speed flags for this jaxlib")
def test_convolutions_leave_ynnpack_once_the_flags_are_set():
    env = {**os.environ, "XLA_FLAGS": ""}
    hlo = subprocess.run([sys.executable, "-c", CONV_HLO], env=env, capture_output=True, text=True, check=True).stdout
    assert "convolution(" in hlo and "__ynn_fusion" not in hlo
    default = subprocess.run(
        [sys.executable, "-c", CONV_HLO.replace("xla_flags.add_xla_flags()", "")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "__ynn_fusion" in default  # the flag is what moved the convolution


@pytest.mark.skipif(not xla_flags.speed_flags(), reason="no speed flags for this jaxlib")
def test_the_compiler_runs_with_the_elemental_emitter_once_the_flags_are_set(tmp_path):
    # XLA writes the options each program was compiled with beside its dump; the fusion emitters leave no
    # other trace in the compiled HLO.
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={tmp_path}"}
    subprocess.run([sys.executable, "-c", CONV_HLO], env=env, capture_output=True, text=True, check=True)
    (options,) = tmp_path.glob("*jit__lambda*.debug_options")
    assert "xla_cpu_use_fusion_emitters: false" in options.read_text()
