"""bnstudy's MNIST CNN, deep CNN and ResNet in PyTorch eager: the references its CPU train step is timed against.

Same layers and shapes as `bnstudy.core.models.build_model("cnn", norm="before_relu")`: 3x3 SAME convs with
32 and 64 channels, each followed by BN -> ReLU -> 2x2 max-pool, a 128-unit dense block with its own
BN -> ReLU, and a 10-way classifier; BN momentum 0.1 (PyTorch's convention, bnstudy's 0.9), eps 1e-5;
SGD with momentum 0.9, lr 0.1, no weight decay (bnstudy's defaults). The step takes the same inputs
as bnstudy's: a uint8 batch gathered from the device-resident training set, normalized in the step.
Initialization is PyTorch's default (not He-normal): it changes no op and no shape. Only the flatten
order differs (C, H, W here; H, W, C in Flax), a fixed permutation of the dense layer's inputs.
`build(model, depth)` gives the others, BN before ReLU as well: the deep CNN of `model.depth` (bnstudy's
`models.cnn_layout`) and ResNet-(6n+2) (`bnstudy.core.resnet`: option-A shortcuts, convs with biases,
stride-2 convs padded 1, the normalized 28x28 digits zero-padded to 32x32).

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


def _conv_bn(c_in: int, c_out: int, bn_momentum: float, bn_eps: float, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, padding=1), nn.BatchNorm2d(c_out, momentum=bn_momentum, eps=bn_eps)]


def build_deep_cnn(depth: int, *, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> nn.Sequential:
    """bnstudy's `cnn` at `model.depth=depth` (`models.cnn_layout`), BN before ReLU; depth 2 is `build_cnn`."""
    from bnstudy.core.models import cnn_layout

    layers, channels, size = [], 1, 28
    for item in cnn_layout(depth):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            layers += [*_conv_bn(channels, item, bn_momentum, bn_eps), nn.ReLU()]
            channels = item
    dense = _block(nn.Linear(channels * size * size, 128), nn.BatchNorm1d(128, momentum=bn_momentum, eps=bn_eps))
    return nn.Sequential(*layers, nn.Flatten(), *dense, nn.Linear(128, NUM_CLASSES))


class BasicBlock(nn.Module):
    """He et al.'s basic block, BN before ReLU, with the option-A shortcut: bnstudy's `s<i>b<j>` block."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn_momentum: float, bn_eps: float):
        super().__init__()
        self.first = nn.Sequential(*_conv_bn(c_in, c_out, bn_momentum, bn_eps, stride), nn.ReLU())
        self.second = nn.Sequential(*_conv_bn(c_out, c_out, bn_momentum, bn_eps))
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra))  # zero channels after the old
        return nn.functional.relu(self.second(self.first(x)) + shortcut)


class ResNet(nn.Module):
    """bnstudy's `resnet` (He et al. 2016 sec. 4.2, option A) on the digits zero-padded to 32x32."""

    def __init__(self, depth: int = 20, *, bn_momentum: float = 0.1, bn_eps: float = 1e-5):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(1, 16, bn_momentum, bn_eps), nn.ReLU())
        blocks, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for b in range(n):
                blocks.append(BasicBlock(channels, width, 2 if stage and not b else 1, bn_momentum, bn_eps))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(nn.functional.pad(x, (2, 2, 2, 2))))
        return self.classifier(h.mean((2, 3)))


def build(model: str = "cnn", depth: int | None = None) -> nn.Module:
    """The network bnstudy's `model=<model> model.depth=<depth>` trains, BN before ReLU (None: standard depth)."""
    if model == "resnet":
        return ResNet(20 if depth is None else depth)
    if model == "cnn":
        return build_cnn() if depth in (None, 2) else build_deep_cnn(depth)
    raise ValueError(f"no PyTorch reference for model {model!r}; expected 'cnn' or 'resnet'")


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
        model: str = "cnn",
        depth: int | None = None,
    ):
        torch.manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build(model, depth).to(memory_format=self.memory_format)
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


def loss_falls(
    steps: int = 12, batch_size: int = 64, channels_last: bool = False, model: str = "cnn", depth: int | None = None
) -> tuple[float, float]:
    """Mean loss of the first and the last three of `steps` steps on generated digits."""
    images, labels = generated_digits()
    trainer = TorchTrainer(images, labels, channels_last=channels_last, model=model, depth=depth)
    perm = torch.cat([torch.randperm(len(labels), generator=torch.Generator().manual_seed(e)) for e in range(3)])
    losses = trainer.steps(perm, batch_size, steps)
    return float(np.mean(losses[:3])), float(np.mean(losses[-3:]))


if __name__ == "__main__":
    first, last = loss_falls()
    print(
        f"torch {torch.__version__}: loss {first:.3f} -> {last:.3f} over 12 steps ({'falls' if last < first else 'DOES NOT FALL'})"
    )
