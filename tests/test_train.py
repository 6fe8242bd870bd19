"""The Hydra app end to end on mocked TFDS, or on small generated images where what the app does with the data is
under test: run folders, wandb offline files, sweeps, packs, bad input."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from conftest import imports_tensorflow


def run_folders(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/summary.json"))


def read_summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@imports_tensorflow
def test_default_job_writes_a_complete_run_folder_and_offline_wandb_run(mock_tfds, run_app):
    out = run_app("logger.wandb.mode=offline", "logger.wandb.tags=[smoke]", "model.norm=after_relu")
    (folder,) = run_folders(out)
    assert folder.parent.name == "default"
    summary = read_summary(folder)
    assert summary["status"] == "done"
    for key in (
        "train/epoch_loss",
        "train/epoch_acc",
        "test/loss",
        "test/acc",
        "examples_per_s",
        "compile_time",
        "wall_time",
        "step_time",
        "git_sha",
        "code_fingerprint",
        "packages",
        "device",
        "epochs",
    ):
        assert key in summary, key
    assert summary["num_test"] == 256  # from the data, not hard-coded
    assert summary["packages"]["jax"] and summary["device"]["backend"] == "cpu"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["norm"] == "after_relu" and config["train"]["batch_size"] == 32
    metrics = read_metrics(folder)
    assert [m["step"] for m in metrics if "train/loss" in m] == [2, 3]
    assert "test/acc" in metrics[-1] and metrics[-1]["epoch"] == 1.0
    (wandb_run,) = list((folder / "wandb").glob("offline-run-*"))
    assert list(wandb_run.glob("run-*.wandb")), "wandb offline run file missing"


@pytest.mark.slow  # tests/test_experiments.py's quick placement study runs this three-job sweep and more
def test_multirun_over_placements_gives_three_folders(small_data, run_app):
    out = run_app("-m", "model.norm=none,before_relu,after_relu")
    folders = run_folders(out)
    norms = sorted(yaml.safe_load((f / "config.yaml").read_text())["model"]["norm"] for f in folders)
    assert norms == ["after_relu", "before_relu", "none"]
    assert all(read_summary(f)["status"] == "done" for f in folders)


def test_packed_job_writes_one_folder_per_model_with_distinct_configs(small_data, run_app):
    out = run_app(
        "optimizer.lr=[0.01,0.1]",
        "model.init_scale=[0.5,2]",
        "seed=[0,1]",
        "train.pack_size=3",
        "train.max_steps_per_epoch=1",
        "train.eval_batch_size=256",
    )
    folders = run_folders(out)
    assert len(folders) == 8
    configs = {
        (c["optimizer"]["lr"], c["model"]["init_scale"], c["seed"])
        for c in (yaml.safe_load((f / "config.yaml").read_text()) for f in folders)
    }
    assert len(configs) == 8
    summaries = [read_summary(f) for f in folders]
    assert len({s["run_id"] for s in summaries}) == 8
    assert {s["pack"]["size"] for s in summaries} == {3, 2}  # 2 packs of 3, the last of 2 (padded to 3)


def test_diverging_run_ends_with_status_diverged(small_data, run_app):
    out = run_app("model.norm=none", "optimizer.lr=1e6", "train.max_steps_per_epoch=4", "train.epochs=2")
    (folder,) = run_folders(out)
    summary = read_summary(folder)
    assert summary["status"] == "diverged" and summary["diverged_step"] >= 0
    assert summary["test/acc"] is None
    assert summary["epochs_trained"] == 1 < summary["epochs"]  # stopped after the epoch it diverged in


def test_library_info_lines_are_silenced_and_warnings_kept():
    """orbax logs each checkpoint through absl at INFO (~30 lines), which Hydra's INFO console would print."""
    from bnstudy.app import main as train

    absl = logging.getLogger("absl")
    before = absl.level
    absl.setLevel(logging.INFO)  # as a fresh `python -m bnstudy.train` has it (setLevel clears the level cache)
    try:
        train.quiet_libraries()
        assert not absl.isEnabledFor(logging.INFO) and absl.isEnabledFor(logging.WARNING)
    finally:
        absl.setLevel(before)


