"""The statistics and verdict rules of a report, stated and computed in one place (numpy, scipy, pandas only).

Rules (the report's README repeats them):
- Interval of a group mean: mean +- t(0.975, n-1) * sd / sqrt(n). Bounded metrics (accuracies, rates) are
  shown with that interval clipped to their range ([0, 1]); a proportion (the divergence rate) gets the exact
  Clopper-Pearson interval instead.
- A comparison is a contrast of group means, theta = sum_i c_i * mean_i (A - B, or (A - B) - (A' - B')).
  When every group holds the same seeds (same seed = same initialization and data order in every arm) it is
  *paired*: the t-interval of the per-seed contrasts. Otherwise *Welch*: unequal variances,
  Welch-Satterthwaite degrees of freedom.
- Verdicts use one-sided t-tests against the declared margin m, adjusted by Holm-Bonferroni over the
  comparisons of a study, at family-wise level FAMILY_ALPHA = 0.05 split evenly between the two errors a
  report can make: 0.025 for "supported" and 0.025 for the claim's failure ("contradicted" or "negligible").
  With one directional comparison, "supported" is "the 95% interval lies entirely beyond the margin"; with
  one equivalence comparison, "supported" is "the 95% interval lies inside +-m" (two one-sided tests at
  0.025 each) and "contradicted" needs the 97.5% interval entirely beyond one of +-m (the doubled p below).
  - `expect: greater` (claim theta > m): supported when H0 theta <= m is rejected; contradicted when the
    opposite beyond the margin is shown (H0 theta >= -m rejected; with m = 0, theta < 0); **negligible**
    when, with m > 0, a difference inside +-m is shown (two one-sided tests at the same level): the claimed
    effect is absent without the opposite being shown. The failure side's p-value is the smaller of the two
    (they cannot both be small). `expect: less` mirrors it.
  - `expect: equivalent` (claim |theta| < m, m > 0): two one-sided tests (TOST), p = max of the two;
    contradicted when |theta| > m is shown (the smaller one-sided p, doubled for the two sides).
  - No variation (standard error 0, e.g. a value bounded by a grid's spacing that is the same for every
    seed): no p-value, inconclusive. A zero-width interval is no evidence by itself.
- A failed run (diverged, or finished without learning) stays in its group: where it has the metric (a
  run that did not learn has a test accuracy) that value counts; a diverged run's accuracy counts as chance
  (`failure_value`: its outputs are not finite); a metric a failed run lacks counts as the worst outcome,
  and the comparison is then decided by a rank test (the Wilcoxon signed-rank test on the per-seed
  contrasts, paired; Mann-Whitney's U for two unpaired groups) in which that run ranks below every measured one.
- A run that stays finite but does not learn is not `trained` (see `is_trained`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# The run rules a training run applies to itself live in bnstudy.analysis.trained (the app imports it); named
# here too, as the report states them.
from bnstudy.analysis.trained import CHANCE_MARGIN, LOSS_RATIO, gen_gap, is_trained  # noqa: F401

if TYPE_CHECKING:
    import pandas as pd


def _scipy_stats():
    """scipy.stats on first use: the training app needs only the trained rule and gen_gap from this module,
    and importing scipy.stats costs it about half a second at every start."""
    from scipy import stats

    return stats


CONFIDENCE = 0.95
FAMILY_ALPHA = 0.05  # family-wise error level of a study's verdict, half for support and half for contradiction
DIRECTION_ALPHA = FAMILY_ALPHA / 2
EXPECTATIONS = ("greater", "less", "equivalent")


# ------------------------------------------------------------------------------------------- intervals


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of the t-interval of a mean; NaN bounds with fewer than 2 values."""
    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return (mean, np.nan, np.nan)
    half = _scipy_stats().t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return (mean, mean - half, mean + half)


def t_half_width(std, n, confidence: float = CONFIDENCE):
    """Half-width of the t-interval of a mean from (arrays of) sd and n; NaN where n < 2."""
    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _scipy_stats().t.ppf(0.5 + confidence / 2, n - 1) * np.asarray(std, float) / np.sqrt(n)


