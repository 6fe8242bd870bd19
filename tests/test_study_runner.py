"""The study runner (`bnstudy-study`): bad input before any compute, how rounds become training jobs, signals
passed on to the training in progress, and a quick study trained to the end (an edge extended, a seed round,
the report) that a re-run finds complete."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnstudy import records
from bnstudy.analysis.load import load_local
from bnstudy.app import study_runner
from bnstudy.app.config import ConfigError


def test_an_unknown_study_exits_2_with_one_line_before_any_compute(capsys):
    with pytest.raises(SystemExit) as e:
        study_runner.main(["placment", "+preset=quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown study 'placment'" in err[0] and "placement" in err[0]


def test_a_bad_override_exits_2_before_any_training(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        study_runner.main(["placement", "dataset=nosuchdata", f"out_dir={tmp_path}"])
    assert e.value.code == 2
    assert "nosuchdata" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_the_runs_record_the_command_the_user_typed(monkeypatch):
    from bnstudy.app import provenance

    monkeypatch.delenv(provenance.COMMAND_ENV, raising=False)
    provenance.set_command("bnstudy.train", ["-m", "experiment=placement", "+preset=quick"])
    assert provenance.command() == "python -m bnstudy.train -m experiment=placement +preset=quick"
    study = study_runner.Study("placement", ["+preset=quick"], Path("outputs"), "mnist_t10k")
    monkeypatch.setenv(provenance.COMMAND_ENV, study.command())  # what the runner gives its training children
    assert provenance.command() == "python -m bnstudy.study placement +preset=quick"


@pytest.mark.parametrize(
    "override, says",
    [
        ("foo=1", "bnstudy: Invalid config: unknown key `foo`."),
        ("optimizer.lr=-1", "bnstudy: Invalid config: `optimizer.lr` must be a positive number"),
        ("optimizer=rmsprop", "bnstudy: Invalid config: `optimizer` must be one of the known options"),
        ("compile_cache_dir=/proc/x", "bnstudy: Invalid config: `compile_cache_dir` must be a folder bnstudy can"),
    ],
)
def test_bad_input_reads_as_the_train_apps_paragraph_and_exits_2(capsys, tmp_path, override, says):
    with pytest.raises(SystemExit) as e:
        study_runner.main(["placement", f"out_dir={tmp_path}", "-m", override])  # -m: accepted, implied
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(says), err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("study", study_runner.config_tree.known_studies())
def test_every_study_passes_the_up_front_check_with_its_structural_axes_set(study):
    # The dropout study's rates need the placement its sweeper axis sets: checked without it, it was refused.
    out_dir, dataset, _ = study_runner.compose_settings(study, ["logger.wandb.mode=disabled"])
    assert dataset == "mnist_t10k" and out_dir == Path("outputs")


def test_a_structural_axis_given_on_the_command_line_is_checked_as_given():
    with pytest.raises(ConfigError, match="model.dropout.rate"):
        study_runner.compose_settings("dropout", ["model.dropout.placement=none"])
    assert study_runner.first_value("model.norm", "before_relu,none") == "model.norm=before_relu"
    assert study_runner.first_value("model.norm", "none") == "model.norm=none"


def test_a_training_that_refuses_its_input_ends_the_study_with_no_re_run_advice(capsys, tmp_path, monkeypatch):
    trainer = study_runner.Trainer(study_runner.Study("placement", [], tmp_path, "mnist_t10k"))
    monkeypatch.setattr(trainer, "command", lambda extra: [sys.executable, "-c", "raise SystemExit(2)"])
    with pytest.raises(study_runner.StudyError) as e:
        trainer.train([])
    assert e.value.code == 2 and str(e.value) == ""


def test_overrides_pin_an_arm_and_packable_keys_train_one_value():
    assert study_runner.override("model.norm", "none") == "model.norm=none"
    assert study_runner.override("optimizer.lr", 0.0333333) == "optimizer.lr=[0.0333333]"
    assert study_runner.override("model.dropout.rate", 0.5) == "model.dropout.rate=[0.5]"
    assert study_runner.override("train.batch_size", 8) == "train.batch_size=8"


def test_a_seed_round_packs_a_full_grid_of_a_packable_key_and_sweeps_a_structural_one():
    pending = {
        "seeds": 5,
        "groups": [
            {"filters": {"model.norm": "none", "optimizer.lr": 0.1}, "missing": [3, 4]},
            {"filters": {"model.norm": "before_relu", "optimizer.lr": 0.1}, "missing": [3, 4]},
            {"filters": {"model.norm": "none", "optimizer.lr": 0.3}, "missing": [3, 4]},
            {"filters": {"model.norm": "before_relu", "optimizer.lr": 0.3}, "missing": [3, 4]},
        ],
    }
    assert study_runner.seed_round(pending).jobs == [
        ["model.norm=none,before_relu", "optimizer.lr=[0.1,0.3]", "seed=[3,4]"]
    ]
    # Not a full grid: one job per setting (packing 0.1 and 0.3 would also train the missing pair).
    pending["groups"] = pending["groups"][:3]
    jobs = study_runner.seed_round(pending).jobs
    assert sorted(map(tuple, jobs)) == [
        ("model.norm=before_relu", "optimizer.lr=[0.1]", "seed=[3,4]"),
        ("model.norm=none", "optimizer.lr=[0.1,0.3]", "seed=[3,4]"),
    ]


SIGNAL_SCRIPT = """
import os, signal, subprocess, sys, time
from bnstudy.app import study_runner