def test_rerun_of_the_same_config_finds_and_replaces_its_folder(small_data, run_app):
    first = run_folders(run_app("seed=5"))
    second = run_folders(run_app("seed=5"))
    assert first == second and len(second) == 1


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.norm=middle", "model.norm"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=100000", "train.batch_size"),  # larger than the training split
        ("model.dropout.rate=1.5", "model.dropout.rate"),
        ("train.epochs=abc", "train.epochs"),
        ("model.norm=[none,after_relu]", "model.norm"),
        ("dataset.val_size=1.5", "dataset.val_size"),  # neither a fraction in (0, 1) nor a count
        ("dataset.val_size=256", "dataset.val_size"),  # the whole training split
    ],
)
@imports_tensorflow
def test_bad_input_exits_nonzero_with_a_clear_message_and_no_folder(
    mock_tfds, run_app, tmp_path, capsys, override, key
):
    with pytest.raises(SystemExit) as info:
        run_app(override)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"`{key}`" in err and ("must be" in err or "wrong type" in err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("set_data_dir", [True, False])
@imports_tensorflow
def test_missing_dataset_advises_only_options_not_already_set(run_app, tmp_path, capsys, monkeypatch, set_data_dir):
    from bnstudy.app import data

    data._load_numpy_cached.cache_clear()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
    extra = [f"dataset.data_dir={tmp_path / 'empty'}"] if set_data_dir else []
    with pytest.raises(SystemExit) as info:
        run_app("dataset=mnist", *extra)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'mnist" in err and "`dataset.download=true`" in err
    assert ("`dataset.data_dir=" in err) is not set_data_dir  # never suggests what the user already set
    assert "mnist_t10k" in err  # the offline alternative
    assert not (tmp_path / "out").exists()


def test_no_bn_run_logs_validation_and_training_subset_and_writes_trained_and_gen_gap(small_data, run_app):
    out = run_app("model.norm=none", "dataset.val_size=40", "discrepancy.train_subset=50")
    (folder,) = run_folders(out)
    summary = read_summary(folder)
    last = read_metrics(folder)[-1]
    for key in ("val/loss", "val/acc", "train_subset/loss", "train_subset/acc", "test/acc"):
        assert key in last and key in summary, key
    assert not any(k.startswith(("disc/", "bn/")) or k.endswith("_running") for k in summary)  # no BN: one mode
    assert summary["num_val"] == 40 and summary["num_train"] == 256 - 40
    assert summary["gen_gap"] == pytest.approx(summary["train_subset/acc"] - summary["test/acc"])
    from bnstudy.analysis import stats

    losses = [m["train/loss"] for m in read_metrics(folder) if "train/loss" in m]
    assert summary["trained"] == stats.is_trained(losses[0], losses[-1], summary["test/acc"], 10)


def test_bn_run_keeps_its_three_modes_beside_the_running_training_subset(small_data, run_app):
    out = run_app("model.norm=before_relu", "discrepancy.enabled=true", "discrepancy.train_subset=50")
    summary = read_summary(run_folders(out)[0])
    assert summary["train_subset/acc"] == summary["train_subset/acc_running"]
    assert "train_subset/acc_population" in summary and "val/acc" in summary
    assert summary["num_val"] == round(0.1 * 256)  # the default: 10% of the training split


def test_diverged_run_is_not_trained_and_has_no_gen_gap(small_data, run_app):
    out = run_app("model.norm=none", "optimizer.lr=1e6", "train.max_steps_per_epoch=4", "train.epochs=2")
    summary = read_summary(run_folders(out)[0])
    assert summary["status"] == "diverged" and summary["trained"] is False and summary["gen_gap"] is None


def test_the_closing_table_says_when_a_finished_run_did_not_train(caplog):
    from bnstudy.app import main as app

    common = {"name": "r", "test/acc": 0.103, "examples_per_s": 1.0, "path": "p"}
    runs = [{**common, "status": "done", "trained": False}, {**common, "status": "done", "trained": True}]
    skipped = [{**common, "status": "skipped: already done (train.rerun=true retrains)", "trained": False}]
    with caplog.at_level("INFO", logger="bnstudy"):
        app.print_table([*runs, {**common, "status": "diverged", "trained": False}], skipped)
    lines = caplog.text.splitlines()
    assert "r: done (NOT TRAINED: loss did not fall or accuracy at chance) test/acc=0.1030" in lines[0]
    assert "r: done test/acc=0.1030" in lines[1] and "r: diverged test/acc" in lines[2]
    assert "retrains) (NOT TRAINED" in lines[3]


def test_a_study_run_without_m_says_which_arm_it_trains_and_the_command_for_all(caplog, monkeypatch):
    from bnstudy.app import config as config_lib
    from bnstudy.app import main as app

    cfg = config_lib.parse({"dataset": {"name": "mnist_t10k"}, "study": "placement"})
    assert app.unswept_axes() == {}  # outside Hydra (and in a -m sweep): nothing to say
    monkeypatch.setattr(app, "unswept_axes", lambda: {"model.norm": "none,before_relu,after_relu"})
    with caplog.at_level("INFO", logger="bnstudy"):
        app.say_if_one_arm(cfg)
    (line,) = caplog.text.strip().splitlines()
    assert "without -m this job trains model.norm=before_relu only" in line
    assert "model.norm over none,before_relu,after_relu" in line and "`bnstudy-study placement`" in line
