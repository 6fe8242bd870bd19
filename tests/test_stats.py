"""bnstudy.analysis.stats: each rule against a hand-computed case or scipy's own test, the per-arm selection and the
`trained` rule on synthetic run folders, and a seeded simulation of the false-contradiction rate."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bnstudy.analysis import cli, stats
from bnstudy.analysis.analyse import analyse
from bnstudy.analysis.errors import ReportWarning
from bnstudy.analysis.load import load_local
from tests.report_runs import write_run

pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")

T975_DF2 = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom (statistical tables)


def seeded(values) -> pd.Series:
    return pd.Series(values, index=pd.Index(range(len(values)), name="seed"), dtype=float)


def contrast_from_interval(lo: float, hi: float, df: float = 4.0) -> stats.Contrast:
    """The Contrast whose 95% t-interval is [lo, hi]."""
    return stats.Contrast((lo + hi) / 2, (hi - lo) / 2 / sps.t.ppf(0.975, df), df, "test")


# ------------------------------------------------------------------------------------------- intervals


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    a, b = seeded([1.0, 2.0, 4.0]), seeded([0.5, 1.0, 2.5])  # differences 0.5, 1.0, 1.5: mean 1, sd 0.5
    c = stats.contrast([a, b], [1, -1])
    half = T975_DF2 * 0.5 / math.sqrt(3)
    assert c.method == "paired (3 seeds)" and c.df == 2
    assert (c.estimate, *c.interval()) == pytest.approx((1.0, 1.0 - half, 1.0 + half))
    ref = sps.ttest_rel(a, b)
    assert c.p_two_sided() == pytest.approx(ref.pvalue)
    assert c.interval() == pytest.approx(tuple(ref.confidence_interval(0.95)))


def test_different_seeds_fall_back_to_welch():
    a, b = seeded([1.0, 2.0, 4.0]), pd.Series([0.5, 1.0, 2.5], index=[3, 4, 5], dtype=float)
    c = stats.contrast([a, b], [1, -1])
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert c.method == "Welch" and c.p_two_sided() == pytest.approx(ref.pvalue)
    assert c.interval() == pytest.approx(tuple(ref.confidence_interval(0.95)))


def test_bounded_metrics_are_clipped_and_proportions_exact():
    assert stats.metric_bounds("test/acc") == (0, 1) and stats.metric_bounds("val/acc") == (0, 1)
    assert stats.metric_bounds("test/loss") is None and stats.metric_bounds("disc/acc_gap") is None
    assert stats.clip_to_bounds(-0.3, 1.9, "test/acc") == (0.0, 1.0)
    assert stats.clip_to_bounds(-0.3, 1.9, "test/loss") == (-0.3, 1.9)
    assert stats.proportion_interval(0, 3) == pytest.approx((0.0, 1 - 0.025 ** (1 / 3)))  # Clopper-Pearson, k = 0


# ------------------------------------------------------------------------------------- tests, verdicts


@pytest.mark.parametrize(
    "lo, hi, expect, margin, verdict",
    [
        (0.01, 0.05, "greater", 0.0, "supported"),
        (-0.05, -0.01, "greater", 0.0, "contradicted"),
        (-0.01, 0.05, "greater", 0.0, "inconclusive"),
        (-0.05, -0.01, "less", 0.0, "supported"),
        (0.001, 0.004, "less", 0.005, "supported"),  # a gain below the margin: "adds little"
        (0.006, 0.02, "less", 0.005, "contradicted"),
        (0.003, 0.02, "less", 0.005, "inconclusive"),
        (-0.003, 0.004, "greater", 0.005, "negligible"),  # inside +-0.005: the claimed gain is absent
        (-0.02, -0.008, "greater", 0.005, "contradicted"),  # the opposite, beyond the margin
        (-0.008, 0.004, "greater", 0.005, "inconclusive"),  # a gain of 0.005 ruled out, nothing else shown
        (-0.003, 0.004, "equivalent", 0.005, "supported"),
        (-0.003, 0.006, "equivalent", 0.005, "inconclusive"),
        (0.009, 0.02, "equivalent", 0.005, "contradicted"),  # either side shown beyond: p doubled
    ],
)
def test_one_comparison_is_decided_by_where_its_95_interval_lies(lo, hi, expect, margin, verdict):
    """With one comparison (no multiplicity), the Holm rule at 0.025 per direction is the 95%-interval rule
    (for contradicting an equivalence claim, the 97.5% one: next test)."""
    c = contrast_from_interval(lo, hi)
    p_support, p_contra, word = stats.one_sided_pvalues(c, expect, margin)
    verdicts, _, _ = stats.decide_family([p_support], [p_contra], [word])
    assert verdicts == [verdict]


def test_contradicting_an_equivalence_claim_needs_the_97_5_percent_interval():
    """The audit's case: estimate -0.147, 95% interval [-0.251, -0.044] (2 df), margin 0.005: beyond -0.005 at
    95% but not at 97.5%, so the doubled p leaves it inconclusive; a narrower interval contradicts it."""
    c = contrast_from_interval(-0.251, -0.044, df=2.0)
    assert c.interval()[1] < -0.005 < c.estimate + sps.t.ppf(0.9875, 2) * c.se
    _, p_contra, word = stats.one_sided_pvalues(c, "equivalent", 0.005)
    assert stats.decide_family([np.nan], [p_contra], [word])[0] == ["inconclusive"]
    narrow = contrast_from_interval(-0.20, -0.094, df=2.0)
    _, p_contra, word = stats.one_sided_pvalues(narrow, "equivalent", 0.005)
    assert stats.decide_family([np.nan], [p_contra], [word])[0] == ["contradicted"]


def test_tost_equals_scipy_one_sided_tests_on_the_differences():
    d = np.array([0.001, -0.002, 0.003, 0.0005, -0.0005])  # per-seed differences
    c = stats.contrast([seeded(d), seeded(np.zeros(5))], [1, -1])
    margin = 0.005
    lower = sps.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = sps.ttest_1samp(d, margin, alternative="less").pvalue
    assert stats.tost_pvalue(c, margin) == pytest.approx(max(lower, upper))
    p_support, _, _ = stats.one_sided_pvalues(c, "equivalent", margin)
    assert p_support == pytest.approx(max(lower, upper)) and p_support < 0.025
    # the same numbers show "greater than 0 by a difference that matters (0.005)" negligible, and say why
    _, p_contra, word = stats.one_sided_pvalues(c, "greater", margin)
    assert p_contra == pytest.approx(max(lower, upper)) and word == "negligible"
    assert "a difference inside +-0.005 is shown" in stats.why(c, "greater", margin, "negligible")


def test_holm_adjustment_over_k_comparisons_by_hand():
    # sorted 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> running max 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    got = stats.holm([np.nan, 0.01, 0.02])  # a comparison without a p-value is not in the family
    assert np.isnan(got[0]) and got[1:] == pytest.approx([0.02, 0.02])
    # one comparison supported alone is not supported among three when its adjusted p passes 0.025
    verdicts, _, _ = stats.decide_family([0.02, 0.5, 0.5], [0.98, 0.5, 0.5])
    assert verdicts[0] == "inconclusive" and stats.decide_family([0.02], [0.98])[0] == ["supported"]


def test_zero_spread_is_no_evidence():
    a, b = seeded([2.0, 2.0, 2.0]), seeded([1.0, 1.0, 1.0])
    c = stats.contrast([a, b], [1, -1])
    assert c.se == 0 and c.interval() == (1.0, 1.0)
    p_support, p_contra, _ = stats.one_sided_pvalues(c, "greater", 0.0)
    assert np.isnan(p_support) and np.isnan(p_contra)
    verdicts, _, _ = stats.decide_family([p_support], [p_contra])
    assert verdicts == ["inconclusive"] and "no variation" in stats.why(c, "greater", 0.0, "inconclusive")


def test_overall_verdict_is_an_intersection_of_the_comparisons():
    assert stats.overall(["supported", "supported"]) == "supported"
    assert stats.overall(["supported", "inconclusive"]) == "inconclusive"
    assert stats.overall(["supported", "contradicted", "inconclusive"]) == "contradicted"
    assert stats.overall(["supported", "negligible", "inconclusive"]) == "negligible"
    assert stats.overall(["negligible", "contradicted"]) == "contradicted"
    assert stats.overall(["supported", "depends"]) == "depends"
    assert stats.overall([]) == "inconclusive"


def false_contradiction_rate(studies: int, comparisons: int, seeds: int, rng: np.random.Generator) -> float:
    """Share of simulated studies with no true effect (paired seeds) that come out contradicted."""
    expects = ["greater", "less"] * comparisons
    hits = 0
    for _ in range(studies):
        seed_effect = rng.normal(size=(comparisons, 1, seeds))  # shared by both arms: what pairing removes
        values = seed_effect + rng.normal(scale=0.5, size=(comparisons, 2, seeds))
        p_support, p_contra, _ = zip(
            *(
                stats.one_sided_pvalues(stats.contrast([pd.Series(v[0]), pd.Series(v[1])], [1, -1]), e, 0.0)
                for v, e in zip(values, expects)
            )
        )
        verdicts, _, _ = stats.decide_family(p_support, p_contra)
        hits += stats.overall(verdicts) == "contradicted"
    return hits / studies


def test_no_true_effect_is_rarely_contradicted_in_a_nine_comparison_study():
    rate = false_contradiction_rate(studies=2000, comparisons=9, seeds=3, rng=np.random.default_rng(0))
    # Holm at 0.025 per direction bounds it by 0.025; 2000 studies put the estimate within ~0.007 of the truth
    assert rate <= 0.05, rate
    assert rate > 0.0  # the simulation can produce contradictions at all


# ------------------------------------------------------------------------------------------- run rules


@pytest.mark.parametrize(
    "first, final, acc, trained",
    [
        (2.30, 0.20, 0.95, True),
        (2.30, 2.10, 0.95, False),  # 2.10 >= 0.9 x 2.30 = 2.07: the loss did not fall
        (2.30, 2.05, 0.95, True),  # 2.05 < 2.07
        (2.30, 0.20, 0.15, False),  # chance 0.1 + 0.05: not above it
        (2.30, 0.20, 0.16, True),
        (None, None, 0.113, False),  # only the accuracy known (the no-BN CNN at lr 0.1 sits at chance)
        (2.30, 2.30, None, False),
        (None, None, None, True),  # nothing to judge by: not held against the run
    ],
)
def test_trained_rule(first, final, acc, trained):
    assert stats.is_trained(first, final, acc, num_classes=10) is trained


def test_gen_gap_is_train_subset_accuracy_minus_test_accuracy():
    assert stats.gen_gap([0.99, 0.90], [0.97, 0.91]) == pytest.approx([0.02, -0.01])


# ------------------------------------------------------------------------------------ on run folders

SELECT_SPEC = {
    "claim": "BN before the ReLU beats no BN at each arm's own learning rate.",
    "metrics": ["test/acc", "diverged"],
    "select": {"by": "val/acc", "over": ["optimizer.lr"]},
    "compare": [
        {
            "metric": "test/acc",
            "a": {"model.norm": "before_relu"},
            "b": {"model.norm": "none"},
            "expect": "greater",
            "margin": 0.005,
            "margin_reason": "half an accuracy point",
        }
    ],
}
# (norm, lr) -> per seed (val/acc, test/acc); lr 0.01 of before_relu has the best TEST accuracy, lr 0.1 the best
# validation accuracy: selection must take 0.1. The no-BN arm does not learn at lr 0.1 (chance).
SELECT_RUNS = {
    ("before_relu", 0.01): [(0.960, 0.990), (0.962, 0.991), (0.961, 0.992)],
    ("before_relu", 0.1): [(0.980, 0.975), (0.982, 0.978), (0.981, 0.976)],
    ("none", 0.01): [(0.950, 0.940), (0.952, 0.945), (0.951, 0.941)],
    ("none", 0.1): [(0.110, 0.113), (0.110, 0.113), (0.110, 0.113)],
}


# The confirmation phase: each arm at its selected lr on seeds 100-102, never a selection seed; a confirmation
# run at an lr its arm did not select (the last entry) is left out.
CONFIRM_RUNS = {
    ("before_relu", 0.1): [(0.979, 0.977), (0.980, 0.979), (0.978, 0.975)],
    ("none", 0.01): [(0.949, 0.941), (0.950, 0.944), (0.948, 0.938)],
    ("before_relu", 0.01): [(0.99, 0.999)],
}


def select_runs(root, spec=SELECT_SPEC, confirm=CONFIRM_RUNS):
    for first_seed, runs in ((0, SELECT_RUNS), (100, confirm)):
        for (norm, lr), values in runs.items():
            for seed, (val, test) in enumerate(values, start=first_seed):
                records = [{"step": 5, "epoch": 0.5, "train/loss": 2.3}, {"step": 10, "epoch": 1.0, "train/loss": 0.3}]
                write_run(
                    root,
                    study="select",
                    norm=norm,
                    seed=seed,
                    lr=lr,
                    spec=spec,
                    records=records,
                    summary={"val/acc": val, "test/acc": test, "train/loss": 2.25 if test < 0.2 else 0.3},
                )
    return root


def test_per_arm_selection_chooses_on_validation_and_confirms_on_other_seeds(tmp_path):
    with pytest.warns(ReportWarning, match="1 confirmation-seed run"):
        a = analyse("select", load_local(select_runs(tmp_path / "runs")))
    chosen = a.selection[a.selection["selected"]].set_index("model.norm")["optimizer.lr"].to_dict()
    assert chosen == {"before_relu": 0.1, "none": 0.01}
    assert a.phases.seeds == [0, 1, 2] and a.phases.confirmation_seeds == [100, 101, 102]
    not_learning = a.selection.query("`model.norm` == 'none' and `optimizer.lr` == 0.1").iloc[0]
    # a run that did not learn counts in its setting's score at its real validation accuracy
    assert (not_learning["runs"], not_learning["trained"], not_learning["n"]) == (3, 0, 3)
    assert not_learning["mean val/acc"] == pytest.approx(0.110)
    (row,) = a.comparisons.to_dict("records")
    test_a = [t for _, t in CONFIRM_RUNS[("before_relu", 0.1)]]  # the confirmation runs alone decide
    test_b = [t for _, t in CONFIRM_RUNS[("none", 0.01)]]
    assert (row["mean_a"], row["mean_b"]) == pytest.approx((np.mean(test_a), np.mean(test_b)))
    d = np.subtract(test_a, test_b)
    half = T975_DF2 * d.std(ddof=1) / math.sqrt(3)
    assert (row["estimate"], row["ci_low"], row["ci_high"]) == pytest.approx(
        (d.mean(), d.mean() - half, d.mean() + half)
    )
    assert row["method"] == "paired (3 seeds)" and row["verdict"] == "supported" and a.verdict == "supported"
    # the run that sits at chance is not_trained: out of the means, in the failure rate
    assert (a.runs["status"] == "not_trained").sum() == 3
    selection_phase = "table.str.startswith('selection phase') and `model.norm` == 'none'"
    rate = a.summary.query(f"metric == 'diverged' and {selection_phase}")
    assert rate.set_index("optimizer.lr")["mean"].to_dict() == {0.01: 0.0, 0.1: 1.0}
    acc = a.summary.query(f"metric == 'test/acc' and {selection_phase}")
    assert acc.set_index("optimizer.lr")["n"].to_dict() == {0.01: 3, 0.1: 0}


def test_report_shows_the_selection_table_interval_kind_and_margins(tmp_path):
    root = select_runs(tmp_path / "runs")
    out = tmp_path / "out"
    cli.main(["select", "--runs", str(root), "--out", str(out)])
    text = (out / "README.md").read_text()
    assert "Per-arm selection of optimizer.lr (on `val/acc`, never on the test split)" in text
    assert "**selected**" in text and "paired (3 seeds)" in text
    assert "family-wise level of 0.05" in text and "Holm" in text
    assert "margin 0.005 (half an accuracy point)" in text
    assert "not trained" in text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"select": {"by": "test/acc", "over": ["optimizer.lr"]}}, "never on the test split"),
        ({"select": {"by": "val/acc"}}, "must be {by: METRIC, over:"),
        ({"compare": [{**SELECT_SPEC["compare"][0], "margin_reason": None}]}, "needs a `margin_reason`"),
        ({"compare": [{**SELECT_SPEC["compare"][0], "expect": "equivalent", "margin": 0}]}, "needs a `margin` > 0"),
        ({"compare": [{**SELECT_SPEC["compare"][0], "expect": "bigger"}]}, "greater, less, equivalent"),
    ],
)
def test_bad_report_block_is_a_clear_error_with_exit_code_2(tmp_path, capsys, change, message):
    root = select_runs(tmp_path / "runs", {**SELECT_SPEC, **change})
    with pytest.raises(SystemExit) as e:
        cli.main(["select", "--runs", str(root), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gen_gap_is_missing_for_runs_without_train_subset_accuracy(tmp_path):
    root = tmp_path / "runs"
    spec = {"claim": "c", "metrics": ["gen_gap"]}
    for seed in range(2):
        write_run(
            root,
            study="gap",
            seed=seed,
            spec=spec,
            summary={"test/acc": 0.9, "train_subset/acc": 0.95 + seed / 100, "train/epoch_acc": 0.8},
        )
    write_run(root, study="gap", seed=2, spec=spec, summary={"test/acc": 0.9, "train/epoch_acc": 0.8})
    with pytest.warns(ReportWarning, match="1 finished run.* lack train_subset/acc"):
        a = analyse("gap", load_local(root))
    row = a.summary.query("metric == 'gen_gap'").iloc[0]
    assert (row["n"], row["mean"]) == (2, pytest.approx(0.055))
