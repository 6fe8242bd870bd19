"""A numpy copy of a prepared TFDS split, so that loading it again needs neither TFDS nor TensorFlow.

The copy lives in the TFDS data dir (`<data_dir>/.bnstudy-numpy/<name>-<split>.npz`) and records what it was
read from: the prepared dataset's folder, the modification time and size of that folder's
`dataset_info.json`, and the tensorflow-datasets version. It is used only while all three still hold, so a
re-prepared dataset or a new TFDS (whose default version of a dataset may differ) is read through TFDS again.
Writes are atomic (a temporary file renamed into place), so processes starting together never read a torn
copy; a data_dir bnstudy cannot write in just goes without one.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
FOLDER = ".bnstudy-numpy"


def cache_file(root: Path, name: str, split: str) -> Path:
    return Path(root) / FOLDER / f"{name}-{split}.npz"


def source_stamp(source_dir: str) -> str | None:
    """What identifies one preparation of a TFDS dataset folder; None when it is gone."""
    try:
        info = os.stat(Path(source_dir) / "dataset_info.json")
    except OSError:
        return None
    return f"{info.st_mtime_ns}:{info.st_size}"


def tfds_version() -> str:
    try:
        return importlib.metadata.version("tensorflow-datasets")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def read(root: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) from a current copy, else None."""
    path = cache_file(root, name, split)
    try:
        with np.load(path, allow_pickle=False) as npz:
            source_dir = str(npz["source_dir"])
            current = str(npz["stamp"]) == source_stamp(source_dir) and str(npz["tfds_version"]) == tfds_version()
            return (npz["images"], npz["labels"]) if current else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # no copy yet, or a torn one: read through TFDS
        return None


def write(root: Path, name: str, split: str, images: np.ndarray, labels: np.ndarray, source_dir: str) -> None:
    stamp = source_stamp(source_dir)
    if stamp is None or not Path(source_dir).resolve().is_relative_to(Path(root).resolve()):
        return  # only a dataset prepared in this data_dir (not, e.g., TFDS's mock data)
    path = cache_file(root, name, split)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels, source_dir=source_dir, stamp=stamp, tfds_version=tfds_version())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the copy from the other users of a shared data_dir
        os.replace(tmp, path)
    except OSError as e:
        log.debug("no numpy copy of %s/%s in %s: %s", name, split, root, e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
