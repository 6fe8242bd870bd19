"""TFDS builder `mnist_t10k`: the official MNIST test images shipped with bnstudy, split 8000/2000 offline.

The source files are package data next to this module; preparing reads them (md5-checked), shuffles once
with a fixed seed and cuts train/test. No network is touched, so `tfds.load("mnist_t10k")` works on a
machine without internet: the first call prepares it into the TFDS data dir (a few seconds).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from bnstudy.app.datasets.notes import MNIST_T10K_NOTE, MNIST_T10K_SPLIT_SEED

HERE = Path(__file__).resolve().parent
MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
NUM_IMAGES = 10000
NUM_TRAIN = 8000
SPLIT_SEED = MNIST_T10K_SPLIT_SEED
NOTE = MNIST_T10K_NOTE


def read_idx(name: str, header_bytes: int) -> np.ndarray:
    """The payload of one official idx file, after checking its md5 against the official checksum."""
    raw = (HERE / name).read_bytes()
    if hashlib.md5(raw).hexdigest() != MD5[name]:
        raise ValueError(f"{HERE / name}: md5 mismatch, the file is not the official MNIST file")
    return np.frombuffer(gzip.decompress(raw), dtype=np.uint8, offset=header_bytes)


def load_images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    images = read_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
    labels = read_idx("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64)
    assert images.shape[0] == labels.shape[0] == NUM_IMAGES
    return images, labels


def split_order() -> tuple[np.ndarray, np.ndarray]:
    """Indices into the official test set of the train and test splits."""
    order = np.random.default_rng(SPLIT_SEED).permutation(NUM_IMAGES)
    return order[:NUM_TRAIN], order[NUM_TRAIN:]


class MnistT10k(tfds.core.GeneratorBasedBuilder):
    """The 10,000 official MNIST test images, shuffled with a fixed seed and cut 8000 train / 2000 test."""

    name = "mnist_t10k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "8000/2000 split of the official MNIST test set."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Official MNIST test images (LeCun, Cortes, Burges; CC BY-SA 3.0). " + NOTE + ".",
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(28, 28, 1)), "label": tfds.features.ClassLabel(num_classes=10)}
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the files are package data
        images, labels = load_images_and_labels()
        train, test = split_order()
        return {
            "train": self._generate_examples(images[train], labels[train]),
            "test": self._generate_examples(images[test], labels[test]),
        }

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
