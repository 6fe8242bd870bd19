"""The app's malloc settings: applied once on glibc, and they stop XLA:CPU's calls from faulting in fresh pages."""

import subprocess
import sys
import textwrap

import pytest

from bnstudy.perf import allocator

FAULTS_PER_CALL = """
import resource, sys
from bnstudy.perf import allocator
if sys.argv[1] == "on":
    print("applied", allocator.keep_freed_memory())
import jax, jax.numpy as jnp
# Two 32 MB intermediates that cannot fuse: XLA:CPU takes them as one temporary buffer per call, above
# the size (32 MB at most) that glibc's defaults ever serve from the heap, so it is mapped afresh each time.
f = jax.jit(lambda x: jnp.cumsum(jnp.cumsum(x, axis=0) * 0.5, axis=1).sum(axis=0))
x = jnp.ones((4096, 2048))
f = lambda f=f: f(x)
for _ in range(10):  # the heap grows to its working size (6 calls sufficed in every try on 2 cores, 3 did not)
    f().block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f().block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The fewest of any call: a page that another thread of the process faults in meanwhile (under load, a
# call's count rose from ~0 to ~3,400) is not the call's own.
print("faults", min(faults))
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
    # With glibc's defaults every call maps (and faults in) fresh pages, ~25,000 of them (100 MB) here;
    # with the settings even the call that faulted least would fault those in again.
    assert default > 4000
    assert kept < 0.05 * default
