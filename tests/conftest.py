"""Shared fixtures: tiny generated data for the core, mocked TFDS and an in-process Hydra runner for the app."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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

from bnstudy.perf import (
    allocator,  # noqa: E402
    xla_flags,  # noqa: E402
)

# The process settings the app makes before JAX starts (bnstudy/train.py), so tests run what users run.
xla_flags.add_xla_flags()
allocator.keep_freed_memory()

import dataclasses  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bnstudy import schema  # noqa: E402
from bnstudy.core import engine, from_config, models  # noqa: E402
from bnstudy.core.datasets import DIGITS  # noqa: E402
from bnstudy.core.evaluate import pack_permutation  # noqa: E402

# The libraries' objects live as long as the worker, yet every full collection scans them all again:
# ~120,000 after these imports, ~480,000 once a test imports TensorFlow (0.47 s a collection on 2 cores;
# one worker spent 6.8 s of 60 in full collections). Frozen, the collector skips them; see `pytest_runtest_setup`.
gc.freeze()
gc.set_threshold(50_000, 20, 20)
_modules_at_freeze = [len(sys.modules)]


def pytest_runtest_setup(item):
    """Before a test, if the earlier tests imported many modules (TensorFlow, Hydra, orbax, pandas), collect
    their garbage once and freeze what is left, so that no later collection scans those modules again."""
    if len(sys.modules) - _modules_at_freeze[0] > 200:
        gc.collect()
        gc.freeze()
        _modules_at_freeze[0] = len(sys.modules)


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


# The default run: the schema's defaults on the embedded digits, what the app trains without overrides.
DEFAULT = schema.Config(dataset=schema.DatasetConfig(name="mnist_t10k"))

# What the core tests change in the default run's schedule; each test overrides what it is about with
# `schedule(...)`.
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
    """`models.build_model(name)` with the default run's settings, `kw` replacing some."""
    return models.build_model(name, **{**from_config.model_kwargs(DEFAULT.model, DIGITS.num_classes), **kw})


def schedule(**kw):
    return dataclasses.replace(from_config.schedule_from_config(DEFAULT), **{**TEST_SCHEDULE, **kw})


def setup_of(model=None, **kw) -> engine.Setup:
    """The default run's Setup around `model` (default: the default CNN), `kw` replacing some fields."""
    setup = from_config.setup_from_config(DEFAULT, DIGITS.num_classes, DIGITS.mean, DIGITS.std, DIGITS.augment)
    return dataclasses.replace(setup, **({} if model is None else {"model": model}), **kw)


def cnn_program(norm="before_relu", batch_size=32, dropout_placement="none", **kw) -> engine.Setup:
    model = build_model("cnn", norm=norm, dropout_placement=dropout_placement)
    return setup_of(model, batch_size=batch_size, input_mean=(0.13,), input_std=(0.31,), **kw)


def hparams(rows) -> engine.HParams:
    defaults = dict(lr=0.05, weight_decay=0.0, init_scale=1.0, dropout_rate=0.0, seed=0)
    return engine.HParams.stack([{**defaults, **r} for r in rows])


# Compiled as the trainer compiles them (one program each, `jit_rare`): op by op, every initializer's
# random draw compiled a threefry of its own (~0.3 s each on 2 cores).
def init_states(setup: engine.Setup, shape: tuple[int, ...], hp: engine.HParams) -> engine.TrainState:
    """The pack's initial states for [K]-shaped `hp`."""
    return xla_flags.jit_rare(jax.vmap(partial(engine.init_state, setup, tuple(shape))))(hp)


def initial_state(setup: engine.Setup, shape: tuple[int, ...], hp: engine.HParams) -> engine.TrainState:
    """One run's initial state for scalar `hp`."""
    return xla_flags.jit_rare(partial(engine.init_state, setup, tuple(shape)))(hp)


def init_variables(module, *args, **kwargs):
    """`module.init(*args, **kwargs)` as one program: op by op, each initializer's draw compiles on its own."""
    return xla_flags.jit_rare(partial(module.init, **kwargs))(*args)


def normal(seed: int, shape: tuple[int, ...], loc: float = 0.0, scale: float = 1.0) -> jax.Array:
    """float32 Gaussian test inputs drawn by numpy: `jax.random.normal` compiles a program for every new shape
    (seconds each on 2 cores, at import time for module constants), for data no test is about."""
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def permutations(hp: engine.HParams, num_examples: int, epoch: int = 0) -> jax.Array:
    """[K, num_examples]: each run's training order in `epoch`."""
    return pack_permutation(num_examples)(hp.seed, jnp.int32(epoch))


