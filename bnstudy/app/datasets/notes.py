"""What a reader must know about a shipped dataset's split, importable without TFDS (run summaries quote it)."""

MNIST_T10K_SPLIT_SEED = 20261123  # fixed: every machine builds the same split
MNIST_T10K_NOTE = (
    "not the official MNIST split: 8000 train / 2000 test images cut from the 10,000 official MNIST test "
    f"images after a shuffle with seed {MNIST_T10K_SPLIT_SEED}; not comparable to published MNIST results"
)
