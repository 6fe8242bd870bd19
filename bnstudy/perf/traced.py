"""Traced programs kept on disk, so that a process compiles a program it has seen before without tracing it.

JAX's persistent compilation cache (the app's `compile_cache_dir`) skips XLA's compile, but each process
still traces and lowers every program in Python, most of a warm start's compile time (docs/design.md
has the numbers). `TracedStore` keeps each labeled program's lowered StableHLO (`jax.export`) under a
key of everything that shapes the trace: the program's label (what it computes and its static settings,
given where it is built), its arguments' tree structure, shapes, dtypes and weak types, the bnstudy
source, the versions of jax, jaxlib, flax, optax and numpy, the backend and JAX's numerics flags. A
process that finds the key deserializes the module and compiles it, with the donation and compiler
options the program was jitted with.

Every process compiles the exported module, the first one too (it exports, stores, then loads it like
any other), so a warm start runs exactly the program a cold one ran; tests/test_traced.py checks that
its outputs are bit-identical to the directly jitted program's.

`jit(fn, label, **jit_kwargs)` is `jax.jit` that also records how to export `fn`. Only programs with a
label, array arguments only (no static arguments) and single-device arguments are stored; any other
program, or any failure to export or load, falls back to `jitted.lower(*args).compile()`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import weakref
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger("bnstudy")

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # bnstudy/: its sources salt the stored traces
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy")
# JAX settings that change what a trace produces.
TRACE_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl", "jax_threefry_partitionable")


@dataclasses.dataclass(frozen=True)
class Spec:
    """How a jitted program was made: its Python function, its label and its jit arguments."""

    fn: Callable
    label: str | None
    jit_kwargs: dict


_specs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def jit(fn: Callable, label: str | None = None, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)`; with a `label` (a string naming what `fn` computes and every static
    setting it closes over), `TracedStore` may keep its trace."""
    jitted = jax.jit(fn, **jit_kwargs)
    _specs[jitted] = Spec(fn, label, dict(jit_kwargs))
    return jitted


def spec_of(jitted: Callable) -> Spec | None:
    try:
        return _specs.get(jitted)
    except TypeError:  # not weak-referenceable: not made by `jit`
        return None


@functools.cache
def salt() -> str:
    """A digest of what every trace depends on beyond its label and arguments."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_DIR)).encode())
        h.update(path.read_bytes())
    for name in VERSIONED:
        try:
            h.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=none".encode())
    device = jax.devices()[0]
    h.update(f"{jax.default_backend()}|{device.device_kind}".encode())
    for flag in TRACE_FLAGS:
        h.update(f"{flag}={getattr(jax.config, flag, None)}".encode())
    return h.hexdigest()[:32]


def arguments_key(args: tuple) -> str | None:
    """The arguments' structure and abstract values as text, or None if one is not a single-device array."""
    leaves, tree = jax.tree.flatten(args)
    parts = [str(tree)]
    for leaf in leaves:
        if not isinstance(leaf, jax.Array) or len(leaf.sharding.device_set) != 1:
            return None
        aval = jax.typeof(leaf)
        parts.append(f"{aval.dtype}{list(aval.shape)}{'w' if aval.weak_type else ''}")
    return "|".join(parts)


class FlatProgram:
    """A compiled program over flattened arguments, called with the original pytrees."""

    def __init__(self, compiled, out_tree):
        self.compiled, self.out_tree = compiled, out_tree

    def __call__(self, *args):
        return jax.tree.unflatten(self.out_tree, self.compiled(*jax.tree.leaves(args)))


class TracedStore:
    """Exported traces in `folder/<salt>/<key>.jaxexport`, one per program and argument shapes."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.hits = self.stores = 0

    def compile(self, jitted: Callable, args: tuple) -> Any:
        """`jitted` compiled for `args` through its stored trace (made and stored first if missing), or
        None where the store does not apply (see the module docstring)."""
        spec = spec_of(jitted)
        if spec is None or spec.label is None or spec.jit_kwargs.get("static_argnums") is not None:
            return None
        arguments = arguments_key(args)
        if arguments is None:
            return None
        key = hashlib.sha256(f"{spec.label}\n{arguments}".encode()).hexdigest()[:40]
        path = self.folder / salt() / f"{key}.jaxexport"
        try:
            blob, out_tree = self._load(path) if path.exists() else (None, None)
            if blob is None:
                blob, out_tree = export(spec, args)
                self._store(path, blob, out_tree)
            else:
                self.hits += 1
            return compile_exported(spec, blob, out_tree, args)
        except Exception as e:  # a cache: never worth failing a run over
            log.warning("traced program cache not used for %s (%s: %s)", spec.label[:80], type(e).__name__, e)
            return None

    def _load(self, path: Path):
        try:
            return pickle.loads(path.read_bytes())
        except Exception:  # torn or foreign file: trace again and replace it
            return None, None

    def _store(self, path: Path, blob: bytes, out_tree) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps((blob, out_tree)))
        os.replace(tmp, path)
        self.stores += 1


def export(spec: Spec, args: tuple) -> tuple[bytes, Any]:
    """The serialized export of `spec.fn` over the flattened `args`, and its output tree."""
    leaves, in_tree = jax.tree.flatten(args)
    out_trees = []

    def flat(*xs):
        out = spec.fn(*jax.tree.unflatten(in_tree, xs))
        flat_out, tree = jax.tree.flatten(out)
        out_trees.append(tree)
        return flat_out

    exported = jax.export.export(jax.jit(flat), platforms=[jax.default_backend()])(*leaves)
    return exported.serialize(), out_trees[-1]


def flat_donations(donate_argnums, args: tuple) -> tuple[int, ...]:
    """The flattened leaf positions of the donated arguments."""
    if donate_argnums is None:
        return ()
    donated = {donate_argnums} if isinstance(donate_argnums, int) else set(donate_argnums)
    positions, start = [], 0
    for i, arg in enumerate(args):
        n = len(jax.tree.leaves(arg))
        if i in donated:
            positions.extend(range(start, start + n))
        start += n
    return tuple(positions)


def compile_exported(spec: Spec, blob: bytes, out_tree, args: tuple) -> FlatProgram:
    exported = jax.export.deserialize(blob)
    kwargs = {k: v for k, v in spec.jit_kwargs.items() if k != "donate_argnums"}
    donate = flat_donations(spec.jit_kwargs.get("donate_argnums"), args)
    rejitted = jax.jit(exported.call, donate_argnums=donate, **kwargs)
    return FlatProgram(rejitted.lower(*jax.tree.leaves(args)).compile(), out_tree)
