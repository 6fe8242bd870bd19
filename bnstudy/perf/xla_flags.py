"""XLA compiler settings bnstudy sets for speed: process flags, and options for rarely run programs.

XLA reads XLA_FLAGS once, when JAX first initializes a backend, so `add_xla_flags()` must run before
any JAX computation (the app's entry point calls it first thing). A flag the user already set in
XLA_FLAGS wins: only flags not named there are appended.

`jit_rare` jits a program that runs once per pack or per epoch (the initial state, the epoch's order)
with a lighter LLVM pipeline on CPU: those programs cost more to compile than they ever run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping
from importlib import metadata

CPU_FLAGS: tuple[str, ...] = (
    # Convolutions through XLA's own (Eigen) kernels instead of YNNPACK's, which jaxlib 0.10 picks by default:
    # the MNIST CNN's train step runs faster with them on CPU. YNNPACK keeps the reductions, where it is faster.
    # (Measured: benchmarks/README.md, the XLA-flag levers.)
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    # Fused elementwise kernels from XLA's elemental LLVM emitter instead of its MLIR fusion emitters: the same
    # step runs a little faster and compiles faster cold, and so do the test CNN's programs (docs/design.md §7).
    "--xla_cpu_use_fusion_emitters=false",
)
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


# LLVM at optimization level 1 instead of XLA's default, for programs that run once per pack or epoch:
# they compile several times faster cold, run no slower, and give bit-identical outputs
# (tests/test_rare_programs.py checks that; numbers in docs/design.md §7). Level 0 changed the
# initializers' float bits; the train step at level 1 compiled little faster and ran slower, so it keeps
# the default.
RARE_PROGRAM_OPTIONS = {"xla_backend_optimization_level": 1}


def rare_program_options(backend: str) -> dict:
    """The compiler options of `jit_rare` on `backend`: RARE_PROGRAM_OPTIONS on CPU, none elsewhere
    (not measured there)."""
    return dict(RARE_PROGRAM_OPTIONS) if backend == "cpu" else {}


def jit_rare(fn, label: str | None = None, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled with `rare_program_options` of JAX's default backend (through
    `bnstudy.perf.traced.jit`, which may keep its trace under `label`)."""
    import jax

    from bnstudy.perf import traced

    options = rare_program_options(jax.default_backend()) or None
    return traced.jit(fn, label=label, compiler_options=options, **jit_kwargs)
