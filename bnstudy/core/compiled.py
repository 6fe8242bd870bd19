"""The one in-process memo of programs: jitted functions by what they compute, compiled programs by what they
are called with.

- `memoized` wraps a program builder (`build_train_programs`, `build_eval_programs`, `pack_permutation`): equal
  arguments return the same jitted functions, so a later trainer of the same setup in this process (the next job
  of a sweep, the next test) neither traces nor compiles. The builders' results are kept for the last
  `MEMO_BUILDS` argument sets, and the compiled programs of a dropped build go with its jitted functions.
- `CompileCache` compiles a jitted function ahead of time once per argument structure, shapes and shardings,
  shared through the same memo by every cache of the process, and counts the seconds it spent compiling (so
  training and evaluation times exclude compilation).
Across processes, JAX's persistent compilation cache and bnstudy.perf.traced's stored traces do the rest.
"""

from __future__ import annotations

import collections
import functools
import time
import weakref

import jax

from bnstudy.perf import traced

MEMO_BUILDS = 32  # builder calls kept: a sweep's jobs and a test worker's setups, bounded in memory

_builds: collections.OrderedDict = collections.OrderedDict()  # (builder, args) -> its programs, oldest first
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # jitted fn -> {(store, signature): program}


def forget_compiled_programs() -> None:
    """Drop this process's memo: later builders trace and CompileCaches compile (or load from their traced
    store) again, as in a fresh process."""
    _builds.clear()
    _compiled.clear()


def programs_held() -> int:
    """How many compiled programs the memo holds now (over every jitted function)."""
    return sum(len(programs) for programs in _compiled.values())


def memoized(builder):
    """`builder` with its results memoized by its (hashable) arguments, in this module's one memo."""

    @functools.wraps(builder)
    def build(*args, **kwargs):
        key = (builder, args, tuple(sorted(kwargs.items())))
        if key in _builds:
            _builds.move_to_end(key)
            return _builds[key]
        result = _builds[key] = builder(*args, **kwargs)
        while len(_builds) > MEMO_BUILDS:
            _builds.popitem(last=False)
        return result

    return build


def signature(args) -> tuple:
    """What a compiled program is specific to: the arguments' tree structure and each leaf's shape, dtype and
    sharding (a program compiled for one device cannot take arrays split over several)."""
    leaves = jax.tree.leaves(args)
    return (jax.tree.structure(args), tuple((a.shape, a.dtype, getattr(a, "sharding", None)) for a in leaves))


class CompileCache:
    """Compiles jitted functions ahead of time, once per signature in this process, and counts the seconds."""

    def __init__(self, traced_store: traced.TracedStore | None = None):
        """`traced_store`: where programs made with `traced.jit` keep their traces across processes."""
        self.traced_store = traced_store
        self.compile_seconds = 0.0  # total time spent compiling in `compiled`

    def compiled(self, fn, *args):
        """`fn` compiled for these arguments (reused for any later call with the same signature)."""
        store = None if self.traced_store is None else self.traced_store.folder
        programs = _compiled.setdefault(fn, {})
        key = (store, signature(args))
        if key not in programs:
            t0 = time.perf_counter()
            loaded = self.traced_store.compile(fn, args) if self.traced_store is not None else None
            programs[key] = loaded if loaded is not None else fn.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
        return programs[key]

    def call(self, fn, *args):
        return self.compiled(fn, *args)(*args)
