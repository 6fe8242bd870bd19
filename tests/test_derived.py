"""bnstudy.analysis.derived on synthetic runs: diverged runs counted and never averaged, max_stable and range
per seed, epochs and steps to target, converged, and median()/step0()/log10() of logged keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.report_runs import (
    BATCH_SPEC,
    INIT_SPEC,
    LR_SPEC,
    analyse_dir,
    paired_by_hand,
    placement_runs,
    write_run,
)

# Synthetic runs log only what each test needs; the report's "no run has metric" warnings are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")


def test_diverged_run_is_counted_and_not_averaged(tmp_path):
    root = placement_runs(tmp_path / "runs")
    write_run(root, norm="before_relu", seed=7, status="diverged", summary={"test/acc": None, "diverged_step": 12})
    a = analyse_dir("placement", root)
    row = a.summary[(a.summary["metric"] == "test/acc") & (a.summary["model.norm"] == "before_relu")].iloc[0]
    assert (row["runs"], row["diverged"], row["n"]) == (4, 1, 3)
    assert row["mean"] == pytest.approx(0.98)
    # even a diverged run that still reports a number is not averaged in
    write_run(root, norm="none", seed=8, status="diverged", summary={"test/acc": 0.1})
    b = analyse_dir("placement", root)
    row = b.summary[(b.summary["metric"] == "test/acc") & (b.summary["model.norm"] == "none")].iloc[0]
    assert (row["diverged"], row["n"], row["mean"]) == (1, 3, pytest.approx(0.82))


def test_learning_rate_max_stable_lr_per_seed(tmp_path):
    root = tmp_path / "runs"
    # (norm, seed) -> largest lr that finished with acc >= 0.5; above it the run diverges
    largest = {
        ("before_relu", 0): 1.0,
        ("before_relu", 1): 1.0,
        ("before_relu", 2): 0.1,
        ("none", 0): 0.1,
        ("none", 1): 0.01,
        ("none", 2): 0.01,
    }
    for (norm, seed), top in largest.items():
        for lr in (0.01, 0.1, 1.0):
            ok = lr <= top
            write_run(
                root,
                study="learning_rate",
                norm=norm,
                seed=seed,
                lr=lr,
                status="done" if ok else "diverged",
                summary={"test/acc": 0.9 if ok else None},
                spec=LR_SPEC,
            )
    a = analyse_dir("learning_rate", root)
    dframe, dgrid = a.frames["log10_max_stable_lr"]
    assert dgrid == ["model.norm"]
    got = dframe.set_index(["model.norm", "seed"])["log10_max_stable_lr"].to_dict()
    assert got == pytest.approx({k: math.log10(v) for k, v in largest.items()})
    (row,) = a.comparisons.query("comparison == '(norm=before_relu) - (norm=none)'").to_dict("records")
    d, lo, hi, _ = paired_by_hand([0, 0, -1], [-1, -2, -2])
    assert (row["estimate"], row["ci_low"], row["ci_high"]) == pytest.approx((d, lo, hi))
    assert row["method"] == "paired (3 seeds)"
    div = a.summary.query("metric == 'diverged' and `model.norm` == 'none' and `optimizer.lr` == 1.0").iloc[0]
    assert (div["mean"], div["n"]) == (1.0, 3)  # divergence rate counts the diverged runs by definition
    assert (div["ci_low"], div["ci_high"]) == pytest.approx((0.025 ** (1 / 3), 1.0))  # Clopper-Pearson, k = n


def test_init_scale_spread_counts_diverged_runs_as_chance(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        for scale, acc in [(0.1, 0.95), (1.0, 0.97), (10.0, 0.96 - 0.01 * seed)]:
            write_run(
                root,
                study="init_scale",
                norm="before_relu",
                seed=seed,
                init_scale=scale,
                summary={"test/acc": acc},
                spec=INIT_SPEC,
            )
        for scale, acc in [(0.1, 0.90), (1.0, 0.97), (10.0, None)]:
            write_run(
                root,
                study="init_scale",
                norm="none",
                seed=seed,
                init_scale=scale,
                status="done" if acc else "diverged",
                summary={"test/acc": acc},
                spec=INIT_SPEC,
            )
    a = analyse_dir("init_scale", root)
    spread = a.frames["acc_spread"][0].set_index(["model.norm", "seed"])["acc_spread"]
    assert spread["none"].tolist() == pytest.approx([0.87, 0.87, 0.87])  # 0.97 - 0.1 (diverged = chance)
    assert spread["before_relu"].tolist() == pytest.approx([0.02, 0.02, 0.03])


def test_interpolated_max_stable_lr_is_continuous_per_seed(tmp_path):
    spec = {
        **LR_SPEC,
        "derived": {
            "log10_max_stable_lr": {
                **LR_SPEC["derived"]["log10_max_stable_lr"],
                "interpolate": True,
                "diverged_value": 0.1,
            }
        },
        "compare": [],
    }
    root = tmp_path / "runs"
    for seed, acc_at_1 in enumerate([0.3, 0.4]):  # both pass at 0.1, fall below 0.5 at 1.0
        for lr, acc in [(0.01, 0.9), (0.1, 0.9), (1.0, acc_at_1)]:
            write_run(root, study="learning_rate", seed=seed, lr=lr, summary={"test/acc": acc}, spec=spec)
    a = analyse_dir("learning_rate", root)
    got = a.frames["log10_max_stable_lr"][0].sort_values("seed")["log10_max_stable_lr"].tolist()
    # linear in log10 lr between (-1, 0.9) and (0, acc): where the accuracy crosses 0.5
    assert got == pytest.approx([-1 + (0.9 - 0.5) / (0.9 - 0.3), -1 + (0.9 - 0.5) / (0.9 - 0.4)])


def test_epochs_to_target_reads_the_learning_curves(tmp_path):
    root = tmp_path / "runs"
    for norm in ("before_relu", "none"):
        for seed in range(2):
            accs = [0.95, 0.975, 0.99] if norm == "before_relu" else [0.9, 0.93, 0.96]
            recs = [{"step": 10 * e, "epoch": float(e), "test/acc": acc} for e, acc in zip((1, 2, 3), accs)]
            write_run(root, norm=norm, seed=seed, summary={"test/acc": accs[-1]}, records=recs)
    a = analyse_dir("placement", root)
    e = a.summary.query("metric == 'epochs_to_target'").set_index("model.norm")
    assert (e.loc["before_relu", "mean"], e.loc["before_relu", "n"]) == (2.0, 2)
    assert e.loc["none", "n"] == 0  # never reached 0.97: not averaged in


def test_a_target_no_run_reached_is_said_as_such_not_as_a_missing_metric(tmp_path):
    from bnstudy.analysis.errors import ReportWarning

    root = tmp_path / "runs"
    for norm in ("before_relu", "none"):
        for seed in range(2):  # one quick epoch: short of the 0.97 target
            recs = [{"step": 10, "epoch": 1.0, "test/acc": 0.9 + 0.01 * seed}]
            write_run(root, norm=norm, seed=seed, summary={"test/acc": 0.9}, records=recs)
    with pytest.warns(
        ReportWarning, match=r"epochs_to_target: no run reached target_acc 0.97 on test/acc \(best 0.9100"
    ):
        a = analyse_dir("placement", root)
    assert "epochs_to_target" not in a.missing and "test/loss" in a.missing


def test_final_metric_missing_from_the_summary_is_read_from_the_last_logged_record(tmp_path):
    root = tmp_path / "runs"
    for bs, kl in [(8, [0.30, 0.32, 0.31]), (128, [0.010, 0.012, 0.011])]:
        for seed, v in enumerate(kl):
            recs = [
                {"step": 5, "epoch": 0.5, "disc/kl": 9.0},
                {"step": 10, "epoch": 1.0, "disc/kl": v, "test/acc": 0.9},
            ]
            write_run(
                root,
                study="batch_size",
                batch_size=bs,
                seed=seed,
                summary={"test/acc": 0.9},
                records=recs,
                spec=BATCH_SPEC,
            )
    a = analyse_dir("batch_size", root)
    kl = a.summary.query("metric == 'disc/kl'").set_index("train.batch_size")["mean"]
    assert kl.to_dict() == pytest.approx({8: 0.31, 128: 0.011})
    assert list(a.comparisons["verdict"]) == ["supported"]
    assert "disc/acc_gap" in a.missing  # named by the study, logged by no run


def test_median_after_step0_and_step0_apart_and_log10_of_it(tmp_path):
    root = tmp_path / "runs"
    spec = {
        "claim": "x.",
        "metrics": [
            "median(smooth/loss_range)",
            "step0(smooth/loss_range)",
            "mean(smooth/loss_range)",
            "log10(median(smooth/loss_range))",
        ],
        "compare": [
            {
                "metric": "log10(median(smooth/loss_range))",
                "a": {"model.norm": "before_relu"},
                "b": {"model.norm": "none"},
                "expect": "less",
            }
        ],
    }
    medians = {}
    for norm, level in [("before_relu", 0.1), ("none", 1.0)]:
        for seed in range(3):
            later = [level * (1 + seed / 10), level * 3, level * 2]  # median: level * 2
            recs = [{"step": 0, "smooth/loss_range": 72.0}] + [
                {"step": s, "smooth/loss_range": v} for s, v in zip((10, 20, 30), later)
            ]
            medians[norm, seed] = np.median(later)
            write_run(
                root, study="smoothness", norm=norm, seed=seed, summary={"test/acc": 0.9}, records=recs, spec=spec
            )
    a = analyse_dir("smoothness", root)
    frame = a.frames["median(smooth/loss_range)"][0].set_index(["model.norm", "seed"])
    assert frame["median(smooth/loss_range)"].to_dict() == pytest.approx(medians)
    assert (frame["step0(smooth/loss_range)"] == 72.0).all()
    none0 = frame.loc[("none", 0)]
    assert none0["mean(smooth/loss_range)"] == pytest.approx(np.mean([72.0, 1.0, 3.0, 2.0]))  # step 0 dominates
    row = a.comparisons.iloc[0]
    d = np.log10([medians["before_relu", s] for s in range(3)]) - np.log10([medians["none", s] for s in range(3)])
    assert row["estimate"] == pytest.approx(d.mean()) and row["estimate"] == pytest.approx(-1.0)


def test_steps_to_target_is_censored_and_converged_follows_the_stated_criterion(tmp_path):
    spec = {
        "claim": "x.",
        "metrics": ["steps_to_target", "reached_target", "converged"],
        "target_acc": {"mnist": 0.97},
        "convergence": {"key": "val/acc", "tolerance": 0.005},
        "compare": [],
    }
    root = tmp_path / "runs"
    curves = {"before_relu": [0.90, 0.975, 0.978], "none": [0.80, 0.90, 0.95]}
    for norm, accs in curves.items():
        recs = [{"step": 20 * (i + 1), "val/acc": v} for i, v in enumerate(accs)] + [{"step": 70, "train/loss": 0.1}]
        write_run(root, norm=norm, summary={"test/acc": accs[-1]}, records=recs, spec=spec)
    a = analyse_dir("placement", root)
    f = a.frames["steps_to_target"][0].set_index("model.norm")
    assert f.loc["before_relu", ["steps_to_target", "reached_target", "converged"]].tolist() == [40, 1, 1]
    assert f.loc["none", ["steps_to_target", "reached_target", "converged"]].tolist() == [60, 0, 0]  # censored
