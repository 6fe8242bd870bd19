"""Every bad value and failed write ends in one clear paragraph and a documented exit code, with no traceback and
nothing marked `done`: bad input (exit 2) through the real `python -m bnstudy.train`, a full disk (exit 3) on a
1 MB tmpfs, a damaged checkpoint, a finished folder missing a file, a killed re-run's staging folder, signals
(130/143 on every try), and Hydra's own flags with a chosen study."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_reliability import LONG, folders, start, summary, train, wait_for_logged_steps, write_done_result

from bnstudy.app import claims as claims_lib
from bnstudy.app import cli, plan, sweep_dirs
from bnstudy.app import data as data_lib
from bnstudy.app import runs as runs_lib
from bnstudy.app.config import ConfigError
from conftest import subprocess_env

pytestmark = pytest.mark.xdist_group("prepared_digits")


def bnstudy_train(tmp_path: Path, *args: str, timeout=120, **env) -> subprocess.CompletedProcess:
    """The app without training data prepared: the input is refused before any is needed."""
    return subprocess.run(
        [sys.executable, "-m", "bnstudy.train", *args],
        env=subprocess_env(TFDS_DATA_DIR=str(tmp_path / "tfds"), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def done_folder(tmp_path: Path, tfds_dir: Path) -> Path:
    """A finished run folder written by bnstudy's own writer (the schema registered for Hydra first)."""
    from bnstudy.app import config_tree

    config_tree.register(studies=[])
    return write_done_result(tmp_path / "out", tfds_dir)


def one_paragraph(stderr: str) -> str:
    """bnstudy's own lines of stderr (TF's import notices aside), checked to be one line and no traceback."""
    ours = [line for line in stderr.splitlines() if line.startswith("bnstudy")]
    assert "Traceback" not in stderr and len(ours) == 1, stderr[-3000:]
    return ours[0]


