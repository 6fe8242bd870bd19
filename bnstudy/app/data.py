"""TFDS splits -> uint8 numpy -> device arrays, once per process, with the dataset's normalization constants.

A split read through TFDS is also kept as a numpy copy in the data_dir (`bnstudy.perf.numpy_cache`), so later
processes load it without importing TensorFlow (which alone costs seconds of every run's start).

The validation split is held out of the official training split first, by a permutation with a fixed
seed (`VALIDATION_SEED`, independent of any run's seed), so every arm and seed of a study holds out the
same examples; `dataset.train_subset` then takes the first N of the remaining training examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bnstudy.app import download_checks
from bnstudy.core.datasets import FACTS
from bnstudy.core.engine import ArrayData
from bnstudy.perf import numpy_cache

log = logging.getLogger("bnstudy")
NUM_CLASSES = {name: facts.num_classes for name, facts in FACTS.items()}
EMBEDDED = ("mnist_t10k",)  # prepared from package data on first use, no network


def data_note(name: str) -> str | None:
    """What a reader must know about a dataset's split (None for the official splits)."""
    if name == "mnist_t10k":
        from bnstudy.app.datasets.notes import MNIST_T10K_NOTE  # a string: no TFDS import for it

        return MNIST_T10K_NOTE
    return None


class DataUnavailableError(RuntimeError):
    """The dataset is neither prepared in data_dir nor downloadable."""


VALIDATION_SEED = 20240611  # fixed: the held-out examples never depend on a run's seed


def validation_count(val_size: int | float, num_train: int) -> int:
    """How many training examples `dataset.val_size` holds out: a fraction in (0, 1) of the training split
    (rounded), or a count. Raises ConfigError when too few training examples would be left."""
    n_val = round(val_size * num_train) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val < num_train or (val_size and not n_val):
        from bnstudy.app.config import ConfigError

        held = f", which holds out {n_val} of them" if val_size and not n_val else ""
        raise ConfigError(
            f"Invalid config: `dataset.val_size` must be 0 (no validation split), or a fraction in (0, 1) or a "
            f"count that holds out at least one and fewer than the {num_train} examples of the training split "
            f"(some must be left to train on); got {val_size!r}{held}."
        )
    return n_val


def validation_split(num_train: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation indices, training indices) into a training split of `num_train` examples: `n_val`
    drawn by a permutation with `VALIDATION_SEED`, the rest kept in the split's order; both sorted, disjoint.
    A smaller `n_val` holds out a subset of a larger one's examples (prefixes of one permutation)."""
    held_out = np.zeros(num_train, bool)
    held_out[np.random.default_rng(VALIDATION_SEED).permutation(num_train)[:n_val]] = True
    return np.flatnonzero(held_out), np.flatnonzero(~held_out)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    arrays: ArrayData
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    @property
    def num_train(self) -> int:
        return int(self.arrays.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.arrays.test_images.shape[0])

    @property
    def num_val(self) -> int:
        return 0 if self.arrays.val_labels is None else int(self.arrays.val_labels.shape[0])


def _unavailable_message(name: str, data_dir: str | None, download: bool, cause: Exception) -> str:
    """What failed and only the advice that applies to what the user already set."""
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    what = f"Could not load TFDS dataset '{name}' from {where!s} ({type(cause).__name__}: {cause})."
    if isinstance(cause, ImportError):
        missing = getattr(cause, "name", None) or "the missing module"
        return f"{what} A Python package is missing: install it with `pip install {missing}`."
    if name in EMBEDDED:
        return f"{what} '{name}' is prepared from files inside the bnstudy package; reinstall bnstudy."
    advice = []
    if not data_dir:
        advice.append(
            f"point bnstudy at a prepared TFDS folder with `dataset.data_dir=/path/to/tensorflow_datasets` "
            f"(the folder that contains '{name}/'; prepare it once on a connected machine)"
        )
    else:
        advice.append(f"check that `dataset.data_dir` ({data_dir}) holds a prepared '{name}/' folder")
    if not download:
        advice.append("set `dataset.download=true` to let TFDS download it (needs internet)")
    else:
        advice.append("check the internet connection (TFDS download was on)")
    return f"{what} To fix: " + "; or ".join(advice) + "." + offline_hint(name)


def offline_hint(name: str) -> str:
    """The offline alternative to a missing MNIST: the real digits shipped in the package."""
    return " `dataset=mnist_t10k` trains offline on real digits shipped with bnstudy." if name == "mnist" else ""


def _quiet_tensorflow() -> None:
    """TF and TFDS log at INFO on import and load; a training log only needs our own lines. TF only decodes
    uint8 images here, so its oneDNN float kernels (whose notice TF_CPP_MIN_LOG_LEVEL does not silence) are
    switched off without changing a number."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.getLogger("absl").setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_preparation(name: str, data_dir: str | None):
    """The embedded dataset's first-use preparation with one line of ours instead of TFDS's: its 'Downloading
    and preparing dataset Unknown size' (nothing is downloaded) and 'Variant folder ... has no
    dataset_info.json' (the folder it is making) would mislead."""
    if name not in EMBEDDED:
        yield
        return
    if not is_prepared(name, data_dir):
        log.info("preparing the embedded %s in %s (first use; no network)", name, tfds_root(data_dir))
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl.setLevel(level)


