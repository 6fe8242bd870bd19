"""Seeds until decided: the group-sequential rule that lets a study add seeds to undecided comparisons.

A study declares its seed schedule `seeds: {start: 4, step: 2, max: 10}`: the planned looks are at 4, 6, 8 and 10
seeds (`SeedSchedule.looks`). At each look the comparisons still undecided are tested on the seeds so far;
the ones decided stop, the others get `step` more paired seeds (every group they use), up to `max`.

Repeated looks at growing data inflate the error rate of a fixed-level test, so each look uses a stricter
nominal level:
- Alpha spending (Lan & DeMets 1983) with the power family of Kim & DeMets (1987): of a one-sided level
  alpha, the share spent by information fraction t = n / max is alpha(t) = alpha * t^SPENDING_POWER, with
  SPENDING_POWER = 2. Little is spent early, but not so little that an early look is idle: O'Brien-Fleming-type
  spending, used before, left a 3-seed first look a threshold near 1e-6 (a t of several hundred on 2 degrees
  of freedom; exactly 0 with three comparisons in Holm's family), so no first look could ever decide. With
  t^2 and looks at 4, 6, 8 and 10 seeds, a large effect (a mean per-seed contrast of about 4.7 standard
  deviations of the seeds, with three comparisons in the family) is decided at the first look, and the last
  look's threshold stays near two thirds of a fixed design's (0.016 against 0.025 for one comparison).
- A look rejects when its one-sided paired t-test p-value is at most that look's nominal threshold p_k, the
  thresholds chosen so that with no effect P(no crossing before look k, a crossing at k) = alpha(t_k) -
  alpha(t_{k-1}) (`nominal_levels`, calibrated on simulated null studies of the same schedule). Where that
  increment is too small for the simulation to resolve (fewer than MIN_CROSSINGS paths), the threshold is
  the increment itself: a p-value is uniform under the null, so P(crossing at k) <= p_k, a conservative bound.
  At the first look that bound is exact, and used there.
- Across a study's comparisons, Holm's step-down as a graphical procedure over the looks (Maurer & Bretz
  2013): each undecided comparison is tested at alpha / (number still undecided), and a rejection passes its
  level on to the others within the same look. Support and failure (contradicted or negligible) are two such
  families, each at DIRECTION_ALPHA = 0.025, as in a fixed design (bnstudy.analysis.stats).
`tests/test_sequential.py` simulates studies with no true effect (false support and false contradiction each
<= 2.5% with the looks used) and with a true effect (decided, and on fewer seeds than the maximum).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from bnstudy.analysis.stats import DIRECTION_ALPHA, FAILURE_WORDS


def _scipy_stats():
    from scipy import stats

    return stats


@dataclass(frozen=True)
class SeedSchedule:
    """Seeds at the first look, seeds added per round, and the most seeds any comparison gets."""

    start: int = 3
    step: int = 2
    max: int = 10

    def __post_init__(self):
        if not (2 <= self.start <= self.max and self.step >= 1):
            raise ValueError(f"a seed schedule needs 2 <= start <= max and step >= 1; got {self}")

    @property
    def looks(self) -> tuple[int, ...]:
        """The planned looks: seed counts from `start` in steps of `step`, ending exactly at `max`."""
        counts = list(range(self.start, self.max + 1, self.step))
        return tuple(counts if counts[-1] == self.max else [*counts, self.max])

    @property
    def fractions(self) -> tuple[float, ...]:
        return tuple(n / self.max for n in self.looks)

    @classmethod
    def fixed(cls, seeds: int) -> SeedSchedule:
        """One look at `seeds` seeds: the fixed design."""
        return cls(start=seeds, step=1, max=seeds)


SPENDING_POWER = 2.0  # Kim-DeMets power family: alpha(t) = alpha * t^SPENDING_POWER
MIN_CROSSINGS = 20  # fewer simulated crossings than this: the threshold is the increment itself (see above)


def spent(alpha: float, t: float) -> float:
    """Cumulative alpha spent by information fraction t (Kim-DeMets power family)."""
    if t <= 0:
        return 0.0
    return float(alpha * min(t, 1.0) ** SPENDING_POWER)


NULL_PATHS = 200_000  # simulated null studies that calibrate the boundaries (fixed seed: same boundaries every run)


@functools.cache
def _null_pvalues(looks: tuple[int, ...]) -> np.ndarray:
    """One-sided paired t-test p-values [NULL_PATHS, looks] of simulated studies with no effect: each path is
    one study's per-seed contrasts, tested on its first n seeds at each look."""
    t_dist = _scipy_stats().t
    rng = np.random.default_rng(20261203)
    d = rng.standard_normal((NULL_PATHS, looks[-1]))
    n = np.asarray(looks)
    sums, squares = np.cumsum(d, axis=1)[:, n - 1], np.cumsum(d * d, axis=1)[:, n - 1]
    means = sums / n
    sd = np.sqrt((squares - n * means**2) / (n - 1))
    return t_dist.sf(means / (sd / np.sqrt(n)), n - 1)


