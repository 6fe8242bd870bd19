"""bnstudy.analysis.compare on synthetic runs with known values: group means and intervals, Welch and paired
contrasts, verdicts with Holm's adjustment, interactions and margins, contexts and trend slopes are the
hand-computed ones; bnstudy.analysis.stats' own rules are in test_stats.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from bnstudy.analysis import stats as bstats
from bnstudy.analysis.tables import wide_tables
from tests.report_runs import (
    DROPOUT_SPEC,
    PLACEMENT,
    SMOOTH_SPEC,
    T975_DF2,
    T975_DF4,
    analyse_dir,
    paired_by_hand,
    placement_runs,
    welch_by_hand,
    write_run,
)

# Synthetic runs log only what each test needs; the report's "no run has metric" warnings are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")


def test_group_mean_std_and_t_interval_equal_hand_computed(tmp_path):
    a = analyse_dir("placement", placement_runs(tmp_path / "runs"))
    row = a.summary[(a.summary["metric"] == "test/acc") & (a.summary["model.norm"] == "before_relu")].iloc[0]
    assert row["n"] == 3 and row["runs"] == 3 and row["diverged"] == 0
    assert row["mean"] == pytest.approx(0.98)
    assert row["std"] == pytest.approx(0.01)
    half = T975_DF2 * 0.01 / math.sqrt(3)
    # an accuracy's interval is shown clipped to [0, 1]: 0.98 + 0.0248 would exceed 1
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.98 - half, 1.0))


def test_welch_contrast_matches_formula_and_scipy():
    a, b = [0.97, 0.98, 0.99], [0.80, 0.82, 0.84]
    got = bstats.welch_contrast([np.array(a), np.array(b)], [1, -1])
    d, lo, hi, df = welch_by_hand(a, b)
    assert (got.estimate, *got.interval(), got.df) == pytest.approx((d, lo, hi, df))
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert got.p_two_sided() == pytest.approx(ref.pvalue)
    # equal n and equal spread: Welch df is 2(n-1) = 4 exactly
    eq = bstats.welch_contrast([np.array([0.97, 0.98, 0.99]), np.array([0.94, 0.95, 0.96])], [1, -1])
    half = T975_DF4 * math.sqrt(2 * 0.01**2 / 3)
    assert eq.df == pytest.approx(4.0)
    assert eq.interval() == pytest.approx((0.03 - half, 0.03 + half))


def test_interaction_contrast_of_four_groups_equals_hand_computed():
    groups = [np.array(g) for g in ([0.90, 0.92, 0.91], [0.97, 0.98, 0.99], [0.95, 0.96, 0.94], [0.96, 0.95, 0.97])]
    got = bstats.welch_contrast(groups, [1, -1, -1, 1])
    means = [g.mean() for g in groups]
    terms = [g.var(ddof=1) / len(g) for g in groups]
    se = math.sqrt(sum(terms))
    df = se**4 / sum(t**2 / 2 for t in terms)
    est = means[0] - means[1] - means[2] + means[3]
    half = stats.t.ppf(0.975, df) * se
    expected = (est, est - half, est + half, df)
    assert (got.estimate, *got.interval(), got.df) == pytest.approx(expected)


def test_placement_verdict_supported_with_hand_computed_effects(tmp_path):
    a = analyse_dir("placement", placement_runs(tmp_path / "runs"))
    assert a.verdict == "supported"
    c = a.comparisons.set_index("comparison")
    for x, y in [("before_relu", "after_relu"), ("before_relu", "none"), ("after_relu", "none")]:
        row = c.loc[f"(norm={x}) - (norm={y})"]
        d, lo, hi, df = paired_by_hand(PLACEMENT[x], PLACEMENT[y])  # same seeds 0, 1, 2 in every arm
        assert (row["estimate"], row["ci_low"], row["ci_high"], row["df"]) == pytest.approx((d, lo, hi, df))
        assert row["method"] == "paired (3 seeds)" and row["verdict"] == "supported"
        # Holm over the 3 comparisons: the adjusted p-values are the sorted raw ones times 3, 2, 1 (monotone)
    raw = a.comparisons["p_support"].to_numpy()
    order = np.argsort(raw)
    by_hand = np.maximum.accumulate(raw[order] * np.array([3, 2, 1]))
    assert a.comparisons["p_support_holm"].to_numpy()[order] == pytest.approx(np.minimum(by_hand, 1))


def test_placement_verdict_contradicted_and_inconclusive(tmp_path):
    swapped = {**PLACEMENT, "before_relu": PLACEMENT["after_relu"], "after_relu": PLACEMENT["before_relu"]}
    a = analyse_dir("placement", placement_runs(tmp_path / "swapped", swapped))
    assert a.verdict == "contradicted"
    close = {**PLACEMENT, "after_relu": [0.96, 0.975, 0.99]}
    b = analyse_dir("placement", placement_runs(tmp_path / "close", close))
    assert b.verdict == "inconclusive"
    assert list(b.comparisons["verdict"]) == ["inconclusive", "supported", "supported"]


def test_dropout_interaction_and_margin(tmp_path):
    root = tmp_path / "runs"
    acc = {  # (norm, placement, rate) -> per-seed accuracies
        ("before_relu", "before_classifier", 0.0): [0.980, 0.982, 0.981],
        ("before_relu", "before_classifier", 0.5): [0.981, 0.9835, 0.9815],
        ("before_relu", "after_block", 0.5): [0.950, 0.955, 0.945],
        ("before_relu", "after_block", 0.0): [0.980, 0.982, 0.981],
        ("none", "before_classifier", 0.5): [0.975, 0.977, 0.976],
        ("none", "after_block", 0.5): [0.972, 0.974, 0.973],
        ("none", "before_classifier", 0.0): [0.970, 0.972, 0.971],
        ("none", "after_block", 0.0): [0.970, 0.972, 0.971],
    }
    for (norm, placement, rate), values in acc.items():
        for seed, v in enumerate(values):
            write_run(
                root,
                study="dropout",
                norm=norm,
                seed=seed,
                placement=placement,
                rate=rate,
                summary={
                    "test/acc": v,
                    "train_subset/acc": v + 0.01,
                    "train/epoch_acc": v - 0.05,
                    "bn/conv2/dropout_var_shift": 0.8,
                    "bn/dense1/dropout_var_shift": 0.6,
                },
                spec=DROPOUT_SPEC,
            )
    a = analyse_dir("dropout", root)
    gain, inter = a.comparisons.to_dict("records")
    with_bn = ("before_relu", "before_classifier")
    d, lo, hi, _ = paired_by_hand(acc[(*with_bn, 0.5)], acc[(*with_bn, 0.0)])
    assert (gain["estimate"], gain["ci_low"], gain["ci_high"]) == pytest.approx((d, lo, hi))
    assert gain["verdict"] == "supported"  # the gain is shown below the 0.005 margin
    assert gain["margin_reason"].startswith("the claim's own bound")
    groups = [
        np.array(acc[k])
        for k in [
            ("before_relu", "after_block", 0.5),
            ("before_relu", "before_classifier", 0.5),
            ("none", "after_block", 0.5),
            ("none", "before_classifier", 0.5),
        ]
    ]
    per_seed = groups[0] - groups[1] - groups[2] + groups[3]  # the interaction contrast of each seed
    half = T975_DF2 * per_seed.std(ddof=1) / math.sqrt(3)
    assert inter["estimate"] == pytest.approx(per_seed.mean())
    assert (inter["ci_low"], inter["ci_high"]) == pytest.approx((per_seed.mean() - half, per_seed.mean() + half))
    assert inter["verdict"] == "supported" and a.verdict == "supported"
    shift = a.summary.query("metric == 'bn/*/dropout_var_shift'")["mean"]
    assert shift.tolist() == pytest.approx([0.7] * len(shift))  # mean over the BN layers
    # gen_gap = train_subset/acc - test/acc (inference mode), not the epoch's training accuracy (-0.05 here)
    gap = a.summary.query("metric == 'gen_gap'")["mean"]
    assert gap.tolist() == pytest.approx([0.01] * len(gap))


def test_smoothness_mean_over_training_is_compared_per_learning_rate(tmp_path):
    root = tmp_path / "runs"
    for lr in (0.01, 0.1):
        for seed in range(3):
            for norm, level in [("before_relu", 1.0), ("none", 5.0)]:
                jitter = seed / 100 * (1 if norm == "none" else 3)  # per-seed differences vary across seeds
                recs = [
                    {
                        "step": s,
                        "epoch": s / 30,
                        "smooth/beta_eff": level * lr * 10 + jitter + s / 10,
                        "smooth/loss_range": level,
                        "smooth/grad_pred": level + jitter,
                    }
                    for s in (10, 20, 30)
                ]
                write_run(
                    root,
                    study="smoothness",
                    norm=norm,
                    seed=seed,
                    lr=lr,
                    summary={"test/acc": 0.9},
                    records=recs,
                    spec=SMOOTH_SPEC,
                )
    a = analyse_dir("smoothness", root)
    beta = a.comparisons[a.comparisons["metric"] == "mean(smooth/beta_eff)"]
    assert sorted(beta["context"]) == ["lr=0.01", "lr=0.1"]
    frame = a.frames["mean(smooth/beta_eff)"][0]
    one = frame[(frame["model.norm"] == "none") & (frame["optimizer.lr"] == 0.1) & (frame["seed"] == 2)]
    assert one["mean(smooth/beta_eff)"].item() == pytest.approx(np.mean([5 + 2 / 100 + s / 10 for s in (10, 20, 30)]))
    row = beta[beta["context"] == "lr=0.1"].iloc[0]
    assert row["estimate"] == pytest.approx(1.0 - 5.0 + 0.02) and row["verdict"] == "supported"
    # zero spread in loss_range: a zero-width interval is no evidence, so inconclusive (changed rule: it used
    # to count as supported), and the claim cannot be supported as a whole
    lr_rows = a.comparisons[a.comparisons["metric"] == "mean(smooth/loss_range)"]
    assert (lr_rows["ci_low"] == lr_rows["ci_high"]).all() and lr_rows["ci_low"].tolist() == pytest.approx([-4.0] * 2)
    assert set(lr_rows["verdict"]) == {"inconclusive"} and lr_rows["note"].str.contains("no variation").all()
    assert a.verdict == "inconclusive"


def trend_runs(root: Path, spec: dict, slope_of_seed, norms=("before_relu",), diverged=()) -> dict:
    """KL = 2 * b ** slope per (norm, seed), with a small wiggle so the per-seed fit is not exact; the runs
    `diverged` names as (norm, seed, batch size) diverged without a KL."""
    truth = {}
    for norm in norms:
        for seed in range(4):
            slope = slope_of_seed(norm, seed)
            for i, bs in enumerate((2, 8, 32, 128)):
                kl = 2.0 * bs**slope * (1.0 + 0.05 * (-1) ** (i + seed))
                failed = (norm, seed, bs) in diverged
                write_run(
                    root,
                    study="batch_size",
                    norm=norm,
                    seed=seed,
                    batch_size=bs,
                    lr=0.05 * bs / 128,
                    status="diverged" if failed else "done",
                    summary={"test/acc": None, "disc/kl": None} if failed else {"test/acc": 0.9, "disc/kl": kl},
                    spec=spec,
                )
                truth.setdefault((norm, seed), []).append((bs, kl))
    return truth


def fitted_slope(points) -> float:
    x, y = np.log10([p[0] for p in points]), np.log10([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def test_trend_is_the_mean_per_seed_slope_over_the_whole_axis_with_a_t_interval(tmp_path):
    spec = {
        "claim": "x.",
        "metrics": ["disc/kl"],
        "heavy_tailed": ["disc/kl"],
        "compare": [{"metric": "disc/kl", "trend": "train.batch_size", "logy": True, "expect": "less"}],
    }
    truth = trend_runs(tmp_path / "runs", spec, lambda norm, seed: -0.5 - 0.05 * seed)
    a = analyse_dir("batch_size", tmp_path / "runs")
    (row,) = a.comparisons.to_dict("records")  # the lr moves with the batch size: not a context
    slopes = np.array([fitted_slope(truth["before_relu", s]) for s in range(4)])
    half = stats.t.ppf(0.975, 3) * slopes.std(ddof=1) / 2
    assert row["estimate"] == pytest.approx(slopes.mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((slopes.mean() - half, slopes.mean() + half))
    assert row["context"] == "all runs" and row["n"] == "4 of 4 seeds" and row["verdict"] == "supported"
    assert "slope of log10 disc/kl vs log10 train.batch_size" in row["comparison"]
    table = wide_tables(a)["runs"]
    assert table["disc/kl"].str.startswith("median ").all()  # heavy-tailed: the median leads


def test_trend_difference_of_two_arms_is_paired_and_a_seed_missing_a_point_is_dropped(tmp_path):
    spec = {
        "claim": "x.",
        "metrics": ["disc/kl"],
        "compare": [
            {
                "metric": "disc/kl",
                "trend": "train.batch_size",
                "logy": True,
                "expect": "less",
                "a": {"model.norm": "before_relu"},
                "b": {"model.norm": "after_relu"},
            }
        ],
    }
    root = tmp_path / "runs"
    truth = trend_runs(
        root,
        spec,
        lambda norm, seed: (-1.0 if norm == "before_relu" else -0.3) + 0.02 * seed,
        norms=("before_relu", "after_relu"),
    )
    write_run(
        root,
        study="batch_size",
        norm="after_relu",
        seed=9,
        batch_size=2,
        lr=0.05 * 2 / 128,
        summary={"test/acc": 0.9, "disc/kl": 1.0},
        spec=spec,
    )  # a seed with one point: no slope
    a = analyse_dir("batch_size", root)
    (row,) = a.comparisons.to_dict("records")
    d = [fitted_slope(truth["before_relu", s]) - fitted_slope(truth["after_relu", s]) for s in range(4)]
    assert row["estimate"] == pytest.approx(np.mean(d)) and row["method"] == "paired (4 seeds)"
    assert row["n"] == "4 of 4 seeds / 4 of 5 seeds"


@pytest.mark.parametrize(
    "expect, failed_arm", [("less", "before_relu"), ("less", "after_relu"), ("greater", "after_relu")]
)
def test_a_seed_whose_run_failed_in_a_probe_trend_counts_against_the_claim_not_dropped(tmp_path, expect, failed_arm):
    """A diverged run has no KL: its seed's slope is the one against the claim, for either arm and direction,
    so a failure never helps the claim (dropping the seed could), and the rank test decides."""
    comp = {"metric": "disc/kl", "trend": "train.batch_size", "logy": True, "expect": expect}
    spec = {
        "claim": "x.",
        "metrics": ["disc/kl"],
        "compare": [{**comp, "a": {"model.norm": "before_relu"}, "b": {"model.norm": "after_relu"}}],
    }
    root = tmp_path / "runs"
    trend_runs(
        root,
        spec,
        lambda norm, seed: (-1.0 if norm == "before_relu" else -0.3) + 0.02 * seed,
        norms=("before_relu", "after_relu"),
        diverged={(failed_arm, 0, 2)},
    )
    (row,) = analyse_dir("batch_size", root).comparisons.to_dict("records")
    assert row["method"] == "signed-rank (4 seeds)", row
    failed_side = 0 if failed_arm == "before_relu" else 1
    assert row["n"].split(" / ")[failed_side] == "4 of 4 seeds (1 with a failed run: against the claim)"
    # the failed seed's contrast sits at the end of the interval that opposes the claim
    assert (row["ci_high"] == np.inf) if expect == "less" else (row["ci_low"] == -np.inf)
