"""Which form (bnstudy.core.conv_forms) computes each direction of each 3x3 convolution, by backend and shape.

Written by `python benchmarks/conv_forms.py --write` from its measurement (each form timed per shape and direction,
alternated in one process at batch 128); edit it only through that script. A shape or backend not listed here
runs XLA's own convolution.
"""

# The 2-conv CNN's convolutions stay XLA's whatever is measured, so that its committed results stay valid bit
# for bit: MNIST's second conv (its first is the one-channel stencil), CIFAR-10's first and second.
PINNED = frozenset({"14x14x32->64/1", "32x32x3->32/1", "16x16x32->64/1"})

# backend -> {"HxWxC->O/stride": (forward, input_grad, kernel_grad)}
# measured on cpu (2 CPUs), jax 0.10.2, batch 128, 7 rounds, margin 5%
CHOSEN: dict[str, dict[str, tuple[str, str, str]]] = {
    "cpu": {
        "16x16x32->64/2": ("xla", "im2col", "rows"),
        "32x32x16->32/2": ("xla", "taps", "rows"),
    },
}
