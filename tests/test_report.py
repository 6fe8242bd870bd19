"""bnstudy.report on synthetic run folders with known values: aggregates, intervals and verdicts are the
hand-computed ones; diverged, running, failed and corrupt runs are counted, listed or skipped. Groups that hold
the same seeds are compared paired (t on per-seed differences); bnstudy.analysis.stats' own rules are in test_stats.py."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bnstudy.analysis import report
from bnstudy.analysis import stats as bstats
from bnstudy.analysis import study as analysis
from bnstudy.app import runs as runs_lib

# Synthetic runs log only what each test needs; the report's "no run has metric" warnings are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.study.ReportWarning")

T975_DF2 = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom (statistical tables)
T975_DF4 = 2.7764451051977987  # ... with 4 degrees of freedom


# The mechanics tests' own placement block (three directional comparisons, no lr selection), so that
# redesigning experiments/placement.yaml does not change what they check.
PLACEMENT_SPEC = {
    "title": "Where to put BN: before the ReLU, after it, or not at all",
    "claim": "BN placed before the ReLU trains better than BN placed after it, and both train better than no BN.",
    "source": 'Common advice following Ioffe & Szegedy (2015), who normalize the pre-activation x = Wu + b; Mishkin et al. (2017, "Systematic evaluation of CNN advances on the ImageNet", CaffeNet benchmarks) found BN after the ReLU slightly better.',
    "datasets": ["mnist", "cifar10"],
    "metrics": ["test/acc", "epochs_to_target", "test/loss", "train/epoch_acc"],
    "target_acc": {"mnist": 0.97, "cifar10": 0.6},
    "compare": [
        {
            "metric": "test/acc",
            "a": {"model.norm": "before_relu"},
            "b": {"model.norm": "after_relu"},
            "expect": "greater",
        },
        {"metric": "test/acc", "a": {"model.norm": "before_relu"}, "b": {"model.norm": "none"}, "expect": "greater"},
        {"metric": "test/acc", "a": {"model.norm": "after_relu"}, "b": {"model.norm": "none"}, "expect": "greater"},
    ],
    "figures": [
        {"name": "test_acc_by_norm", "x": "model.norm", "y": "test/acc"},
        {"name": "learning_curves_train_loss", "curve": "train/loss", "x": "step", "hue": "model.norm"},
        {"name": "learning_curves_test_acc", "curve": "test/acc", "x": "epoch", "hue": "model.norm"},
    ],
}


def write_run(
    root: Path,
    *,
    study="placement",
    norm="before_relu",
    seed=0,
    lr=0.1,
    init_scale=1.0,
    placement="none",
    rate=0.0,
    batch_size=128,
    status="done",
    summary=None,
    records=(),
    spec=PLACEMENT_SPEC,
):
    """One run folder written by bnstudy's own run-folder writer; status `running` leaves it open (this
    process is its live writer)."""
    config = {
        "dataset": {"name": "mnist", "data_dir": "/data", "download": False, "train_subset": None, "test_subset": None},
        "model": {
            "name": "cnn",
            "norm": norm,
            "bn_momentum": 0.9,
            "init_scale": init_scale,
            "dropout": {"placement": placement, "rate": rate},
        },
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 0.0},
        "train": {"batch_size": batch_size, "epochs": 3, "pack_size": "auto", "loop": "auto"},
        "logger": {"wandb": {"mode": "disabled", "tags": []}, "progress": False},
        "seed": seed,
        "out_dir": str(root.parent),
        "study": study,
        "report": spec,
    }
    run_id = runs_lib.run_id(config)
    start = {
        "run_id": run_id,
        "config_hash": runs_lib.config_hash(config),
        "study": study,
        "git_sha": "abc1234",
        "packages": {"jax": "0.10.2"},
        "device": {"backend": "cpu", "device_kind": "cpu"},
    }
    folder = runs_lib.RunFolder(root / run_id, config, start)
    for r in records:
        folder.log(r["step"], {k: v for k, v in r.items() if k != "step"})
    if status != "running":
        folder.finish({"status": status, "num_train": 8000, "num_test": 2000, "wall_time": 10.0, **(summary or {})})
    return folder.path


PLACEMENT = {
    "before_relu": [0.97, 0.98, 0.99],
    "after_relu": [0.945, 0.95, 0.96],
    "none": [0.80, 0.82, 0.84],
}


# Report blocks of the mechanics tests below, fixed here so that a change of a study's design (experiments/)
# does not change what these tests check.
LR_SPEC = {
    "claim": "BN allows larger learning rates.",
    "metrics": ["test/acc", "diverged", "log10_max_stable_lr"],
    "derived": {
        "log10_max_stable_lr": {
            "over": "optimizer.lr",
            "of": "test/acc",
            "reduce": "max_stable",
            "threshold": {"mnist": 0.5},
            "log10": True,
        }
    },
    "compare": [
        {
            "metric": "log10_max_stable_lr",
            "a": {"model.norm": "before_relu"},
            "b": {"model.norm": "none"},
            "expect": "greater",
        }
    ],
}
INIT_SPEC = {
    "claim": "BN makes accuracy insensitive to the init scale.",
    "metrics": ["test/acc", "acc_spread"],
    "derived": {"acc_spread": {"over": "model.init_scale", "of": "test/acc", "reduce": "range", "diverged_value": 0.1}},
    "compare": [
        {"metric": "acc_spread", "a": {"model.norm": "before_relu"}, "b": {"model.norm": "none"}, "expect": "less"}
    ],
}
DROPOUT_SPEC = {
    "claim": "With BN, dropout adds little, and dropout before BN hurts more than without BN.",
    "metrics": ["test/acc", "gen_gap", "bn/*/dropout_var_shift"],
    "compare": [
        {
            "metric": "test/acc",
            "a": {"model.dropout.rate": 0.5},
            "b": {"model.dropout.rate": 0.0},
            "where": {"model.norm": "before_relu", "model.dropout.placement": "before_classifier"},
            "expect": "less",
            "margin": {"mnist": 0.005, "cifar10": 0.01},
            "margin_reason": "the claim's own bound: at most 0.5 accuracy points on MNIST, 1 point on CIFAR-10",
        },
        {
            "metric": "test/acc",
            "a": {"model.dropout.placement": "after_block"},
            "b": {"model.dropout.placement": "before_classifier"},
            "where": {"model.norm": "before_relu", "model.dropout.rate": 0.5},
            "relative_to": {"model.norm": "none"},
            "expect": "less",
        },
    ],
}
SMOOTH_SPEC = {
    "claim": "BN smooths the loss landscape.",
    "metrics": ["mean(smooth/loss_range)", "mean(smooth/grad_pred)", "mean(smooth/beta_eff)", "test/acc"],
    "compare": [
        {
            "metric": f"mean(smooth/{k})",
            "a": {"model.norm": "before_relu"},
            "b": {"model.norm": "none"},
            "expect": "less",
        }
        for k in ("loss_range", "grad_pred", "beta_eff")
    ],
}
BATCH_SPEC = {
    "claim": "Small batches make BN's modes diverge.",
    "metrics": ["test/acc", "disc/kl", "disc/acc_gap"],
    "compare": [
        {"metric": "disc/kl", "a": {"train.batch_size": 8}, "b": {"train.batch_size": 128}, "expect": "greater"}
    ],
}


def placement_runs(root: Path, values=PLACEMENT) -> Path:
    for norm, accs in values.items():
        for seed, acc in enumerate(accs):
            curve = [{"step": 10 * e, "epoch": float(e), "test/acc": acc - 0.02 * (3 - e)} for e in (1, 2, 3)]
            summary = {"test/acc": acc, "test/loss": 1 - acc, "train/epoch_acc": acc + 0.01}
            write_run(root, norm=norm, seed=seed, summary=summary, records=curve)
    return root


def welch_by_hand(a, b):
    """Difference of means with the Welch-Satterthwaite t-interval, written out."""
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * se
    d = a.mean() - b.mean()
    return d, d - half, d + half, df


def paired_by_hand(a, b):
    """Mean of the per-seed differences with its t-interval (n - 1 degrees of freedom), written out."""
    d = np.asarray(a) - np.asarray(b)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half, len(d) - 1


def analyse_dir(study, root, **kw):
    return analysis.analyse(study, analysis.load_local(root), **kw)


# ------------------------------------------------------------------------------------------- statistics


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


# ---------------------------------------------------------------------------------------------- verdicts


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


def test_corrupt_folder_is_skipped_with_a_warning_and_listed(tmp_path):
    root = placement_runs(tmp_path / "runs")
    bad = root / "broken-run"
    bad.mkdir()
    (bad / "config.yaml").write_text("model: {norm: none}\n")
    (bad / "summary.json").write_text('{"status": "do')
    (root / "half-written").mkdir()
    with pytest.warns(analysis.ReportWarning) as warned:
        runs = analysis.load_local(root)
    messages = " ".join(str(w.message) for w in warned)
    assert "broken-run: summary.json is not JSON" in messages and "half-written: no config.yaml" in messages
    assert {Path(p).name for p, _ in runs.skipped} == {"broken-run", "half-written"}
    a = analysis.analyse("placement", runs)
    assert a.verdict == "supported" and len(a.runs) == 9


def test_running_and_failed_runs_are_listed_not_used(tmp_path):
    root = placement_runs(tmp_path / "runs")
    write_run(root, norm="none", seed=5, status="running")
    write_run(root, norm="after_relu", seed=6, status="failed", summary={"error": "RuntimeError: out of memory"})
    a = analyse_dir("placement", root)
    assert a.summary.query("metric == 'test/acc'")["runs"].sum() == 9
    out = report.write_report(a, analysis.load_local(root), tmp_path / "out", "python -m bnstudy.report placement")
    text = (out / "README.md").read_text()
    assert "running: `" in text and "mnist-cnn-none-lr0.1-bs128-s5-" in text
    assert "failed: `" in text and "out of memory" in text


# ------------------------------------------------------------------------------------------ other studies


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


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_every_output(tmp_path, capsys):
    root = placement_runs(tmp_path / "outputs" / "placement")
    out = tmp_path / "results"
    report.main(["placement", "--out-dir", str(tmp_path / "outputs"), "--out", str(out), "--data-note", "synthetic"])
    assert "placement: supported" in capsys.readouterr().out
    for name in (
        "summary.csv",
        "runs.csv",
        "comparisons.csv",
        "table.md",
        "table.tex",
        "README.md",
        "test_acc_by_norm.png",
        "test_acc_by_norm.svg",
        "learning_curves_test_acc.png",
    ):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "summary.csv")
    row = summary[(summary["metric"] == "test/acc") & (summary["model.norm"] == "none")].iloc[0]
    half = T975_DF2 * 0.02 / math.sqrt(3)
    assert (row["mean"], row["ci_low"], row["ci_high"]) == pytest.approx((0.82, 0.82 - half, 0.82 + half))
    text = (out / "README.md").read_text()
    assert "## Verdict: **supported**" in text and "Welch" in text and "synthetic" in text
    assert f"--out-dir {tmp_path / 'outputs'}" in text and "abc1234" in text
    assert "not the official mnist split" in text
    assert "\\begin{tabular}" in (out / "table.tex").read_text()
    assert root.is_dir()


def test_cli_rejects_unknown_study_and_missing_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["no_such_study", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown study 'no_such_study'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        report.main(["placement", "--runs", str(tmp_path / "nothing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no runs directory" in err and "experiment=placement" in err


def test_cli_fails_clearly_when_nothing_finished(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, status="running")
    with pytest.raises(SystemExit):
        report.main(["placement", "--runs", str(root), "--out", str(tmp_path / "out")])
    assert "none of the 1 run(s)" in capsys.readouterr().err


def test_wandb_failure_is_a_clear_error(monkeypatch):
    wandb = pytest.importorskip("wandb")

    def no_network(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "Api", no_network)
    with pytest.raises(analysis.ReportError, match="could not read wandb runs.*--source local"):
        analysis.load_wandb("me", "bnstudy", "placement")


def test_report_module_does_not_import_the_training_stack():
    code = (
        "import sys, bnstudy.report, bnstudy.analysis.study; "
        "bad = {'jax', 'flax', 'hydra', 'tensorflow_datasets', 'tensorflow', 'wandb', 'bnstudy.train', 'bnstudy.app.main'} "
        "& set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


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


# ------------------------------------------------------------------------------- study design features


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


def trend_runs(root: Path, spec: dict, slope_of_seed, norms=("before_relu",)) -> dict:
    """KL = 2 * b ** slope per (norm, seed), with a small wiggle so the per-seed fit is not exact."""
    truth = {}
    for norm in norms:
        for seed in range(4):
            slope = slope_of_seed(norm, seed)
            for i, bs in enumerate((2, 8, 32, 128)):
                kl = 2.0 * bs**slope * (1.0 + 0.05 * (-1) ** (i + seed))
                write_run(
                    root,
                    study="batch_size",
                    norm=norm,
                    seed=seed,
                    batch_size=bs,
                    lr=0.05 * bs / 128,
                    summary={"test/acc": 0.9, "disc/kl": kl},
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
    table = report.wide_tables(a)["runs"]
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
        with pytest.raises(analysis.ReportError, match=re.escape(words)):
            analysis.validate_spec({**base, **extra}, "s")


def test_mnist_margins_hold_for_the_embedded_digits():
    assert analysis.for_dataset({"mnist": 0.005, "cifar10": 0.01}, "mnist_t10k") == 0.005
    assert analysis.for_dataset({"mnist": 0.005, "mnist_t10k": 0.002}, "mnist_t10k") == 0.002
    assert analysis.for_dataset({"cifar10": 0.01}, "mnist_t10k") is None


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


def test_index_table_atop_results_readme_keeps_the_notes(tmp_path, capsys):
    results = tmp_path / "results"
    report.main(["placement", "--runs", str(placement_runs(tmp_path / "runs")), "--out", str(results / "placement")])
    record = json.loads((results / "placement" / "verdict.json").read_text())
    assert record["verdict"] == "supported" and record["deciding"]["verdict"] == "supported"
    (results / "README.md").write_text("Notes on how these were made.\n")
    report.main(["--index", str(results)])
    text = (results / "README.md").read_text()
    assert text.index(report.INDEX_START) < text.index("Notes on how these were made.")
    assert "| placement |" in text and "**supported**" in text and "[placement](placement/README.md)" in text
    deciding = record["deciding"]
    assert f"[{report.fmt(deciding['ci_low'])}, {report.fmt(deciding['ci_high'])}]" in text
    report.main(["--index", str(results)])  # regenerating replaces the table, never duplicates it
    again = (results / "README.md").read_text()
    assert again == text and again.count(report.INDEX_START) == 1


def test_quick_variant_report_stays_out_of_results(tmp_path, capsys):
    spec = {**experiment_placement_spec(), "variant": "quick (2 seeds)"}
    runs = tmp_path / "out" / "quick" / "placement"
    for norm, accs in PLACEMENT.items():
        for seed, acc in enumerate(accs):
            write_run(runs, norm=norm, seed=seed, summary={"test/acc": acc}, spec=spec)
    with pytest.raises(SystemExit) as e:
        report.main(["placement", "--runs", str(runs), "--out", "results/placement"])
    assert e.value.code == 2 and "results/ holds reports of full grids only" in capsys.readouterr().err
    report.main(["placement", "--out-dir", str(tmp_path / "out" / "quick")])
    assert (tmp_path / "out" / "quick" / "reports" / "placement" / "README.md").is_file()


def experiment_placement_spec() -> dict:
    return {
        "claim": "BN before the ReLU trains better than after it.",
        "metrics": ["test/acc"],
        "compare": [
            {"metric": "test/acc", "a": {"model.norm": "before_relu"}, "b": {"model.norm": "none"}, "expect": "greater"}
        ],
    }


def test_the_margins_section_words_a_trend_comparison_and_an_arm_comparison():
    from types import SimpleNamespace

    from bnstudy.analysis import report

    spec = {
        "compare": [
            {"metric": "disc/kl", "trend": "train.batch_size", "logx": True, "expect": "less"},
            {
                "metric": "test/acc",
                "a": {"model.norm": "none"},
                "b": {"model.norm": "before_relu"},
                "expect": "less",
                "margin": {"mnist": 0.005},
                "margin_reason": "half a point",
            },
        ]
    }
    lines = report.margins_text(SimpleNamespace(spec=spec, dataset="mnist_t10k"))
    assert lines[0].startswith("- `disc/kl`: slope along train.batch_size, expect less; margin 0")
    assert lines[1] == "- `test/acc`: (norm=none) vs (norm=before_relu), expect less; margin 0.005 (half a point)"