def proportion_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial interval of k successes in n trials."""
    if n == 0:
        return (np.nan, np.nan)
    ci = _scipy_stats().binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return (float(ci.low), float(ci.high))


_UNIT_INTERVAL = re.compile(
    r"(^|/)(acc(_running|_batch|_population)?|epoch_acc|acc_spread|diverged|dead_frac|converged|reached_target)$"
)


def metric_bounds(metric: str) -> tuple[float, float] | None:
    """The range a metric cannot leave ([0, 1] for accuracies and rates), or None when unbounded."""
    return (0.0, 1.0) if _UNIT_INTERVAL.search(metric) else None


def clip_to_bounds(low, high, metric: str):
    """The displayed interval of a bounded metric: the t-interval clipped to the metric's range."""
    bounds = metric_bounds(metric)
    if bounds is None:
        return low, high
    return np.clip(low, *bounds), np.clip(high, *bounds)


# ------------------------------------------------------------------------------------------- contrasts


@dataclass(frozen=True)
class Contrast:
    """An estimate of sum_i c_i * mean_i with its t-distribution (standard error, degrees of freedom)."""

    estimate: float
    se: float
    df: float
    method: str  # "paired (n seeds)" or "Welch"

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        if self.se == 0 or not np.isfinite(self.se):
            return (self.estimate, self.estimate)
        half = _scipy_stats().t.ppf(0.5 + confidence / 2, self.df) * self.se
        return (self.estimate - half, self.estimate + half)

    def p_above(self, threshold: float) -> float:
        """One-sided p-value of H0 theta <= threshold (small: theta > threshold is shown)."""
        if not self.se > 0:
            return np.nan
        return float(_scipy_stats().t.sf((self.estimate - threshold) / self.se, self.df))

    def p_below(self, threshold: float) -> float:
        """One-sided p-value of H0 theta >= threshold (small: theta < threshold is shown)."""
        if not self.se > 0:
            return np.nan
        return float(_scipy_stats().t.cdf((self.estimate - threshold) / self.se, self.df))

    def p_two_sided(self) -> float:
        """Two-sided p-value against theta = 0 (for reference; verdicts use the one-sided tests)."""
        return min(1.0, 2 * min(self.p_above(0.0), self.p_below(0.0))) if self.se > 0 else np.nan


def welch_contrast(groups: list, coefs: list[float]) -> Contrast:
    """Contrast of independent group means, Welch-Satterthwaite degrees of freedom."""
    n = np.array([len(g) for g in groups], float)
    means = np.array([np.mean(g) for g in groups])
    var = np.array([np.var(g, ddof=1) for g in groups])
    c = np.asarray(coefs, float)
    terms = c**2 * var / n
    se = float(math.sqrt(terms.sum()))
    df = se**4 / float((terms**2 / (n - 1)).sum()) if se > 0 else np.inf
    return Contrast(float(c @ means), se, df, "Welch")


def paired_contrast(groups: list[pd.Series], coefs: list[float]) -> Contrast:
    """Contrast of per-seed values (each group a Series indexed by seed, same seeds): t on the differences."""
    seeds = groups[0].index
    d = sum(c * g.reindex(seeds).to_numpy(float) for g, c in zip(groups, coefs))
    se = float(np.std(d, ddof=1) / math.sqrt(len(d)))
    return Contrast(float(np.mean(d)), se, len(d) - 1.0, f"paired ({len(d)} seeds)")


def same_seeds(groups: list[pd.Series]) -> bool:
    """Every group holds each of the same seeds exactly once (and at least 2 of them)."""
    first = groups[0].index
    return len(first) >= 2 and first.is_unique and all(g.index.is_unique and set(g.index) == set(first) for g in groups)


def contrast(groups: list[pd.Series], coefs: list[float]) -> Contrast:
    """Paired when every group holds the same seeds, Welch otherwise. Groups: values indexed by seed."""
    if same_seeds(groups):
        return paired_contrast(groups, coefs)
    return welch_contrast([g.to_numpy(float) for g in groups], coefs)


