"""What the training code must know of each dataset: image shape, classes, normalization, augmentation.

Facts, not loading: the app reads the splits through TFDS (bnstudy.app.data) and takes these from here,
and the benchmarks and tests build the default run on the embedded digits from them without TFDS.
"""

from __future__ import annotations

from typing import NamedTuple


class DatasetFacts(NamedTuple):
    image_shape: tuple[int, int, int]  # height, width, channels
    num_classes: int
    # Per-channel mean/std of the training images in [0, 1]; normalization itself happens on device.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop (pad 4) + horizontal flip in training


_MNIST = DatasetFacts((28, 28, 1), 10, (0.1307,), (0.3081,), augment=False)

FACTS = {
    "mnist_t10k": _MNIST,  # MNIST's constants: the two sets differ in the third decimal
    "mnist": _MNIST,
    "cifar10": DatasetFacts((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=True),
}
DIGITS = FACTS["mnist_t10k"]  # the default dataset: embedded, offline
