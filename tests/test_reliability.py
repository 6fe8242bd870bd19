"""A sweep never loses a result, through the real `python -m bnstudy.train` in subprocesses: finished runs are
skipped, a killed or interrupted run resumes from its checkpoint and ends with the numbers of an uninterrupted run, a
re-run over a finished result swaps in only when it finishes, one writer per run folder, signals end with one line
and an `interrupted` status, a dead writer's folder reads as `stale`, a wandb outage costs one bounded wait, bad
input exits 2 before anything is created. Data: the embedded mnist_t10k, prepared once per session."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnstudy.app import checkpoints
from bnstudy.app import runs as runs_lib
from conftest import NO_NETWORK, PREPARE_AND_CHECK, subprocess_env

# One worker runs this module: its tests share the session's prepared data and the module's uninterrupted sweep.
pytestmark = pytest.mark.xdist_group("prepared_digits")

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "dataset.train_subset=256",
    "dataset.test_subset=64",
    "train.batch_size=32",
    "train.epochs=1",
    "train.max_steps_per_epoch=3",
    "train.log_every=1",
    "train.eval_batch_size=64",
    "logger.wandb.mode=disabled",
    "logger.progress=false",
    "discrepancy.enabled=false",
]
LONG = ["train.epochs=2000", "train.max_steps_per_epoch=null"]  # minutes of training: killed long before the end


def test_a_prepared_split_loads_again_without_tensorflow(tfds_dir):
    """The first load read through TFDS and kept a numpy copy; the next process needs no TensorFlow."""
    code = NO_NETWORK + PREPARE_AND_CHECK.format(path=str(tfds_dir))
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["without-tensorflow", "8000", "2000", "same-split"]


def command(out: Path, tfds_dir: Path, *overrides: str) -> list[str]:
    cache = f"compile_cache_dir={tfds_dir.parent / 'jax-cache'}"  # later processes skip most compiling
    return [
        sys.executable,
        "-m",
        "bnstudy.train",
        *TINY,
        cache,
        f"dataset.data_dir={tfds_dir}",
        f"out_dir={out}",
        *overrides,
    ]


def train(out: Path, tfds_dir: Path, *overrides: str, timeout=300, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(out, tfds_dir, *overrides),
        env=subprocess_env(**env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=out.parent,
    )


def start(out: Path, tfds_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        command(out, tfds_dir, *overrides),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=out.parent,
        start_new_session=True,
    )


def folders(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/summary.json") if not p.parent.name.startswith("."))


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def wait_for_logged_steps(out: Path, n: int = 2, timeout: float = 240, staging: bool = False, exclude=()) -> Path:
    """The run (or staging) folder once its metrics.jsonl holds `n` records: the process is mid-training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        candidates = sorted(out.glob("*/.*.staging")) if staging else folders(out)
        for folder in (f for f in candidates if f not in exclude):
            metrics = folder / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
                return folder
        time.sleep(0.2)
    raise AssertionError("the run never started logging")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