def load_split_numpy(name: str, split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """A whole TFDS split as (uint8 images [N, H, W, C], int32 labels [N]): from this data_dir's numpy copy
    when it is still current (see `numpy_cache`), else read through TFDS, and the copy written for next time."""
    root = tfds_root(data_dir)
    cached = numpy_cache.read(root, name, split)
    if cached is not None:
        return cached
    images, labels, source_dir = _read_tfds_split(name, split, data_dir, download)
    numpy_cache.write(root, name, split, images, labels, source_dir)
    return images, labels


def tfds_root(data_dir: str | None) -> Path:
    """The folder TFDS reads and prepares datasets in."""
    return Path(os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))


def _read_tfds_split(name: str, split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, the prepared dataset's folder) read through TFDS, preparing it first if allowed."""
    if download and name not in EMBEDDED and not is_prepared(name, data_dir):
        download_checks.check_reachable(name)  # seconds, not TFDS's minutes of retries, without a network
    _quiet_tensorflow()
    import tensorflow_datasets as tfds  # app-layer only: the core never needs TFDS

    if name in EMBEDDED:
        import bnstudy.app.datasets.mnist_t10k  # noqa: F401  registers the builder; preparing it needs no network

        download = True
        tfds.disable_progress_bar()  # the first-use preparation takes seconds; its bars would flood the log
    check_prepared(name, data_dir, download)
    leftovers = download_checks.Leftovers(tfds_root(data_dir), name)
    try:
        with preparation_lock(name, data_dir, download), quiet_preparation(name, data_dir):
            ds, info = tfds.load(
                name, split=split, data_dir=data_dir, download=download, as_supervised=True, with_info=True
            )
        # Large batches, not batch_size=-1: that path aborts the process on generator-backed datasets.
        chunks = list(tfds.as_numpy(ds.batch(8192)))
    except Exception as e:  # TFDS raises many kinds (AssertionError, DatasetNotFoundError, OSError...)
        if download:
            leftovers.remove()  # partial downloads and the empty dataset folder of a failed preparation
        raise DataUnavailableError(_unavailable_message(name, data_dir, download, e)) from e
    images = np.concatenate([c[0] for c in chunks]).astype(np.uint8, copy=False)
    labels = np.concatenate([c[1] for c in chunks]).astype(np.int32, copy=False)
    return images, labels, str(info.data_dir)


def is_prepared(name: str, data_dir: str | None) -> bool:
    """The data_dir holds a prepared version of the dataset (its dataset_info.json)."""
    folder = tfds_root(data_dir) / name
    return folder.is_dir() and any(folder.glob("*/dataset_info.json"))


def check_prepared(name: str, data_dir: str | None, download: bool) -> None:
    """Without download, a given `dataset.data_dir` must hold the prepared dataset: said before TFDS, whose
    own errors (an AssertionError about a variant folder) do not name the key."""
    if download or not data_dir or (tfds_root(data_dir) / name).is_dir():
        return
    state = "does not exist" if not tfds_root(data_dir).exists() else f"has no '{name}/' folder"
    raise DataUnavailableError(
        f"Invalid config: `dataset.data_dir` must be a TFDS folder holding a prepared '{name}/' dataset; got "
        f"{data_dir!r}, which {state}. Point it at the folder that contains '{name}/' (prepare it once on a "
        f"connected machine), or set `dataset.download=true` to let TFDS download it (needs internet)."
        + offline_hint(name)
    )


def preparation_lock(name: str, data_dir: str | None, download: bool):
    """One process at a time prepares a dataset in a data_dir: the jobs of a sweep start together, and two
    TFDS preparations of the same folder collide on its final rename. Without download nothing is written."""
    if not download:
        return contextlib.nullcontext()
    from filelock import FileLock

    root = tfds_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(root / f".{name}.prepare.lock")


@functools.lru_cache(maxsize=4)
def _load_numpy_cached(name, data_dir, download):
    return load_split_numpy(name, "train", data_dir, download), load_split_numpy(name, "test", data_dir, download)


def load(
    name: str,
    data_dir: str | None = None,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    val_size: int | float = 0,
) -> Dataset:
    """The dataset on device; the TFDS read happens once per process (every Hydra job in it reuses it).

    `val_size` examples (a count, or a fraction of the training split) are held out of the training split
    first (`validation_split`); `train_subset` then keeps the first N of the remaining ones."""
    (train_x, train_y), (test_x, test_y) = _load_numpy_cached(name, data_dir, download)
    val_idx, train_idx = validation_split(len(train_y), validation_count(val_size, len(train_y)))
    (val_x, val_y), (train_x, train_y) = (train_x[val_idx], train_y[val_idx]), (train_x[train_idx], train_y[train_idx])
    if train_subset:
        train_x, train_y = train_x[:train_subset], train_y[:train_subset]
    if test_subset:
        test_x, test_y = test_x[:test_subset], test_y[:test_subset]
    facts = FACTS[name]
    val = (jnp.asarray(val_x), jnp.asarray(val_y)) if len(val_y) else (None, None)
    arrays = ArrayData(jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(test_x), jnp.asarray(test_y), *val)
    return Dataset(name, arrays, facts.num_classes, mean=facts.mean, std=facts.std, augment=facts.augment)
