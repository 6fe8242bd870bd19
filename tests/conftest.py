"""Shared fixtures: tiny generated data for the core, mocked TFDS and an in-process Hydra runner for the app."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_SILENT", "true")

# One persistent XLA compilation cache for the session, this process and the app processes it starts
# (they inherit the environment): tests build fresh trainers for the same tiny models at the same shapes,
# and a hit skips XLA's backend compile (tests/test_train.py on 2 cores: 111 s -> 76 s). A new, empty
# folder each session, so no result depends on an earlier session's programs.
# xdist workers inherit the controller's folder; the process that made it removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bnstudy-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from bnstudy import allocator, xla_flags  # noqa: E402

# The process settings the app makes before JAX starts (bnstudy/train.py), so tests run what users run.
xla_flags.add_xla_flags()
allocator.keep_freed_memory()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bnstudy import engine, reference  # noqa: E402

# Small settings every app-level test starts from; tests add their own overrides after these.
TINY = [
    "train.batch_size=32",
    "train.epochs=1",
    "train.max_steps_per_epoch=3",
    "train.log_every=2",
    "train.eval_batch_size=64",
    "logger.wandb.mode=disabled",
    "logger.progress=false",
    "compile_cache_dir=null",
    "discrepancy.enabled=false",  # tests of the discrepancy metrics turn it on themselves
]


def make_arrays(n_train=256, n_test=64, shape=(28, 28, 1), seed=0) -> engine.ArrayData:
    """Learnable synthetic images: the label sets which horizontal band is bright, plus noise."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.int32)
        images = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
        band = shape[0] // 10
        for i, y in enumerate(labels):
            images[i, y * band : (y + 1) * band] = 220
        return images, labels

    (a, b), (c, d) = split(n_train), split(n_test)
    return engine.ArrayData(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c), jnp.asarray(d))


# What the core tests change in the reference schedule (bnstudy.reference: the config schema's defaults);
# each test overrides what it is about with `schedule(...)`.
TEST_SCHEDULE = dict(
    epochs=1,
    eval_batch_size=64,
    steps_per_call=1,
    discrepancy=False,
    discrepancy_every_eval=True,
    discrepancy_train_subset=0,
    dead_units=False,
)


def build_model(name="cnn", **kw):
    return reference.build_model(name, **kw)


def schedule(**kw):
    return reference.schedule(**{**TEST_SCHEDULE, **kw})


def cnn_program(norm="before_relu", batch_size=32, dropout_placement="none", **kw) -> engine.Program:
    model = build_model("cnn", norm=norm, dropout_placement=dropout_placement)
    return reference.program(model, batch_size=batch_size, input_mean=(0.13,), input_std=(0.31,), **kw)


def hparams(rows) -> engine.HParams:
    defaults = dict(lr=0.05, weight_decay=0.0, init_scale=1.0, dropout_rate=0.0, seed=0)
    return engine.HParams.stack([{**defaults, **r} for r in rows])


@pytest.fixture
def arrays():
    return make_arrays()


@pytest.fixture
def mock_tfds(monkeypatch):
    """TFDS mocked with 256 random examples per split; bnstudy's per-process data cache cleared around it, and
    its numpy copies of prepared splits (which would serve the real data instead of the mock) out of the way."""
    import tensorflow_datasets as tfds

    from bnstudy import data, numpy_cache

    monkeypatch.setattr(numpy_cache, "read", lambda *a: None)
    monkeypatch.setattr(numpy_cache, "write", lambda *a: None)
    data._load_numpy_cached.cache_clear()
    with tfds.testing.mock_data(num_examples=256):
        yield
    data._load_numpy_cached.cache_clear()


@pytest.fixture
def run_app(monkeypatch, tmp_path):
    """Run the Hydra app in-process as a user would from the shell: `run_app("model.norm=none", "-m", ...)`."""
    from bnstudy import train

    def run(*overrides):
        flags = [o for o in overrides if o.startswith("-")]  # Hydra's argparse wants flags before overrides
        rest = [o for o in overrides if not o.startswith("-")]
        argv = ["bnstudy-train", *flags, *TINY, f"out_dir={tmp_path / 'out'}", *rest]
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        train.main()
        return tmp_path / "out"

    return run