@pytest.mark.parametrize(
    "override, key, says",
    [
        ("out_dir=/proc/x", "out_dir", "creating it in /proc failed"),
        ("foo=1", "foo", "unknown key"),
        ("dataset.dropout=1", "dataset.dropout", "unknown key"),
        ("dataset=mnist", "dataset.data_dir", "which does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph_naming_the_key(tmp_path, override, key, says):
    args = [f"out_dir={tmp_path / 'out'}", "logger.wandb.mode=disabled", override]
    if override == "dataset=mnist":
        args.append(f"dataset.data_dir={tmp_path / 'missing'}")
    result = bnstudy_train(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_paragraph(result.stderr)
    assert f"`{key}`" in line and says in line, line
    assert "Variant folder" not in result.stderr and "AssertionError" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "args, shows",
    [
        (["experiment=placement", "--cfg", "job"], "study: placement"),
        (["--cfg", "job", "experiment=placement"], "study: placement"),
        (["experiment=placement", "--cfg", "all"], "hydra:"),
        (["--info", "experiment=placement"], "Defaults List"),
        (["experiment=placement", "--help"], "experiment: placement"),
    ],
)
def test_hydra_flags_work_with_a_chosen_study_in_either_order(tmp_path, args, shows):
    result = bnstudy_train(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shows in result.stdout and "Traceback" not in result.stderr
    if "--help" in args:  # the app's own opening lines, not Hydra's "main is powered by Hydra"
        assert result.stdout.startswith("bnstudy-train: train models") and "powered by Hydra" not in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_an_unwritable_compile_cache_dir_is_refused_up_front_and_null_is_no_cache(tmp_path):
    with pytest.raises(ConfigError, match=r"`compile_cache_dir` must be a folder .* creating it in /proc failed"):
        cli.check_paths(str(tmp_path), "/proc/x")
    cli.check_paths(str(tmp_path), None)
    cli.check_paths(str(tmp_path), str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # checked, not created


def test_a_sweep_leaves_no_sweep_folder_of_its_own_but_keeps_a_launchers_logs(tmp_path, run_app):
    with pytest.raises(SystemExit) as e:
        run_app("-m", "optimizer.lr=-1,0.1")  # bad input: refused in the first job
    assert e.value.code == 2
    (user_dir,) = tmp_path.glob("bnstudy-multirun-*")  # per user, under TMPDIR
    assert list(user_dir.iterdir()) == []  # the sweep folder (multirun.yaml, empty job folder) is gone
    (user_dir / "s" / ".submitit" / "1").mkdir(parents=True)
    (user_dir / "s" / ".submitit" / "1" / "log.out").write_text("a SLURM task's log")
    sweep_dirs._noted.add(user_dir / "s")
    sweep_dirs.remove_unused()
    assert (user_dir / "s" / ".submitit" / "1" / "log.out").is_file()


def test_multirun_flag_after_overrides_goes_first_for_hydra():
    args = ["optimizer.lr=[0.1,0.3]", "-m", "model.norm=none", "--info"]
    assert cli.hydra_arguments(args) == ["-m", "optimizer.lr=[0.1,0.3]", "model.norm=none", "--info"]


def test_a_validation_fraction_that_rounds_to_no_example_is_refused():
    with pytest.raises(ConfigError, match=r"`dataset.val_size`.*got 1e-05, which holds out 0 of them"):
        data_lib.validation_count(0.00001, 8000)
    assert data_lib.validation_count(0.0, 8000) == 0  # no validation split, as asked
    assert data_lib.validation_count(0.0002, 8000) == 2


def test_a_done_folder_missing_its_metrics_is_trained_again_and_reported_incomplete(tmp_path, tfds_dir, caplog):
    from bnstudy.analysis.load import load_local

    folder = done_folder(tmp_path, tfds_dir)
    run = runs_lib.read_run_folder(folder)
    assert claims_lib.finished_status(folder, run[1]["config_hash"]) == "done"
    (folder / "metrics.jsonl").unlink()
    assert claims_lib.finished_status(folder, run[1]["config_hash"]) is None
    assert claims_lib.finished_but_missing(folder, run[1]["config_hash"]) == ["metrics.jsonl"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_local(folder.parent)
    assert loaded.frame["status"].tolist() == ["incomplete"]
    assert any("metrics.jsonl is missing" in str(w.message) and str(folder) in str(w.message) for w in caught)
    from bnstudy.app import config as config_lib

    (again,) = config_lib.expand_pack(config_lib.parse(run[0]))
    with caplog.at_level("INFO", logger="bnstudy"):
        todo, skipped = plan.unfinished_runs([again], rerun=False)
    assert todo == [again] and skipped == []  # trained again, with the missing file named
    assert f"{folder}: finished, but metrics.jsonl is missing; training it again" in caplog.text


def test_a_truncated_summary_is_trained_again_with_a_line_saying_why(tmp_path, caplog):
    from bnstudy.app import config as config_lib

    (run,) = config_lib.expand_pack(config_lib.parse({"dataset": {"name": "mnist_t10k"}, "out_dir": str(tmp_path)}))
    folder = runs_lib.run_dir(run)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "summary.json").write_text('{"status": "do')
    with caplog.at_level("INFO", logger="bnstudy"):
        todo, skipped = plan.unfinished_runs([run], rerun=False)
    assert todo == [run] and skipped == []
    assert f"{folder}: summary.json is not JSON (" in caplog.text and "; training it again" in caplog.text


def test_a_killed_reruns_staging_folder_is_dropped_at_the_next_claim(tmp_path, tfds_dir):
    folder = done_folder(tmp_path, tfds_dir)
    staging = runs_lib.staging_dir(folder)
    (staging / "checkpoint").mkdir(parents=True)  # what a killed `train.rerun=true` leaves
    (staging / "summary.json").write_text("{}")
    config, _ = runs_lib.read_run_folder(folder)
    from bnstudy.app import config as config_lib

    (run,) = config_lib.expand_pack(config_lib.parse(config))
    claim = claims_lib.claim(run)  # a plain re-run: skipped as done, and the staging folder is gone
    assert claim.skip == "done" and not staging.exists() and summary(folder)["status"] == "done"


def test_a_killed_reruns_staging_folder_is_dropped_when_a_plain_rerun_skips_the_result(tmp_path):
    import filelock

    from bnstudy.app import config as config_lib

    (run,) = config_lib.expand_pack(config_lib.parse({"dataset": {"name": "mnist_t10k"}, "out_dir": str(tmp_path)}))
    final = runs_lib.run_dir(run)
    folder = runs_lib.RunFolder(final, config_lib.to_dict(run), {"config_hash": runs_lib.config_hash(run)})
    folder.finish({"status": "done"})
    staging = runs_lib.staging_dir(final)
    staging.mkdir()
    (staging / "metrics.jsonl").write_text("{}\n")  # a re-run killed before its swap
    with filelock.FileLock(runs_lib.lock_path(final), timeout=0):  # a live re-run writes it: kept
        assert plan.unfinished_runs([run], rerun=False)[0] == [] and staging.is_dir()
    todo, skipped = plan.unfinished_runs([run], rerun=False)
    assert todo == [] and skipped[0]["status"].startswith("skipped: already done") and not staging.exists()
    assert final.is_dir()


def test_skipped_runs_are_named_once(tmp_path, tfds_dir, caplog):
    folder = done_folder(tmp_path, tfds_dir)
    config, _ = runs_lib.read_run_folder(folder)
    from bnstudy.app import config as config_lib

    (run,) = config_lib.expand_pack(config_lib.parse(config))
    with caplog.at_level("INFO", logger="bnstudy"):
        todo, skipped = plan.unfinished_runs([run], rerun=False)
    assert todo == [] and len(skipped) == 1 and "skipped" not in caplog.text  # the table names it, once


# ------------------------------------------------------------------------------------ a full disk (tmpfs)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs; skipped where this process may not mount one (not root, or no CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip() or 'mount failed'}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def assert_write_failed(result: subprocess.CompletedProcess, disk: Path) -> str:
    assert result.returncode == 3, result.stderr[-3000:]
    line = one_paragraph(result.stderr)
    assert "no space left on device" in line and str(disk) in line, line
    assert not [f for f in disk.rglob("summary.json") if json.loads(f.read_text() or "{}").get("status") == "done"]
    assert not list(disk.rglob("*tmp*")), list(disk.rglob("*"))  # no half-written checkpoint or temp file
    return line


@pytest.mark.slow  # subprocesses that train
def test_a_disk_full_while_checkpointing_exits_3_naming_the_folder(tiny_disk, tfds_dir):
    out = tiny_disk / "out"
    result = train(out, tfds_dir, "train.epochs=3", "train.max_steps_per_epoch=3", "train.checkpoint_every=1")
    line = assert_write_failed(result, tiny_disk)
    (folder,) = folders(out)
    assert summary(folder)["status"] in ("failed", "running") and "marked failed" in line


@pytest.mark.slow  # subprocesses that train
def test_a_disk_already_full_exits_3_and_leaves_no_half_folder(tiny_disk, tfds_dir):
    filler = tiny_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)  # until ENOSPC
    result = train(tiny_disk / "out", tfds_dir)
    assert_write_failed(result, tiny_disk)
    assert folders(tiny_disk / "out") == [] and not list((tiny_disk / "out").rglob("config.yaml"))


# ------------------------------------------------------------------------------------------ signals, damage


@pytest.mark.slow  # six subprocesses that train
def test_signals_exit_130_or_143_on_every_try(tmp_path, tfds_dir):
    for attempt, sig in enumerate([signal.SIGTERM, signal.SIGINT] * 3):
        out = tmp_path / f"out{attempt}"
        proc = start(out, tfds_dir, *LONG)
        folder = wait_for_logged_steps(out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, (attempt, proc.returncode, err[-2000:])
        assert sig.name in one_paragraph(err) and summary(folder)["status"] == "interrupted"


@pytest.mark.slow  # two subprocesses that train
def test_a_truncated_checkpoint_restarts_that_run_alone_and_the_pack_goes_on(tmp_path, tfds_dir):
    out = tmp_path / "out"
    pack = (
        "seed=[0,1]",
        "train.pack_size=2",
        "train.epochs=30",
        "train.max_steps_per_epoch=3",
        "train.checkpoint_every=1",
    )
    proc = start(out, tfds_dir, *pack)
    wait_for_logged_steps(out, n=8)  # two epochs logged: each run has a checkpoint
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    damaged, whole = folders(out)
    for f in (p for p in (damaged / "checkpoint").rglob("*") if p.is_file() and p.stat().st_size > 64):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a save cut short
    again = train(out, tfds_dir, *pack)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr and "Event loop is closed" not in again.stderr
    unreadable = [line for line in again.stdout.splitlines() if "checkpoint unreadable" in line]
    assert len(unreadable) == 1 and str(damaged) in unreadable[0]
    assert summary(damaged)["status"] == summary(whole)["status"] == "done"
    assert "resumed_from_epoch" not in summary(damaged) and summary(whole)["resumed_from_epoch"] >= 1


def test_the_write_failure_line_names_the_file_and_the_reason(capsys):
    from bnstudy.app import cli

    error = OSError(28, "No space left on device", "/disk/out/default/run/summary.json")
    with pytest.raises(SystemExit) as stop:
        cli.exit_write_failed(error, ["/disk/out/default/run"])
    assert stop.value.code == cli.EXIT_WRITE_FAILED == 3
    line = capsys.readouterr().err.strip()
    assert line == (
        "bnstudy: could not write /disk/out/default/run/summary.json: no space left on device ([Errno 28]); "
        "marked failed: /disk/out/default/run"
    )
    wrapped = RuntimeError("orbax save failed")
    wrapped.__cause__ = error
    assert cli.os_error_in(wrapped) is error and cli.os_error_in(ValueError("x")) is None


# ------------------------------------------------------------------------------------------ pack vs alone


TIMING_KEYS = ("time", "_s", "per_s", "_at")  # wall-clock fields: the only ones that may differ run to run


def numbers(folder: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)} for r in records]


def test_a_sweep_in_packs_of_one_is_bit_identical_and_a_larger_pack_records_its_size(small_data, run_app):
    from test_train import read_summary, run_folders

    logged = logging.Handler(logging.INFO)  # Hydra configures the job's own logging: listen beside it
    logged.emit = lambda record: lines.append(record.getMessage())
    lines: list[str] = []
    logging.getLogger("bnstudy").addHandler(logged)
    try:
        swept = run_folders(run_app("seed=[0,1]", "train.pack_size=1"))
    finally:
        logging.getLogger("bnstudy").removeHandler(logged)
    times = [line for line in lines if " s: startup " in line]
    assert len(times) == 1 and times[0].startswith("job time ")  # one line for the job's two packs
    assert read_summary(swept[0])["command"].startswith("python -m bnstudy.train ")  # as typed
    in_sweep = numbers(swept[1])
    before = (swept[1] / "summary.json").stat().st_mtime_ns
    run_app("seed=1", "train.rerun=true")  # the same run id, trained again alone into the same folder
    assert (swept[1] / "summary.json").stat().st_mtime_ns != before  # a new result, not a skip
    assert read_summary(swept[1])["pack"]["size"] == 1
    assert numbers(swept[1]) == in_sweep and len(in_sweep) > 1  # bits, record by record
    packed = run_folders(run_app("seed=[0,1]", "train.pack_size=2", "train.rerun=true"))
    assert [read_summary(f)["pack"]["size"] for f in packed] == [2, 2]  # the result says it was packed


def test_a_checkpoint_that_cannot_fit_is_refused_before_orbax_writes_anything(tmp_path, monkeypatch):
    import errno
    import shutil
    from types import SimpleNamespace

    import numpy as np

    from bnstudy.app import checkpoints

    folder = tmp_path / "run"
    folder.mkdir()
    writer = checkpoints.Writer(folder)
    state = {"kernel": np.zeros((64, 64), np.float32)}  # 16 KiB + the overhead allowance
    free = checkpoints.SAVE_OVERHEAD_BYTES + state["kernel"].nbytes - 1
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - free, free=free))
    with pytest.raises(OSError) as refused:
        writer.save(state, checkpoints.Progress(1, 3, 3))
    assert refused.value.errno == errno.ENOSPC and refused.value.filename == str(folder / "checkpoint")
    assert not list(folder.rglob("*tmp*"))

    def full_midway(*args, **kwargs):  # what tensorstore reports when the disk fills during a save
        (folder / "checkpoint" / "1.orbax-checkpoint-tmp").mkdir(parents=True)
        raise ValueError("RESOURCE_EXHAUSTED: Failed to write 485340 bytes: No space left on device [os_error_code=28]")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=10**12))
    monkeypatch.setattr(writer.manager, "save", full_midway)
    with pytest.raises(OSError) as midway:
        writer.save(state, checkpoints.Progress(1, 3, 3))
    assert midway.value.errno == errno.ENOSPC and not list(folder.rglob("*tmp*"))
    writer.close()