# -------------------------------------------------------------------------------------- tests, verdicts


def one_sided_pvalues(c: Contrast, expect: str, margin: float) -> tuple[float, float, str]:
    """(p of support, p of the claim's failure, the failure's word: contradicted or negligible) of one
    comparison, before any multiplicity adjustment (the rules in the module docstring)."""
    if expect == "greater":
        if margin > 0:  # the claimed gain absent: the opposite beyond -m, or a difference inside +-m
            p_opposite, p_negligible = c.p_below(-margin), tost_pvalue(c, margin)
            if p_negligible < p_opposite:
                return c.p_above(margin), p_negligible, "negligible"
            return c.p_above(margin), p_opposite, "contradicted"
        return c.p_above(margin), c.p_below(margin), "contradicted"
    if expect == "less":
        return c.p_below(margin), c.p_above(margin), "contradicted"
    if expect == "equivalent":
        return tost_pvalue(c, margin), min(1.0, 2 * min(c.p_above(margin), c.p_below(-margin))), "contradicted"
    raise ValueError(f"expect must be one of {EXPECTATIONS}, got {expect!r}")


def tost_pvalue(c: Contrast, margin: float) -> float:
    """Two one-sided tests of |theta| < margin: the larger of the two one-sided p-values."""
    return max(c.p_above(-margin), c.p_below(margin))


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count in the family)."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    k = len(order)
    adjusted = np.maximum.accumulate((k - np.arange(k)) * p[order]) if k else []
    out[order] = np.minimum(adjusted, 1.0)
    return out


FAILURE_WORDS = ("contradicted", "negligible")  # the claim's failure: the opposite shown, or no difference that matters
VERDICTS = ("supported", *FAILURE_WORDS, "inconclusive")


def decide(
    p_support_adj: float, p_contra_adj: float, alpha: float = DIRECTION_ALPHA, word: str = "contradicted"
) -> str:
    """supported / the failure's word / inconclusive from the Holm-adjusted one-sided p-values."""
    if p_support_adj <= alpha:
        return "supported"
    if p_contra_adj <= alpha:
        return word
    return "inconclusive"


def decide_family(
    p_support, p_contra, words=None, alpha: float = DIRECTION_ALPHA
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per comparison: verdict and the Holm-adjusted p-values of support and of the claim's failure."""
    ps, pc = holm(p_support), holm(p_contra)
    words = list(words) if words is not None else ["contradicted"] * len(ps)
    return [decide(s, c, alpha, w) for s, c, w in zip(ps, pc, words)], ps, pc


def overall(verdicts: list[str]) -> str:
    """The claim, a conjunction of its comparisons: contradicted if any comparison is, else negligible if any
    is, else "depends" if an axis decides one, supported if all are, otherwise inconclusive."""
    if not verdicts:
        return "inconclusive"
    for word in (*FAILURE_WORDS, "depends"):
        if word in verdicts:
            return word
    return "supported" if all(v == "supported" for v in verdicts) else "inconclusive"


def why(c: Contrast | None, expect: str, margin: float, verdict: str) -> str:
    """A short reason for a comparison's verdict (empty when the interval says it plainly)."""
    if c is None:
        return "fewer than 2 finished runs with this metric in a group"
    if getattr(c, "note", ""):
        return c.note
    if not c.se > 0:
        return "no variation across seeds: a zero-width interval is no evidence (bounded by the grid spacing)"
    if verdict == "negligible":
        return f"a difference inside +-{margin:g} is shown: smaller than the smallest difference that matters"
    if verdict == "contradicted" and expect == "equivalent":
        return f"the difference is shown to exceed the margin +-{margin:g}"
    if verdict == "inconclusive" and expect == "greater" and margin > 0 and c.p_below(margin) <= DIRECTION_ALPHA:
        return (
            f"a gain of {margin:g} or more is ruled out, but neither a negligible nor an opposite difference is shown"
        )
    return ""
