"""bnstudy.report end to end on synthetic run folders: every output written, running, failed and unknown runs
listed, clear command-line errors, the index atop results/README.md, quick variants kept out of results/, and
no training stack imported."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from bnstudy.analysis import cli, per_layer
from bnstudy.analysis.index import INDEX_START
from bnstudy.analysis.load import load_local
from bnstudy.analysis.tables import fmt, margins_text
from bnstudy.analysis.write import write_report
from tests.report_runs import (
    LAYER_VALUES,
    PLACEMENT,
    PLACEMENT_SPEC,
    T975_DF2,
    analyse_dir,
    layer_runs,
    placement_runs,
    write_run,
)

# Synthetic runs log only what each test needs; the report's "no run has metric" warnings are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")


def test_running_and_failed_runs_are_listed_not_used(tmp_path):
    root = placement_runs(tmp_path / "runs")
    write_run(root, norm="none", seed=5, status="running")
    write_run(root, norm="after_relu", seed=6, status="failed", summary={"error": "RuntimeError: out of memory"})
    a = analyse_dir("placement", root)
    assert a.summary.query("metric == 'test/acc'")["runs"].sum() == 9
    out = write_report(a, load_local(root), tmp_path / "out", "python -m bnstudy.report placement")
    text = (out / "README.md").read_text()
    assert "running: `" in text and "mnist-cnn-none-lr0.1-bs128-s5-" in text
    assert "failed: `" in text and "out of memory" in text


def test_cli_writes_every_output(tmp_path, capsys):
    root = placement_runs(tmp_path / "outputs" / "placement")
    out = tmp_path / "results"
    cli.main(["placement", "--out-dir", str(tmp_path / "outputs"), "--out", str(out), "--data-note", "synthetic"])
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
        cli.main(["no_such_study", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown study 'no_such_study'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["placement", "--runs", str(tmp_path / "nothing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no runs directory" in err and "experiment=placement" in err


def test_cli_fails_clearly_when_nothing_finished(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, status="running")
    with pytest.raises(SystemExit):
        cli.main(["placement", "--runs", str(root), "--out", str(tmp_path / "out")])
    assert "none of the 1 run(s)" in capsys.readouterr().err


def test_cli_refuses_runs_of_another_study_or_of_none_naming_what_it_found(tmp_path, capsys):
    plain = tmp_path / "outputs" / "default"  # trained without experiment=: no study recorded
    for seed in range(3):
        write_run(plain, study=None, seed=seed, summary={"test/acc": 0.9}, spec=None)
    with pytest.raises(SystemExit) as e:
        cli.main(["placement", "--runs", str(plain), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not (tmp_path / "a").exists()
    assert "holds no run of study 'placement': found 3 run(s) trained without `experiment=`" in err
    assert len(err.strip().splitlines()) == 1
    runs = placement_runs(tmp_path / "runs")
    with pytest.raises(SystemExit) as e:
        cli.main(["dropout", "--runs", str(runs), "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "holds no run of study 'dropout': found 9 run(s) of study 'placement'" in (
        capsys.readouterr().err
    )


def test_cli_finds_the_run_folders_one_level_down_and_reads_only_its_study(tmp_path, capsys):
    out_dir = tmp_path / "outputs"
    placement_runs(out_dir / "placement")
    write_run(out_dir / "default", study=None, summary={"test/acc": 0.5}, spec=None)
    cli.main(["placement", "--runs", str(out_dir), "--out", str(tmp_path / "r"), "--no-wandb"])
    out, err = capsys.readouterr()
    assert "placement: supported (9 runs used)" in out and "corrupt" not in err
    assert "warning: ignoring 1 run(s) trained without `experiment=`" in err


def test_the_header_counts_only_the_runs_used(tmp_path, capsys):
    root = placement_runs(tmp_path / "runs")
    (next(root.glob("*-s0-*")) / "metrics.jsonl").unlink()
    cli.main(["placement", "--runs", str(root), "--out", str(tmp_path / "r"), "--no-wandb"])
    out, err = capsys.readouterr()
    assert "(8 runs used; 1 not finished)" in out and "counted as incomplete" in err
    assert (
        "Compute: 8 runs used (of 9 run folders; the others did not finish"
        in (tmp_path / "r" / "README.md").read_text()
    )


def test_the_readme_states_the_command_each_run_recorded_else_says_it_is_rebuilt(tmp_path):
    quick = "python -m bnstudy.train -m experiment=placement +preset=quick"
    root = tmp_path / "runs"
    for norm, accs in PLACEMENT.items():
        for seed, acc in enumerate(accs):
            write_run(root, norm=norm, seed=seed, summary={"test/acc": acc, "command": quick})
    out = write_report(analyse_dir("placement", root), load_local(root), tmp_path / "out", "report")
    text = (out / "README.md").read_text()
    assert f"    {quick}\n" in text and "train.epochs" not in text.split("## Claim")[0]
    legacy = placement_runs(tmp_path / "legacy")  # runs from before the command was recorded
    out = write_report(analyse_dir("placement", legacy), load_local(legacy), tmp_path / "out2", "report")
    assert "# rebuilt from the configs of 9 runs" in (out / "README.md").read_text()


def test_report_module_does_not_import_the_training_stack():
    code = (
        "import sys, bnstudy.report, bnstudy.analysis.cli; "
        "bad = {'jax', 'flax', 'hydra', 'tensorflow_datasets', 'tensorflow', 'wandb', 'bnstudy.train', 'bnstudy.app.main'} "
        "& set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_index_table_atop_results_readme_keeps_the_notes(tmp_path, capsys):
    results = tmp_path / "results"
    cli.main(["placement", "--runs", str(placement_runs(tmp_path / "runs")), "--out", str(results / "placement")])
    record = json.loads((results / "placement" / "verdict.json").read_text())
    assert record["verdict"] == "supported" and record["deciding"]["verdict"] == "supported"
    (results / "README.md").write_text("Notes on how these were made.\n")
    cli.main(["--index", str(results)])
    text = (results / "README.md").read_text()
    assert text.index(INDEX_START) < text.index("Notes on how these were made.")
    assert "| placement (mnist) |" in text and "**supported**" in text and "[CNN-2](placement/README.md)" in text
    assert record["network"] == "CNN-2"  # the tests' runs are the default 2-conv CNN
    deciding = record["deciding"]
    assert f"[{fmt(deciding['ci_low'])}, {fmt(deciding['ci_high'])}]" in text
    cli.main(["--index", str(results)])  # regenerating replaces the table, never duplicates it
    again = (results / "README.md").read_text()
    assert again == text and again.count(INDEX_START) == 1
    # A deep network's replication lands in results/<network>/<study>/: the same row, its own column.
    deep_runs = placement_runs(tmp_path / "deep_runs", depth=6)
    cli.main(["placement", "--runs", str(deep_runs), "--out", str(results / "cnn6" / "placement")])
    cli.main(["--index", str(results)])
    row = next(line for line in (results / "README.md").read_text().splitlines() if line.startswith("| placement"))
    assert "**supported** (CNN-6)" in row and "[CNN-6](cnn6/placement/README.md)" in row, row
    assert "[CNN-2](placement/README.md)" in row and "CNN-2: " in row and "CNN-6: " in row


def test_quick_variant_report_stays_out_of_results(tmp_path, capsys):
    spec = {**experiment_placement_spec(), "variant": "quick (2 seeds)"}
    runs = tmp_path / "out" / "quick" / "placement"
    for norm, accs in PLACEMENT.items():
        for seed, acc in enumerate(accs):
            write_run(runs, norm=norm, seed=seed, summary={"test/acc": acc}, spec=spec)
    with pytest.raises(SystemExit) as e:
        cli.main(["placement", "--runs", str(runs), "--out", "results/placement"])
    assert e.value.code == 2 and "results/ holds reports of full grids only" in capsys.readouterr().err
    cli.main(["placement", "--out-dir", str(tmp_path / "out" / "quick")])
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
    lines = margins_text(SimpleNamespace(spec=spec, dataset="mnist_t10k"))
    assert lines[0].startswith("- `disc/kl`: slope along train.batch_size, expect less; margin 0")
    assert lines[1] == "- `test/acc`: (norm=none) vs (norm=before_relu), expect less; margin 0.005 (half a point)"


def test_a_report_refuses_runs_of_two_networks_naming_them(tmp_path, capsys):
    runs = placement_runs(tmp_path / "runs")
    placement_runs(tmp_path / "runs", depth=6)  # the depth-6 CNN's runs trained into the same folder
    with pytest.raises(SystemExit) as e:
        cli.main(["placement", "--runs", str(runs), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "several networks: CNN-2, CNN-6" in err and not (tmp_path / "report").exists()


def test_a_report_refuses_runs_of_the_full_grid_and_its_quick_variant_naming_them(tmp_path, capsys):
    runs = placement_runs(tmp_path / "runs")
    quick = {**PLACEMENT_SPEC, "variant": "quick (2 seeds)"}
    for seed in (20, 21):  # quick runs trained into the same folder
        write_run(runs, norm="none", seed=seed, summary={"test/acc": 0.5}, spec=quick)
    with pytest.raises(SystemExit) as e:
        cli.main(["placement", "--runs", str(runs), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "several grid variants: default (" in err and "quick (2 seeds) (2 runs)" in err
    assert not (tmp_path / "report").exists()


def test_a_layer_mean_comparison_is_also_reported_layer_by_layer_with_its_paired_interval(tmp_path):
    root = layer_runs(tmp_path / "runs")
    a = analyse_dir("layers", root)
    out = write_report(a, load_local(root), tmp_path / "out", "python -m bnstudy.report layers")
    rows = pd.read_csv(out / "per_layer.csv")
    assert list(rows["layer"]) == ["conv0", "conv1"]
    assert list(rows["metric"]) == ["median(ics/conv0/rel)", "median(ics/conv1/rel)"]
    assert (rows["comparison"] == "(norm=before_relu) - (norm=none)").all() and (rows["context"] == "all runs").all()
    for _, row in rows.iterrows():
        bn, none = LAYER_VALUES[("before_relu", row["layer"])], LAYER_VALUES[("none", row["layer"])]
        d = np.subtract(bn, none)
        half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        expected = (d.mean(), d.mean() - half, d.mean() + half)
        assert (row["estimate"], row["ci_low"], row["ci_high"]) == pytest.approx(expected)
        assert row["method"].startswith("paired")
        assert (row["mean_a"], row["mean_b"]) == pytest.approx((np.mean(bn), np.mean(none)))
    assert rows.set_index("layer")["estimate"]["conv0"] > 0 > rows.set_index("layer")["estimate"]["conv1"]
    assert rows.set_index("layer")["ci_low"]["conv0"] > 0 > rows.set_index("layer")["ci_high"]["conv1"]
    text = (out / "README.md").read_text()
    section = text.split("### Per layer", 1)[1]
    assert "not part of the Holm family" in section and "median(ics/conv1/rel)" in section
    assert text.index("Margins (the smallest") < text.index("### Per layer")
    assert len(a.comparisons) == 1  # the layer rows are not comparisons: the Holm family keeps its one row
    record = json.loads((out / "verdict.json").read_text())["per_layer"]
    assert [(r["layer"], r["metric"]) for r in record] == [
        ("conv0", "median(ics/conv0/rel)"),
        ("conv1", "median(ics/conv1/rel)"),
    ]
    assert record[0]["estimate"] == pytest.approx(rows["estimate"][0]) and record[1]["ci_high"] < 0


def test_a_study_without_layer_means_has_no_per_layer_section_or_file(tmp_path):
    root = placement_runs(tmp_path / "runs")
    a = analyse_dir("placement", root)
    out = write_report(a, load_local(root), tmp_path / "out", "python -m bnstudy.report placement")
    assert a.per_layer.empty and not (out / "per_layer.csv").exists()
    assert "Per layer" not in (out / "README.md").read_text() and "per_layer.csv" not in (out / "README.md").read_text()
    assert json.loads((out / "verdict.json").read_text())["per_layer"] == []


def test_layers_are_named_from_the_logged_keys_in_network_order():
    keys = [
        "ics/*/rel",
        "ics/classifier/rel",
        "ics/conv10/rel",
        "ics/conv2/rel",
        "ics/dense1/rel",
        "ics/conv2/cos",
        "test/acc",
    ]
    assert per_layer.layer_key("log10(median(ics/*/rel))") == "ics/*/rel" and per_layer.layer_key("test/acc") is None
    assert per_layer.layer_names(keys, "ics/*/rel") == ["conv2", "conv10", "dense1", "classifier"]
    assert per_layer.layer_order(["zeta3", "zeta10", "conv1"]) == ["conv1", "zeta3", "zeta10"]
