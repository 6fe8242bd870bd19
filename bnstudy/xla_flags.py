"""XLA compiler flags bnstudy's app sets for speed, added to XLA_FLAGS before JAX starts its backend.

XLA reads XLA_FLAGS once, when JAX first initializes a backend, so `add_xla_flags()` must run before
any JAX computation (the app's entry point calls it first thing). A flag the user already set in
XLA_FLAGS wins: only flags not named there are appended.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping
from importlib import metadata

# Convolutions through XLA's own (Eigen) kernels instead of YNNPACK's, which jaxlib 0.10 picks by default;
# YNNPACK keeps the reductions, where it is faster. MNIST CNN train step on a 2-core AVX-512 CPU: 47 -> 36 ms
# with one call per step, 34 -> 24 ms with chunks of 4 steps.
CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
# An unknown flag aborts XLA, and experimental flags come and go: set them only on the jaxlib minor
# versions they were measured on.
MEASURED_JAXLIB_MINOR = ((0, 10),)


def flag_name(flag: str) -> str:
    """'--xla_foo=1' -> 'xla_foo'."""
    return flag.lstrip("-").split("=", 1)[0]


def jaxlib_minor() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, read without importing it; None if not installed."""
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
    except (metadata.PackageNotFoundError, ValueError):
        return None
    return int(major), int(minor)


def speed_flags() -> tuple[str, ...]:
    """The flags to set on this installation: CPU_FLAGS on the jaxlib versions they were measured on."""
    return CPU_FLAGS if jaxlib_minor() in MEASURED_JAXLIB_MINOR else ()


def add_xla_flags(flags: Iterable[str] | None = None, environ: MutableMapping[str, str] = os.environ) -> str:
    """Append each of `flags` (default: `speed_flags()`) to environ["XLA_FLAGS"] unless a flag of that
    name is already there; returns the resulting XLA_FLAGS."""
    current = environ.get("XLA_FLAGS", "").split()
    present = {flag_name(f) for f in current}
    added = [f for f in (speed_flags() if flags is None else flags) if flag_name(f) not in present]
    if added:
        environ["XLA_FLAGS"] = " ".join(current + added)
    return environ.get("XLA_FLAGS", "")
