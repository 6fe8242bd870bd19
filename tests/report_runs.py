"""Synthetic run folders with known values for the analysis tests: one writer (bnstudy's own run-folder
writer), the placement grid and the report blocks of the mechanics tests, and the statistics written out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

from bnstudy.analysis.analyse import analyse
from bnstudy.analysis.load import load_local
from bnstudy.app import runs as runs_lib

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
    fingerprint="0123456789ab",
    depth=None,
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
            **({} if depth is None else {"depth": depth}),
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
        "code_fingerprint": fingerprint,
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


def placement_runs(root: Path, values=PLACEMENT, depth=None) -> Path:
    for norm, accs in values.items():
        for seed, acc in enumerate(accs):
            curve = [{"step": 10 * e, "epoch": float(e), "test/acc": acc - 0.02 * (3 - e)} for e in (1, 2, 3)]
            summary = {"test/acc": acc, "test/loss": 1 - acc, "train/epoch_acc": acc + 0.01}
            write_run(root, norm=norm, seed=seed, summary=summary, records=curve, depth=depth)
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
    return analyse(study, load_local(root), **kw)


# A layer-mean comparison (`*` in its metric): conv0's per-seed difference positive, conv1's negative.
LAYER_SPEC = {
    "claim": "BN lowers the internal covariate shift.",
    "metrics": ["median(ics/*/rel)", "test/acc"],
    "compare": [
        {
            "metric": "median(ics/*/rel)",
            "a": {"model.norm": "before_relu"},
            "b": {"model.norm": "none"},
            "expect": "less",
        }
    ],
}
LAYER_VALUES = {  # (norm, layer) -> per-seed value of each run's median over its probes after step 0
    ("before_relu", "conv0"): [0.5, 0.7, 0.6, 0.9],
    ("none", "conv0"): [0.2, 0.3, 0.5, 0.4],
    ("before_relu", "conv1"): [0.1, 0.2, 0.15, 0.3],
    ("none", "conv1"): [0.6, 0.5, 0.9, 0.7],
}


def layer_runs(root: Path) -> Path:
    """Four seeds per norm; each run logs ics/<layer>/rel at three probes whose median (after step 0) is the
    run's LAYER_VALUES entry (the step-0 probe, 100, must not count)."""
    for norm in ("before_relu", "none"):
        for seed in range(4):
            records = [{"step": 0, **{f"ics/{layer}/rel": 100.0 for layer in ("conv0", "conv1")}}]
            for step, shift in ((5, -0.05), (10, 0.0), (15, 0.05)):
                values = {f"ics/{layer}/rel": LAYER_VALUES[(norm, layer)][seed] + shift for layer in ("conv0", "conv1")}
                records.append({"step": step, **values})
            summary = {"test/acc": 0.9 + 0.01 * seed}
            write_run(root, study="layers", norm=norm, seed=seed, summary=summary, records=records, spec=LAYER_SPEC)
    return root
