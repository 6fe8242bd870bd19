"""bnstudy.analysis.spec: a bad report block's error names the field; per-dataset values of the MNIST family."""

from __future__ import annotations

import re

import pytest

from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.spec import for_dataset, validate_spec

# Synthetic runs log only what each test needs; the report's "no run has metric" warnings are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")


def test_spec_errors_name_the_field(tmp_path):
    base = {"claim": "x."}
    cases = [
        ({"metrics": ["mode(test/acc)"]}, "unknown function 'mode'"),
        (
            {
                "compare": [
                    {"metric": "disc/kl", "trend": "train.batch_size", "a": {"model.norm": "none"}, "expect": "less"}
                ]
            },
            "both `a` and `b`",
        ),
        ({"compare": [{"metric": "disc/kl", "trend": "train.batch_size", "logy": "yes", "expect": "less"}]}, "`logy`"),
        ({"metrics": ["converged"]}, "needs a `convergence"),
        ({"convergence": {"key": "val/acc"}}, "`convergence` must be"),
        ({"metrics": ["steps_to_target"]}, "needs `target_acc`"),
        ({"heavy_tailed": "disc/kl"}, "`heavy_tailed` must be a list"),
    ]
    for extra, words in cases:
        with pytest.raises(ReportError, match=re.escape(words)):
            validate_spec({**base, **extra}, "s")


def test_mnist_margins_hold_for_the_embedded_digits():
    assert for_dataset({"mnist": 0.005, "cifar10": 0.01}, "mnist_t10k") == 0.005
    assert for_dataset({"mnist": 0.005, "mnist_t10k": 0.002}, "mnist_t10k") == 0.002
    assert for_dataset({"cifar10": 0.01}, "mnist_t10k") is None