@functools.cache
def nominal_levels(alpha: float, looks: tuple[int, ...]) -> tuple[float, ...]:
    """Per look, the nominal one-sided p threshold of the paired t-test that spends alpha as `spent` does.

    The thresholds are set on simulated null studies, look by look: of the paths not yet crossed, the share
    crossing at look k is the spending function's increment alpha(t_k) - alpha(t_{k-1}). This calibrates the
    t-test itself (with its variance estimated anew at each look) rather than its large-sample normal form,
    which at 3 to 10 seeds spends about a tenth more than alpha.
    """
    p = _null_pvalues(looks)
    alive = np.ones(len(p), bool)
    levels = []
    for k, n in enumerate(looks):
        target = spent(alpha, n / looks[-1]) - (spent(alpha, looks[k - 1] / looks[-1]) if k else 0.0)
        crossing = max(int(round(target * len(p))), 0)
        candidates = np.sort(p[alive, k])
        exact = k == 0 or crossing < MIN_CROSSINGS  # uniform p at the first look: its level is the increment
        level = target if exact else float(candidates[crossing - 1])
        levels.append(level)
        alive &= p[:, k] > level
    return tuple(levels)


def look_threshold(alpha: float, schedule: SeedSchedule, look: int) -> float:
    """The nominal p threshold at look index `look` for a comparison tested at level `alpha`."""
    return nominal_levels(round(alpha, 12), schedule.looks)[look]


def holm_at_look(pvalues, open_: np.ndarray, rejected: np.ndarray, alpha: float, schedule: SeedSchedule, look: int):
    """One family's step-down at one look: which open hypotheses are rejected now.

    `pvalues` are this look's one-sided p-values; `open_` marks hypotheses still tested; `rejected` those
    rejected at earlier looks (they pass their level on). Returns the boolean array of new rejections.
    """
    p = np.asarray(pvalues, float)
    new = np.zeros(p.shape, bool)
    testable = open_ & ~rejected & np.isfinite(p)
    while True:
        remaining = int((~rejected & ~new).sum())
        if remaining == 0:
            return new
        threshold = look_threshold(alpha / remaining, schedule, look)
        hits = testable & ~new & (p <= threshold)
        if not hits.any():
            return new
        new |= hits


@dataclass
class LookState:
    """Where each comparison of a study stands after the looks so far."""

    verdicts: list[str]  # supported / contradicted / inconclusive (still open, or never testable)
    decided_at: list[int | None]  # seeds at the deciding look
    looks: list[list[int]]  # per comparison, the seed counts it was tested at

    @classmethod
    def start(cls, m: int) -> LookState:
        return cls(["inconclusive"] * m, [None] * m, [[] for _ in range(m)])

    @property
    def open(self) -> np.ndarray:
        return np.array([d is None for d in self.decided_at], bool)


def take_look(state: LookState, p_support, p_contra, schedule: SeedSchedule, look: int, words=None) -> LookState:
    """Test the open comparisons at look index `look` (p-values on that look's seeds); support first. `words`:
    per comparison, the word of its failure side (contradicted or negligible; default contradicted)."""
    open_ = state.open
    n = schedule.looks[look]
    words = list(words) if words is not None else ["contradicted"] * len(state.verdicts)
    for i in np.flatnonzero(open_):
        state.looks[i].append(n)
    done_support = np.array([v == "supported" for v in state.verdicts])
    done_failure = np.array([v in FAILURE_WORDS for v in state.verdicts])
    support = holm_at_look(p_support, open_, done_support, DIRECTION_ALPHA, schedule, look)
    failure = holm_at_look(p_contra, open_ & ~support, done_failure, DIRECTION_ALPHA, schedule, look)
    for i in np.flatnonzero(support | failure):
        state.verdicts[i] = "supported" if support[i] else words[i]
        state.decided_at[i] = n
    return state


def seeds_for_fixed_design(
    estimate: float, sd: float, threshold: float, alpha: float = DIRECTION_ALPHA, power: float = 0.8
) -> int | None:
    """Paired seeds a fixed design would need to show `estimate` away from `threshold` with `power` by a
    one-sided t-test at level `alpha` (the caller divides it for Holm's family or a doubled p), at the observed
    per-seed spread `sd`: the smallest n with (t_{1-alpha, n-1} + t_{power, n-1}) * sd / sqrt(n) <= the gap,
    the t quantiles of n - 1 degrees of freedom (a fixed design's test at few seeds); None when the estimate
    sits on the threshold, there is no spread to scale, or more than MAX_SEEDS_NEEDED would be needed."""
    gap = abs(estimate - threshold)
    if not (sd > 0 and gap > 0 and np.isfinite(sd) and np.isfinite(gap)):
        return None
    t = _scipy_stats().t
    n = np.arange(2, MAX_SEEDS_NEEDED + 1)
    reach = (t.isf(alpha, n - 1) + t.ppf(power, n - 1)) * sd / np.sqrt(n)
    ok = np.flatnonzero(reach <= gap)
    return int(n[ok[0]]) if len(ok) else None


MAX_SEEDS_NEEDED = 10_000