got, where = sys.argv[1], sys.argv[2]
CHILD = '''
import signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "a").write(f"{signum}\\\\n")
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
open(sys.argv[1] + ".ready", "w").close()
print("child ready", flush=True)
time.sleep(60)
'''
study_runner.Trainer.command = lambda self, extra: [sys.executable, "-c", CHILD, got]
if where == "while_starting":
    # The signal lands before Popen has returned to the runner, which then has no child to pass it to yet.
    class PopenThenSignal(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            while not os.path.exists(got + ".ready"):
                time.sleep(0.01)
            os.kill(os.getpid(), int(sys.argv[3]))

    study_runner.subprocess = type("Subprocess", (), {"Popen": PopenThenSignal, "TimeoutExpired": subprocess.TimeoutExpired})
study_runner.main(["placement", "+preset=quick"])
"""


@pytest.mark.parametrize("where", ["while_training", "while_starting"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_passed_on_to_the_training_once_and_the_runner_exits_128_plus_it(tmp_path, signum, where):
    got = tmp_path / "child_signals"
    runner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SIGNAL_SCRIPT), str(got), where, str(int(signum))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in runner.stdout:
        if line.startswith("child ready"):
            break
    if where == "while_training":
        runner.send_signal(signum)
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 128 + signum, err
    assert got.read_text().split() == [str(int(signum))]  # the child got it, once
    assert f"stopped by {signal.Signals(signum).name}" in err and "re-run" in err


QUICK = [
    "+preset=quick",
    "logger.wandb.mode=disabled",
    "logger.progress=false",
    "train.max_steps_per_epoch=8",
    "train.epochs=3",
    "optimizer.lr=[0.1,0.3]",
    # Two seeds, then one more look at three: an open comparison gets exactly one seed round.
    "report.seeds={start:2,step:1,max:3}",
    # One grid step either side of [0.1, 0.3] is inside the bounds, two steps are not (a low edge then tries
    # the bound 0.03 itself): each arm whose selection sits at an edge is extended, whichever edge it is.
    "report.select.bounds={optimizer.lr:[0.03,0.9]}",
]


def run_study(tmp_path, *extra):
    cmd = [sys.executable, "-m", "bnstudy.study", "regularization", *QUICK, f"out_dir={tmp_path}"]
    out = subprocess.run([*cmd, "--out", str(tmp_path / "report"), *extra], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_quick_study_is_extended_at_an_edge_gets_a_seed_round_and_a_report_and_a_rerun_trains_nothing(tmp_path):
    stdout = run_study(tmp_path)
    rounds = re.findall(r"^bnstudy-study regularization round (\d+): (.*)$", stdout, re.M)
    kinds = [why.split()[0] for _, why in rounds]
    assert kinds[0] == "the" and "extend" in kinds and kinds[-1] == "confirmation", rounds
    assert kinds.index("extend") < kinds.index("confirmation")  # the selection phase ends before confirming
    frame = load_local(tmp_path / "regularization").frame
    base = frame[frame["optimizer.lr"].isin([0.1, 0.3]) & (frame["seed"] < 2)]
    assert len(base) == 2 * 2 * 2  # two arms, two lrs, seeds 0 and 1
    extended = frame[~frame["optimizer.lr"].isin([0.1, 0.3])]
    named = {
        m for why in (w for _, w in rounds if w.startswith("extend")) for m in re.findall(r"model\.norm=(\w+)", why)
    }
    # Only the named arms were trained at the new value (the override replaced the study's sweep of model.norm),
    # with the arm's own seeds, and the new value is one grid step past an edge.
    assert set(extended["model.norm"]) == named
    # one grid step past an edge, or, where the next step would pass the bound, the bound itself (tried before
    # it stands): 0.1 -> 0.0333 -> 0.03, 0.3 -> 0.9
    assert set(extended[extended["seed"] < 2]["optimizer.lr"].round(7)) <= {0.0333333, 0.03, 0.9}
    confirming = frame[frame["seed"] >= 100]
    assert set(confirming["seed"]) == {100, 101, 102} and not (set(frame["seed"]) - {0, 1, 100, 101, 102})
    record = json.loads((tmp_path / "report" / "verdict.json").read_text())
    assert record["selection_seeds"] == [0, 1] and record["confirmation_seeds"] == [100, 101, 102]
    # each arm confirmed at its selected lr alone: one lr per arm among the confirmation runs
    assert confirming.groupby("model.norm")["optimizer.lr"].nunique().max() == 1
    assert (tmp_path / "report" / "README.md").is_file() and (tmp_path / "report" / "verdict.json").is_file()
    assert not (tmp_path / "report" / "wandb").exists()  # the report follows logger.wandb.mode=disabled

    kept = list(records.read_raw_runs(tmp_path / "report" / records.RAW_RUNS_FILE))
    assert len(kept) == len(frame) and all(r["summary"]["code_fingerprint"] for r in kept)

    again = run_study(tmp_path)
    assert "done test/acc" not in again  # every run skipped
    sessions = json.loads((tmp_path / "report" / records.TRAINING_TIME_FILE).read_text())["sessions"]
    assert len(sessions) == 2  # the training time of both sessions, kept beside the report
    assert re.findall(r"round (\d+):", again) == ["1"] and "nothing pending after 1 round(s)" in again
    assert len(load_local(tmp_path / "regularization").frame) == len(frame)
