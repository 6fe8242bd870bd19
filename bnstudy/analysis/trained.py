"""The rules a training run applies to its own summary, and the report applies again: whether a finite run
learned (`trained`) and its generalization gap. numpy only: the training app imports this module (and
bnstudy.analysis.convergence), so it is part of the code fingerprint (bnstudy.app.provenance), unlike the rest
of the analysis."""

from __future__ import annotations

import numpy as np

# The `trained` rule: a finite run learned when its last train loss fell below LOSS_RATIO x its first logged
# train loss AND its test accuracy is above chance + CHANCE_MARGIN.
LOSS_RATIO = 0.9
CHANCE_MARGIN = 0.05


def is_trained(
    first_train_loss: float | None,
    final_train_loss: float | None,
    test_acc: float | None,
    num_classes: int = 10,
    loss_ratio: float = LOSS_RATIO,
    chance_margin: float = CHANCE_MARGIN,
) -> bool:
    """Whether a finite run learned: its final train loss < loss_ratio x its first logged one, and its test
    accuracy > 1/num_classes + chance_margin. A missing number is not held against the run (the other
    decides); with neither, the run counts as trained."""
    if first_train_loss is not None and final_train_loss is not None:
        first, final = float(first_train_loss), float(final_train_loss)
        if np.isfinite(first) and np.isfinite(final) and final >= loss_ratio * first:
            return False
    if test_acc is not None and np.isfinite(float(test_acc)):
        return float(test_acc) > 1.0 / num_classes + chance_margin
    return True


def gen_gap(train_subset_acc, test_acc):
    """Generalization gap: training-subset accuracy in inference mode minus test accuracy (same weights)."""
    return np.asarray(train_subset_acc, float) - np.asarray(test_acc, float)
