"""`python -m bnstudy.train` / `bnstudy-train`: process settings first, then the Hydra app (bnstudy.app.main).

python -m bnstudy.train [overrides]           # one job (a list in a packable key = a pack)
python -m bnstudy.train -m model.norm=a,b,c   # one job per value
"""

import gc


def cli() -> None:
    """The command line: XLA flags and malloc settings before JAX starts, the app's imports frozen out of the
    garbage collector, the app's `main`, and a last freeze before the interpreter exits.

    XLA reads XLA_FLAGS once, when JAX starts its backend, and its threads take their malloc arenas when they
    start, so both are set before anything imports JAX. The imported libraries' objects (jax, flax, hydra,
    orbax) live until the process exits: collections during the imports find no garbage, and once frozen no
    later collection scans them. Frozen again at the end, the interpreter's exit frees the job's objects without
    its last scans of them all. In-process callers (tests) use `bnstudy.app.main.main`.
    """
    gc.disable()
    from bnstudy.perf import allocator, xla_flags

    xla_flags.add_xla_flags()
    allocator.keep_freed_memory()
    from bnstudy.app import main as app

    gc.freeze()
    gc.enable()
    try:
        app.main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    cli()
