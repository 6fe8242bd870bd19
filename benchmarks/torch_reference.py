"""bnstudy's MNIST CNN in PyTorch eager: the reference its CPU train step is timed against.

Same layers and shapes as `bnstudy.core.models.build_model("cnn", norm="before_relu")`: 3x3 SAME convs with
32 and 64 channels, each followed by BN -> ReLU -> 2x2 max-pool, a 128-unit dense block with its own
BN -> ReLU, and a 10-way classifier; BN momentum 0.1 (PyTorch's convention, bnstudy's 0.9), eps 1e-5;
SGD with momentum 0.9, lr 0.1, no weight decay (bnstudy's defaults). The step takes the same inputs
as bnstudy's: a uint8 batch gathered from the device-resident training set, normalized in the step.
Initialization is PyTorch's default (not He-normal): it changes no op and no shape. Only the flatten
order differs (C, H, W here; H, W, C in Flax), a fixed permutation of the dense layer's inputs.

    python benchmarks/torch_reference.py   # checks that the loss falls on generated data
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
NUM_CLASSES = 10


def _block(layer: nn.Module, bn: nn.Module) -> list[nn.Module]:
    return [layer, bn, nn.ReLU()]


def build_cnn(*, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> nn.Sequential:
    """conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, dense128-BN-ReLU, dense10: bnstudy's `cnn`, BN before ReLU."""
    return nn.Sequential(
        *_block(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32, momentum=bn_momentum, eps=bn_eps)),
        nn.MaxPool2d(2),
        *_block(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64, momentum=bn_momentum, eps=bn_eps)),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *_block(nn.Linear(64 * 7 * 7, 128), nn.BatchNorm1d(128, momentum=bn_momentum, eps=bn_eps)),
        nn.Linear(128, NUM_CLASSES),
    )


class TorchTrainer:
    """One model and its SGD optimizer over a training set held as NCHW uint8 tensors."""

    def __init__(
        self,
        images_nhwc: np.ndarray,
        labels: np.ndarray,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        channels_last: bool = False,
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_cnn().to(memory_format=self.memory_format)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.images = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(np.asarray(labels)).long()

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """One SGD step on the examples `idx`; returns the loss (a tensor, so no sync is forced)."""
        x = (self.images[idx].float() / 255.0 - MNIST_MEAN) / MNIST_STD
        x = x.contiguous(memory_format=self.memory_format)
        loss = nn.functional.cross_entropy(self.model(x), self.labels[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def steps(self, perm: torch.Tensor, batch_size: int, n: int) -> list[float]:
        """`n` consecutive steps over the order `perm`; the losses."""
        losses = [self.step(perm[i * batch_size : (i + 1) * batch_size]) for i in range(n)]
        return [float(v) for v in losses]


def generated_digits(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 uint8 images: the label sets which horizontal band is bright, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 * y + 4 : 2 * y + 6] = 220
    return images, labels


def loss_falls(steps: int = 12, batch_size: int = 64, channels_last: bool = False) -> tuple[float, float]:
    """Mean loss of the first and the last three of `steps` steps on generated digits."""
    images, labels = generated_digits()
    trainer = TorchTrainer(images, labels, channels_last=channels_last)
    perm = torch.cat([torch.randperm(len(labels), generator=torch.Generator().manual_seed(e)) for e in range(3)])
    losses = trainer.steps(perm, batch_size, steps)
    return float(np.mean(losses[:3])), float(np.mean(losses[-3:]))


if __name__ == "__main__":
    first, last = loss_falls()
    print(
        f"torch {torch.__version__}: loss {first:.3f} -> {last:.3f} over 12 steps ({'falls' if last < first else 'DOES NOT FALL'})"
    )