@pytest.mark.slow  # subprocesses that train: 15-45 s each on a shared 2-core CPU
def test_finished_runs_are_skipped_rerun_retrains_and_files_share_one_mode(tmp_path, tfds_dir):
    out = tmp_path / "out"
    first = train(out, tfds_dir, "seed=[0,1]")
    assert first.returncode == 0, first.stderr[-2000:]
    done = folders(out)
    assert len(done) == 2 and all(summary(f)["status"] == "done" for f in done)
    modes = {oct(p.stat().st_mode & 0o777) for f in done for p in f.iterdir() if p.is_file()}
    assert modes == {oct(0o666 & ~current_umask())}
    before = {f: snapshot(f) for f in done}

    again = train(out, tfds_dir, "seed=[0,1,2]")  # two finished, one new: only the new one trains
    assert again.returncode == 0, again.stderr[-2000:]
    assert {f: snapshot(f) for f in done} == before  # bytes and mtimes unchanged
    lines = [line for line in again.stdout.splitlines() if "skipped: already done" in line]
    assert len(lines) == 2 and all("->" in line for line in lines)  # once each, in the final table
    assert "1 run(s) to train" in again.stdout
    assert len(folders(out)) == 3

    forced = train(out, tfds_dir, "seed=0", "train.rerun=true")
    assert forced.returncode == 0, forced.stderr[-2000:]
    (seed0,) = [f for f in done if "-s0-" in f.name]
    assert snapshot(seed0) != before[seed0]  # retrained, and swapped into the same folder
    assert summary(seed0)["status"] == "done" and not list(out.glob("*/.*.staging"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_done_result(out: Path, tfds_dir: Path, *overrides: str) -> Path:
    """A finished run folder of exactly the config these overrides give, written by bnstudy's own writer."""
    from hydra import compose, initialize_config_dir

    from bnstudy.app import config as config_lib

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        raw = compose("config", overrides=command(out, tfds_dir, *overrides)[3:])
    (run,) = config_lib.expand_pack(config_lib.parse(raw))
    folder = runs_lib.run_dir(run)
    start = {"run_id": runs_lib.run_id(run), "config_hash": runs_lib.config_hash(run), "path": str(folder)}
    runs_lib.RunFolder(folder, config_lib.to_dict(run), start).finish({"status": "done", "test/acc": 0.5})
    return folder


@pytest.mark.slow  # subprocesses that train: 15-45 s each on a shared 2-core CPU
def test_killed_rerun_leaves_the_earlier_done_result_intact(tmp_path, tfds_dir):
    out = tmp_path / "out"
    folder = write_done_result(out, tfds_dir, *LONG)
    before = snapshot(folder)
    plain = train(out, tfds_dir, *LONG)  # finished: skipped without loading data
    assert plain.returncode == 0 and "skipped: already done" in plain.stdout and snapshot(folder) == before
    proc = start(out, tfds_dir, "train.rerun=true", *LONG)
    staging = wait_for_logged_steps(out, staging=True)
    assert staging.name == f".{folder.name}.staging"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert snapshot(folder) == before and summary(folder)["status"] == "done"
    assert runs_lib.run_folders(folder.parent) == [folder]  # the half-trained staging folder is hidden


@pytest.mark.slow  # subprocesses that train: 15-45 s each on a shared 2-core CPU
def test_sigterm_marks_interrupted_and_exits_143_without_traceback(tmp_path, tfds_dir):
    out = tmp_path / "out"
    proc = start(out, tfds_dir, *LONG)
    folder = wait_for_logged_steps(out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    ours = [line for line in err.splitlines() if line.startswith("bnstudy")]  # TF's import notices aside
    assert "Traceback" not in err and len(ours) == 1, err
    assert "SIGTERM" in ours[0] and str(folder) in ours[0]
    assert summary(folder)["status"] == "interrupted"


@pytest.mark.slow  # subprocesses that train: 15-45 s each on a shared 2-core CPU
def test_sigint_exits_130_with_one_line(tmp_path, tfds_dir):
    out = tmp_path / "out"
    proc = start(out, tfds_dir, *LONG)
    folder = wait_for_logged_steps(out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("bnstudy")]
    assert proc.returncode == 130 and "Traceback" not in err and len(ours) == 1 and "SIGINT" in ours[0], err
    assert summary(folder)["status"] == "interrupted"


@pytest.mark.slow  # subprocesses that train: 15-45 s each on a shared 2-core CPU
def test_killed_run_reads_as_stale_in_the_report_and_a_rerun_retrains_it(tmp_path, tfds_dir):
    out = tmp_path / "out"
    assert train(out, tfds_dir, "study=placement", "seed=1").returncode == 0
    proc = start(out, tfds_dir, "study=placement", "seed=0", *LONG)
    folder = wait_for_logged_steps(out, exclude=folders(out))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert summary(folder)["status"] == "running" and summary(folder)["pid"] == proc.pid
    assert runs_lib.effective_status(summary(folder)) == "stale"
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnstudy.report",
            "placement",
            "--runs",
            str(folder.parent),
            "--out",
            str(tmp_path / "r"),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"- stale: `{folder}`" in (tmp_path / "r" / "README.md").read_text()
    again = start(out, tfds_dir, "study=placement", "seed=0", *LONG)  # a re-run retrains the stale folder
    deadline = time.monotonic() + 240
    while summary(folder).get("pid") != again.pid and time.monotonic() < deadline:
        time.sleep(0.2)
    again.send_signal(signal.SIGTERM)
    again.communicate(timeout=120)
    assert summary(folder)["pid"] == again.pid and summary(folder)["status"] == "interrupted"


@pytest.mark.slow  # subprocesses that train: 15-45 s each on a shared 2-core CPU
def test_two_processes_on_one_config_train_it_once(tmp_path, tfds_dir):
    out = tmp_path / "out"
    first = start(out, tfds_dir, "logger.wandb.mode=offline", *LONG)
    folder = wait_for_logged_steps(out, n=1)
    second = train(out, tfds_dir, "logger.wandb.mode=offline", *LONG)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    locked = [line for line in second.stdout.splitlines() if "skipped: another process is training it" in line]
    assert len(locked) == 1 and "->" in locked[0]  # once, in the final table
    assert folders(out) == [folder] and summary(folder)["pid"] == first.pid  # the first process trained it
    assert len(list((folder / "wandb").glob("offline-run-*"))) == 1


def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the with-block ends: connections are refused


TIMEOUT_S, SLACK_S = 5, 20  # slack: wandb's own retries and process noise on a shared CPU


@pytest.mark.slow  # subprocesses that train: 15-45 s each on a shared 2-core CPU
def test_wandb_outage_costs_one_bounded_wait_and_keeps_the_history_offline(tmp_path, tfds_dir):
    pack = ("seed=[0,1]", f"logger.wandb.init_timeout={TIMEOUT_S}")
    t0 = time.monotonic()
    offline = train(tmp_path / "off", tfds_dir, "logger.wandb.mode=offline", *pack)
    offline_s = time.monotonic() - t0
    t0 = time.monotonic()
    online = train(
        tmp_path / "on",
        tfds_dir,
        "logger.wandb.mode=online",
        *pack,
        WANDB_BASE_URL=f"http://127.0.0.1:{closed_loopback_port()}",
        WANDB_API_KEY="x" * 40,
    )
    online_s = time.monotonic() - t0
    print(f"wandb outage: offline {offline_s:.1f} s, online against a closed port {online_s:.1f} s")
    assert offline.returncode == 0 and online.returncode == 0, online.stderr[-2000:]
    assert online_s <= offline_s + TIMEOUT_S + SLACK_S
    assert online.stdout.count("wandb online init failed") == 1  # one warning per job, not per model
    assert "wandb sync" in online.stdout and "wandb login" not in online.stdout
    for folder in folders(tmp_path / "on"):
        (run_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
        logged = [r for r in runs_lib.read_jsonl(folder / "metrics.jsonl") if "train/loss" in r]
        assert run_file.read_bytes().count(b"train/loss") >= len(logged) == 3  # one history record per step
        assert not list((folder / "wandb").glob("run-*"))  # the failed online attempt left nothing


@pytest.mark.parametrize(
    "override, key",
    [
        ("experiment=placment", "experiment"),
        ("optimizer=rmsprop", "optimizer"),
        ("model.dropout.rate=0.5", "model.dropout.rate"),
        ("out_dir={a_file}/runs", "out_dir"),  # under a file: no folder can be made there
    ],
)
def test_bad_input_exits_2_naming_the_key_and_creates_nothing(tmp_path_factory, tmp_path, override, key):
    out = tmp_path / "out"
    a_file = tmp_path_factory.mktemp("elsewhere") / "a_file"
    a_file.write_text("")
    override = override.format(a_file=a_file)
    cmd = [sys.executable, "-m", "bnstudy.train", f"out_dir={out}", "logger.wandb.mode=disabled", override]
    result = subprocess.run(
        cmd,
        env=subprocess_env(TFDS_DATA_DIR=str(tmp_path / "tfds")),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"`{key}`" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one paragraph
    if key == "experiment":
        assert "placement" in result.stderr and "learning_rate" in result.stderr  # the known studies
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no data prepared


# The whole default job (an epoch of 7200 images at batch 128, then evaluations of 800 + 2000): ~20 s of the
# default run on a shared 2-core CPU. The same path on these data, the real app in a subprocess, runs there with
# tiny settings in test_a_sweep_killed_in_its_second_run_resumes_it_and_ends_as_if_never_stopped.
@pytest.mark.slow
def test_one_epoch_of_the_default_model_on_the_embedded_data_reaches_95_percent(tmp_path, tfds_dir):
    out = tmp_path / "out"
    t0 = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnstudy.train",
            "train.epochs=1",
            f"dataset.data_dir={tfds_dir}",
            f"out_dir={out}",
            "logger.wandb.mode=disabled",
            "logger.progress=false",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    print(f"1 epoch on mnist_t10k: {time.monotonic() - t0:.1f} s")
    assert result.returncode == 0, result.stderr[-2000:]
    (folder,) = folders(out)
    s = summary(folder)
    print(f"test/acc {s['test/acc']:.4f}")
    assert s["data"]["dataset"] == "mnist_t10k" and "not the official MNIST split" in s["data"]["note"]
    assert s["num_train"] + s["num_val"] == 8000 and s["num_val"] == 800 and s["num_test"] == 2000  # val: 10%
    assert s["test/acc"] >= 0.95


# ------------------------------------------------------------------------------------------ checkpoints and resume

# Three runs trained one after the other (packs of 1), 3 epochs of 8 steps (~0.5 s per epoch here): checkpoints
# after epochs 1 and 2. Records reach metrics.jsonl in one burst per epoch, so a kill point is an epoch's end
# plus a delay into the next one.
SWEEP = ("seed=[0,1,2]", "train.pack_size=1", "train.epochs=3", "train.max_steps_per_epoch=8")
RECORDS_PER_EPOCH = 8  # 8 train records (log_every=1); the evaluation merges into the last step's record
RESULT_KEYS = ("status", "diverged_step", "test/", "train/")  # a summary's numbers (not its timings or paths)


def results(folder: Path) -> tuple[str, dict]:
    """What a run ended with: its whole metrics.jsonl (bytes) and the numbers of its summary."""
    s = summary(folder)
    return (folder / "metrics.jsonl").read_text(), {k: v for k, v in s.items() if k.startswith(RESULT_KEYS)}


def by_seed(out: Path) -> dict[int, Path]:
    return {int(f.name.split("-s")[-1].split("-")[0]): f for f in folders(out)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tfds_dir) -> dict[int, tuple[str, dict]]:
    """The sweep's results when nothing stops it."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    done = train(out, tfds_dir, *SWEEP)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = by_seed(out)
    assert sorted(runs) == [0, 1, 2] and not list(out.glob("*/*/checkpoint"))  # a finished run keeps none
    return {seed: results(folder) for seed, folder in runs.items()}


def wait_for_records(out: Path, seed: int, n: int, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folder = by_seed(out).get(seed)
        if folder and len((folder / "metrics.jsonl").read_text().splitlines()) >= n:
            return folder
        time.sleep(0.02)
    raise AssertionError(f"run seed={seed} never logged {n} records")


def chaos(tmp_path: Path, tfds_dir: Path, uninterrupted: dict, epochs_logged: int, delay_s: float) -> None:
    """kill -9 the sweep `delay_s` after the second run logged `epochs_logged` epochs; the same command again must
    skip the first run, resume the second from its checkpoint (or start it over before its first one), train the
    third, and end with the uninterrupted sweep's numbers."""
    out = tmp_path / "out"
    proc = start(out, tfds_dir, *SWEEP)
    second = wait_for_records(out, 1, epochs_logged * RECORDS_PER_EPOCH)
    time.sleep(delay_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    first = by_seed(out)[0]
    logged = len((second / "metrics.jsonl").read_text().splitlines())
    assert summary(first)["status"] == "done" and summary(second)["status"] == "running"  # killed mid-run
    assert 2 not in by_seed(out) or summary(by_seed(out)[2])["status"] != "done"
    saved = checkpoints.latest(second)
    print(
        f"killed {delay_s:.2f} s after epoch {epochs_logged} of the second run, {logged} records logged; "
        f"checkpoint: {saved}"
    )
    before = snapshot(first)

    again = train(out, tfds_dir, *SWEEP)
    assert again.returncode == 0, again.stderr[-2000:]
    assert snapshot(first) == before  # not retrained: bytes and mtimes unchanged
    resumed = [line for line in again.stdout.splitlines() if "resuming from its checkpoint" in line]
    if saved is None:  # killed before the first checkpoint: trained from the start
        assert resumed == [] and "resumed_from_epoch" not in summary(second)
    else:
        assert len(resumed) == 1 and "-s1:" in resumed[0]
        assert summary(second)["resumed_from_epoch"] == saved.epoch and saved.epoch >= 1
    assert "2 run(s) to train" in again.stdout
    assert {seed: results(f) for seed, f in by_seed(out).items()} == uninterrupted  # exact, metrics.jsonl too
    assert not list(out.glob("*/*/checkpoint")) and not list(out.glob("*/.*.staging"))


def test_a_sweep_killed_in_its_second_run_resumes_it_and_ends_as_if_never_stopped(tmp_path, tfds_dir, uninterrupted):
    chaos(tmp_path, tfds_dir, uninterrupted, epochs_logged=1, delay_s=0.2)  # in epoch 2: resumes after epoch 1


@pytest.mark.slow  # two subprocesses per kill point
@pytest.mark.parametrize("epochs_logged", [0, 1, 2])  # in epoch 1 (no checkpoint yet), 2 or 3
def test_chaos_kill_9_at_random_points_of_the_second_run(tmp_path, tfds_dir, uninterrupted, epochs_logged):
    delay_s = random.Random(epochs_logged).uniform(0.0, 0.4)  # somewhere in the epoch's first ~0.4 s
    chaos(tmp_path, tfds_dir, uninterrupted, epochs_logged=epochs_logged, delay_s=delay_s)


@pytest.mark.slow  # two subprocesses that train
def test_sigterm_after_a_checkpoint_exits_143_and_the_rerun_completes_with_the_same_numbers(
    tmp_path, tfds_dir, uninterrupted
):
    out = tmp_path / "out"
    proc = start(out, tfds_dir, *SWEEP)
    folder = wait_for_records(out, 0, RECORDS_PER_EPOCH)
    time.sleep(0.2)  # epoch 2 under way: the epoch-1 checkpoint exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("bnstudy")]
    assert proc.returncode == 143 and "Traceback" not in err and len(ours) == 1 and "SIGTERM" in ours[0], err
    assert summary(folder)["status"] == "interrupted"
    saved = checkpoints.latest(folder)
    assert saved is not None and saved.epoch >= 1

    again = train(out, tfds_dir, *SWEEP)
    assert again.returncode == 0, again.stderr[-2000:]
    assert summary(folder)["resumed_from_epoch"] == saved.epoch
    assert {seed: results(f) for seed, f in by_seed(out).items()} == uninterrupted


def test_checkpoint_every_is_not_part_of_the_run_identity():
    base = {"train": {"checkpoint_every": 1}, "seed": 0}
    assert runs_lib.config_hash(base) == runs_lib.config_hash({**base, "train": {"checkpoint_every": 0}})