@pytest.fixture
def arrays():
    return make_arrays()


# The tests that import TensorFlow (through TFDS: ~9 s on 2 cores) share a worker, so one worker pays for it.
imports_tensorflow = pytest.mark.xdist_group("tensorflow")


@pytest.fixture
def mock_tfds(monkeypatch):
    """TFDS mocked with 256 random examples per split; bnstudy's per-process data cache cleared around it, and
    its numpy copies of prepared splits (which would serve the real data instead of the mock) out of the way."""
    import tensorflow_datasets as tfds

    from bnstudy.app import data
    from bnstudy.perf import numpy_cache

    monkeypatch.setattr(numpy_cache, "read", lambda *a: None)
    monkeypatch.setattr(numpy_cache, "write", lambda *a: None)
    data._load_numpy_cached.cache_clear()
    with tfds.testing.mock_data(num_examples=256):
        yield
    data._load_numpy_cached.cache_clear()


def serve_generated_data(monkeypatch, n_train: int, n_test: int, shape: tuple[int, ...]) -> None:
    """The app's data loader returning `make_arrays` images in place of TFDS, for tests of what the app does
    with its data rather than of reading it: small images compile and run faster than MNIST's 28x28."""
    from bnstudy.app import data

    arrays = [np.asarray(a) for a in make_arrays(n_train=n_train, n_test=n_test, shape=shape)]
    monkeypatch.setattr(data, "_load_numpy_cached", lambda *a: ((arrays[0], arrays[1]), (arrays[2], arrays[3])))


@pytest.fixture
def small_data(monkeypatch):
    """256 training and 64 test images of 10x10 for the app, in place of TFDS (`serve_generated_data`)."""
    serve_generated_data(monkeypatch, n_train=256, n_test=64, shape=(10, 10, 1))


@pytest.fixture
def run_app(monkeypatch, tmp_path):
    """Run the Hydra app in-process as a user would from the shell: `run_app("model.norm=none", "-m", ...)`."""
    from bnstudy.app import main as train

    def run(*overrides):
        flags = [o for o in overrides if o.startswith("-")]  # Hydra's argparse wants flags before overrides
        rest = [o for o in overrides if not o.startswith("-")]
        argv = ["bnstudy-train", *flags, *TINY, f"out_dir={tmp_path / 'out'}", *rest]
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        train.main()
        return tmp_path / "out"

    return run


# ------------------------------------------------------------------ the embedded digits, prepared in a subprocess

REPO = Path(__file__).resolve().parents[1]
NO_NETWORK = (  # any connection attempt other than to loopback fails, so a test proves it needs no internet
    "import socket; _c = socket.socket.connect\n"
    "def _connect(self, address):\n"
    "    host = address[0] if isinstance(address, tuple) else ''\n"
    "    if host not in ('127.0.0.1', 'localhost', '::1') and self.family in (socket.AF_INET, socket.AF_INET6):\n"
    "        raise OSError('network disabled in this test')\n"
    "    return _c(self, address)\n"
    "socket.socket.connect = _connect\n"
)


# The prepared test split holds exactly the official test images order[8000:] of the fixed-seed shuffle.
PREPARE_AND_CHECK = """
import numpy as np
from bnstudy.app import data
from bnstudy.app.datasets.mnist_t10k import builder
d = data.load('mnist_t10k', {path!r})
images, _ = builder.load_images_and_labels()
_, test = builder.split_order()
expected = sorted(images[i].tobytes() for i in test)
got = sorted(x.tobytes() for x in np.asarray(d.arrays.test_images))
import sys
tf = 'with-tensorflow' if 'tensorflow' in sys.modules else 'without-tensorflow'
print(tf, d.num_train, d.num_test, 'same-split' if got == expected else 'different-split')
"""


def subprocess_env(**extra) -> dict:
    """The environment of a `python -m bnstudy...` subprocess: this checkout importable, wandb and TF quiet."""
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


# Session-scoped, so per xdist worker: the tests that use it share the xdist_group "prepared_digits".
@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> Path:
    """mnist_t10k prepared from package data with every non-loopback connection refused."""
    path = tmp_path_factory.mktemp("tfds")
    code = NO_NETWORK + PREPARE_AND_CHECK.format(path=str(path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["with-tensorflow", "8000", "2000", "same-split"]
    for stray in ("Downloading and preparing", "Variant folder", "oneDNN"):  # TFDS's and TF's lines, not ours
        assert stray not in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]
    return path
