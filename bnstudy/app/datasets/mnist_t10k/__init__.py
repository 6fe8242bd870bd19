"""The embedded `mnist_t10k` dataset (see README.md here): importing this module registers its TFDS builder."""

from bnstudy.app.datasets.mnist_t10k.builder import NOTE, MnistT10k

__all__ = ["NOTE", "MnistT10k"]
