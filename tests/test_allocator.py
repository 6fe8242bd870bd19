"""The app's malloc settings: applied once on glibc, and they stop XLA:CPU's calls from faulting in fresh pages."""

import subprocess
import sys
import textwrap

import pytest

from bnstudy import allocator

FAULTS_PER_CALL = """
import resource, sys
from bnstudy import allocator
if sys.argv[1] == "on":
    print("applied", allocator.keep_freed_memory())
import jax, jax.numpy as jnp
def loss(w, x):  # a conv layer's gradient: 6 MB activations, in buffers taken afresh at each call
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.square(jax.nn.relu(y) - 0.5).mean()
grad = jax.jit(jax.grad(loss))
w, x = jnp.ones((3, 3, 8, 32)) * 0.1, jnp.ones((64, 28, 28, 8))
f = lambda: grad(w, x)
for _ in range(3):
    f().block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f().block_until_ready()
print("faults", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_call(setting: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FAULTS_PER_CALL), setting],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return float(next(line for line in out.splitlines() if line.startswith("faults")).split()[1])


glibc = pytest.mark.skipif(allocator._mallopt() is None, reason="needs glibc's mallopt (Linux)")


@glibc
def test_settings_are_applied_once_and_reported():
    first = allocator.keep_freed_memory()
    assert first == {name: value for name, (_, value) in allocator.SETTINGS.items()}
    assert allocator.keep_freed_memory() is first and allocator.applied() == first


@glibc
def test_with_the_settings_a_repeated_call_reuses_its_pages():
    default, kept = faults_per_call("off"), faults_per_call("on")
    # With glibc's defaults the call maps (and faults in) fresh pages every time: ~1000 of them here.
    assert default > 300
    assert kept < 0.05 * default
