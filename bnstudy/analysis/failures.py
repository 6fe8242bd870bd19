"""How a failed run counts in a comparison: a run that diverged or finished without learning stays in its arm's
group and counts against it, never dropped (dropping it would let failing help an arm).

- An outcome of training (an accuracy, a loss, the divergence and convergence flags: `is_outcome`) at its own
  value where it has one: a run that did not learn has a test accuracy, and that low accuracy is its outcome.
- A diverged run's accuracy (`*acc*` keys; not a spread of accuracies) is chance, 1 / classes: its weights
  give outputs that are not finite, so it predicts nothing better than a constant class (`failure_value`).
- Every other metric of a failed run (a probe of a mechanism: smoothness, ICS, a BN discrepancy, dead units,
  a generalization gap; steps to a target), and an outcome it lacks, is the worst outcome: +inf when lower is
  better, -inf when higher is better (`metric_direction`, or the comparison's `better:`). A probe read on a
  network that did not train describes the failure, not the mechanism, and its value can favour the arm: a
  net stuck at chance sits on a plateau whose loss barely changes, so it reads as smooth and shift-free, and
  counting that value would let failing help an arm as much as dropping the run would.
  A comparison with such a value is decided by a rank test (`rank_contrast`): the Wilcoxon signed-rank test on
  the per-seed contrasts when paired, Mann-Whitney's U for two unpaired groups; the worst outcome ranks below
  every measured one. Its estimate is the median per-seed contrast and its interval the distribution-free
  interval of that median (order statistics), either of which may be infinite.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bnstudy.analysis.derived import FAILED, NUM_CLASSES
from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.stats import CONFIDENCE, Contrast

_ACC = r"acc(_running|_batch|_population)?|epoch_acc"  # the accuracy keys, as the last part of a logged key
_ACCURACY = re.compile(rf"(^|/)({_ACC})$")
# Metrics where a larger value is the better outcome; every other compared metric is better when smaller
# (losses, errors, gaps, KL, ICS shifts, smoothness ranges and constants, dead units, steps, step time, spreads).
_HIGHER_IS_BETTER = re.compile(rf"(^|/)({_ACC}|cos|reached_target|converged)$|max_stable")
# Outcomes of training: a failed run's own value of these already counts against it.
_OUTCOME = re.compile(rf"(^|/)({_ACC}|loss|diverged|converged|reached_target)$")
_FUNCTION = re.compile(r"^\w+\((.+)\)$")


def _inner(metric: str) -> str:
    while m := _FUNCTION.match(metric):
        metric = m.group(1)
    return metric


def metric_direction(metric: str, declared: str | None = None) -> str:
    """'higher' or 'lower': which values of the metric are the better outcome (a comparison's `better:` wins)."""
    if declared is not None:
        if declared not in ("higher", "lower"):
            raise ReportError(f"`better` must be higher or lower, got {declared!r} (metric {metric!r}).")
        return declared
    return "higher" if _HIGHER_IS_BETTER.search(_inner(metric)) else "lower"


def is_outcome(metric: str) -> bool:
    """Whether the metric is an outcome of training (accuracy, loss, diverged, converged, reached_target), which
    a failed run keeps at its own value; any other metric is a probe, where a failed run is the worst outcome."""
    return bool(_OUTCOME.search(_inner(metric)))


def failure_value(metric: str, status: str, dataset: str) -> float:
    """What a failed run without a value of `metric` counts as: chance for a diverged run's accuracy, else NaN
    (the worst outcome, resolved by the comparison)."""
    if status == "diverged" and _ACCURACY.search(metric):
        return 1.0 / NUM_CLASSES.get(dataset, 10)
    return math.nan


def worst(metric: str, declared: str | None = None) -> float:
    return -math.inf if metric_direction(metric, declared) == "higher" else math.inf


def run_values(runs: pd.DataFrame, metric: str, dataset: str, better: str | None = None) -> pd.Series:
    """Each run's outcome of `metric`: its value; for a failed run, its own value of an outcome where it has
    one, else chance (a diverged run's accuracy) or the worst outcome (+-inf). Runs that are not failed keep
    NaN where they lack the metric."""
    values = pd.to_numeric(runs[metric], errors="coerce") if metric in runs else pd.Series(np.nan, index=runs.index)
    failed = runs["status"].isin(FAILED) & (values.isna() | (not is_outcome(metric)))
    if failed.any():
        fill = [failure_value(metric, s, dataset) for s in runs.loc[failed, "status"]]
        fill = [worst(metric, better) if math.isnan(v) else v for v in fill]
        values = values.astype(float)
        values.loc[failed] = fill
    return values


@dataclass(frozen=True)
class RankContrast(Contrast):
    """A contrast decided by a rank test because a failed run counts as the worst outcome."""

    values: tuple = ()  # the per-seed contrasts (paired) or the two groups' values, flattened (unpaired)
    split: int = 0  # unpaired: how many of `values` belong to the first group; 0 when paired
    note: str = ""

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        if self.split:
            return (-math.inf, math.inf)
        return median_interval(np.asarray(self.values, float), confidence)

    def _p(self, threshold: float, alternative: str) -> float:
        from scipy import stats

        v = np.asarray(self.values, float)
        if self.split:
            a, b = v[: self.split], v[self.split :]
            return float(stats.mannwhitneyu(a - threshold, b, alternative=alternative).pvalue)
        d = v - threshold
        if not np.any(d != 0):
            return 1.0
        return float(stats.wilcoxon(d, alternative=alternative, zero_method="zsplit").pvalue)

    def p_above(self, threshold: float) -> float:
        return self._p(threshold, "greater")

    def p_below(self, threshold: float) -> float:
        return self._p(threshold, "less")

    def p_two_sided(self) -> float:
        return min(1.0, 2 * min(self.p_above(0.0), self.p_below(0.0)))


def median_interval(d: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The distribution-free interval of a median from order statistics: (d_(k), d_(n+1-k)) with the largest
    k whose binomial tail P(Bin(n, 1/2) < k) stays within (1 - confidence) / 2; (-inf, inf) when none does."""
    from scipy import stats

    x, n = np.sort(d), len(d)
    tail = (1 - confidence) / 2
    k = int(stats.binom.ppf(tail, n, 0.5))  # P(Bin < k) <= tail for this k (or one less)
    while k > 0 and stats.binom.cdf(k - 1, n, 0.5) > tail:
        k -= 1
    return (-math.inf, math.inf) if k == 0 else (float(x[k - 1]), float(x[n - k]))


def has_worst(groups: list[pd.Series]) -> bool:
    return any(np.isinf(g.to_numpy(float)).any() for g in groups)


def rank_contrast(groups: list[pd.Series], coefs: list[float], paired: bool) -> RankContrast | None:
    """The rank-test contrast of groups holding the worst outcome (+-inf); None where no rank test applies
    (more than two unpaired groups)."""
    worst_runs = sum(int(np.isinf(g.to_numpy(float)).sum()) for g in groups)
    note = f"{worst_runs} failed run(s) without a value counted as the worst outcome: rank test"
    if paired:
        seeds = groups[0].index
        with np.errstate(invalid="ignore"):
            d = sum(c * g.reindex(seeds).to_numpy(float) for g, c in zip(groups, coefs))
        d = np.where(np.isnan(d), 0.0, d)  # both arms at their worst in a seed: a tie
        return RankContrast(
            float(np.median(d)), math.nan, len(d) - 1.0, f"signed-rank ({len(d)} seeds)", tuple(d), 0, note
        )
    if len(groups) != 2:
        return None
    a, b = (g.to_numpy(float) for g in groups)
    if coefs[0] < 0:
        a, b = b, a
    with np.errstate(invalid="ignore"):
        estimate = float(np.median(np.subtract.outer(a, b)))
    estimate = 0.0 if math.isnan(estimate) else estimate
    return RankContrast(estimate, math.nan, len(a) + len(b) - 2.0, "Mann-Whitney", (*a, *b), len(a), note)
