"""The group-sequential seed rule (bnstudy.analysis.sequential) against its error guarantees, by simulation.

Simulated studies draw per-seed paired contrasts; each look runs the one-sided paired t-tests the reports use
on the seeds so far, and a comparison decided at a look stops there.
"""

import numpy as np
import pytest
from scipy import stats as sps

from bnstudy.analysis import sequential
from bnstudy.analysis.sequential import LookState, SeedSchedule, take_look

SCHEDULE = SeedSchedule(start=4, step=2, max=10)


def test_the_schedule_plans_looks_up_to_its_maximum():
    assert SCHEDULE.looks == (4, 6, 8, 10)
    assert SeedSchedule(3, 2, 10).looks == (3, 5, 7, 9, 10)
    assert SeedSchedule(3, 3, 9).looks == (3, 6, 9)
    assert SeedSchedule.fixed(5).looks == (5,)
    with pytest.raises(ValueError, match="start <= max"):
        SeedSchedule(start=12, step=2, max=10)


def test_spending_is_the_power_family_and_spends_all_alpha_at_the_end():
    alpha = 0.025
    spent = [sequential.spent(alpha, t) for t in SCHEDULE.fractions]
    assert spent == pytest.approx([alpha * t**2 for t in (0.4, 0.6, 0.8, 1.0)])
    assert spent[-1] == pytest.approx(alpha) and spent[0] < alpha / 5  # little, but not nothing, spent early


def test_nominal_levels_spend_alpha_on_fresh_null_studies():
    alpha = 0.025
    levels = np.array(sequential.nominal_levels(alpha, SCHEDULE.looks))
    assert sequential.nominal_levels(alpha, (5,))[0] == pytest.approx(alpha, rel=0.01)
    assert levels[0] == pytest.approx(alpha * 0.4**2)  # the first look: a p-value is uniform, the level exact
    assert np.all(np.diff(levels) > 0) and levels[-1] > 0.6 * alpha  # most of alpha is left for the last look
    verdicts, _ = simulate([0.0], sd=1.0, margin=0.0, n_studies=8000, seed=99)
    assert (verdicts == "supported").mean() == pytest.approx(alpha, abs=3 * np.sqrt(alpha * (1 - alpha) / 8000))


def test_the_first_look_can_decide_with_three_comparisons_in_the_family():
    """O'Brien-Fleming-type spending left the first look's threshold at exactly 0 with three comparisons; the
    power family leaves one that a large effect (5 seed standard deviations) passes at 4 seeds."""
    assert sequential.look_threshold(0.025 / 3, SeedSchedule(3, 2, 10), 0) > 0
    assert sequential.look_threshold(0.025 / 3, SCHEDULE, 0) > 1e-3
    _, seeds = simulate([5.0, 5.0, 5.0], sd=1.0, margin=0.0, n_studies=200, seed=3)
    assert (seeds == SCHEDULE.start).mean() > 0.5


def simulate(effects, sd, margin, n_studies, seed, expect="greater"):
    """Verdicts and seeds used of `n_studies` simulated studies with comparisons of true `effects`."""
    rng = np.random.default_rng(seed)
    m = len(effects)
    verdicts, seeds_used = [], []
    for _ in range(n_studies):
        d = np.asarray(effects)[:, None] + sd * rng.standard_normal((m, SCHEDULE.max))
        state = LookState.start(m)
        for look, n in enumerate(SCHEDULE.looks):
            x = d[:, :n]
            t = (x.mean(axis=1) - margin) / (x.std(axis=1, ddof=1) / np.sqrt(n))
            p_above, p_below = sps.t.sf(t, n - 1), sps.t.cdf(t, n - 1)
            support, contra = (p_above, p_below) if expect == "greater" else (p_below, p_above)
            state = take_look(state, support, contra, SCHEDULE, look)
            if not state.open.any():
                break
        verdicts.append(state.verdicts)
        seeds_used.append(max(lk[-1] for lk in state.looks))
    return np.array(verdicts), np.array(seeds_used)


@pytest.mark.parametrize("m", [1, 3])
def test_with_no_true_effect_false_support_and_false_contradiction_each_stay_within_their_level(m):
    n = 3000
    verdicts, _ = simulate([0.0] * m, sd=1.0, margin=0.0, n_studies=n, seed=m)
    slack = 2 * np.sqrt(0.025 * 0.975 / n)  # two simulation standard errors
    false_support = (verdicts == "supported").any(axis=1).mean()
    false_contradiction = (verdicts == "contradicted").any(axis=1).mean()
    assert false_support <= 0.025 + slack, false_support
    assert false_contradiction <= 0.025 + slack, false_contradiction


def test_a_true_effect_is_decided_and_on_fewer_seeds_than_the_maximum_on_average():
    verdicts, seeds = simulate([1.25], sd=1.0, margin=0.0, n_studies=1000, seed=7)
    assert (verdicts[:, 0] == "supported").mean() >= 0.8
    assert (verdicts[:, 0] == "contradicted").mean() <= 0.025
    assert seeds.mean() < SCHEDULE.max


def test_a_decided_comparison_passes_its_level_on_within_the_look():
    # Two comparisons at the last look: the first clearly rejected, the second just below alpha/1 but above
    # alpha/2: rejected only because the first passed its level on.
    last = len(SCHEDULE.looks) - 1
    full = sequential.look_threshold(0.025, SCHEDULE, last)
    half = sequential.look_threshold(0.0125, SCHEDULE, last)
    p = np.array([1e-6, (half + full) / 2])
    state = take_look(LookState.start(2), p, np.array([1.0, 1.0]), SCHEDULE, last)
    assert state.verdicts == ["supported", "supported"] and state.decided_at == [10, 10]
    state = take_look(LookState.start(2), np.array([0.5, p[1]]), np.array([1.0, 1.0]), SCHEDULE, last)
    assert state.verdicts == ["inconclusive", "inconclusive"]


def test_seeds_a_fixed_design_needs_grow_with_the_spread():
    few = sequential.seeds_for_fixed_design(0.01, 0.005, 0.0)
    many = sequential.seeds_for_fixed_design(0.01, 0.02, 0.0)
    assert 2 <= few < many
    assert sequential.seeds_for_fixed_design(0.0, 0.01, 0.0) is None


def test_seeds_a_fixed_design_needs_use_t_quantiles_and_the_level_given():
    """The smallest n whose one-sided t-test at the level reaches 80% power (t quantiles at n - 1 degrees of
    freedom): more than the normal approximation's (z + z)^2 at few seeds, more again at Holm's alpha / 3."""
    n = sequential.seeds_for_fixed_design(0.01, 0.01, 0.0)
    reach = lambda k, a: (sps.t.isf(a, k - 1) + sps.t.ppf(0.8, k - 1)) / np.sqrt(k)
    assert reach(n, 0.025) <= 1.0 < reach(n - 1, 0.025)
    assert n > (sps.norm.isf(0.025) + sps.norm.ppf(0.8)) ** 2
    assert sequential.seeds_for_fixed_design(0.01, 0.01, 0.0, alpha=0.025 / 3) > n
