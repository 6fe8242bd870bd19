"""results/regenerate.sh's own checks: bad input exits 2 with one line, before anything is trained or deleted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "results" / "regenerate.sh"


def regenerate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--network", "cnn9", "placement"], "unknown network 'cnn9' (known: cnn6 resnet20"),
        (["--network", "cnn6", "placement", "cost"], "the cost study times the 2-conv CNN only"),
        (["placment"], "unknown study placment"),
        (["--fast"], "unknown option --fast"),
        (["--set", "placement"], "--set expects a Hydra override KEY=VALUE, got 'placement'"),
        (["--set", "seed=[0]", "ics", "cost"], "the cost study is a benchmark and takes no --set"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_training(args, says):
    done = regenerate(*args)
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""


def test_help_names_the_network_and_set_options():
    done = regenerate("--help")
    assert done.returncode == 0 and "--network NAME" in done.stdout and "results/NAME/STUDY/" in done.stdout
    assert "--set OVERRIDE" in done.stdout and "same overrides" in done.stdout


def fake_python(tmp_path, fails: dict[str, int]):
    """A `python` first on PATH that fails `bnstudy.study STUDY` with fails[STUDY], passes every other study and
    report without training, and hands anything else (the fingerprint) to the real interpreter."""
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    cases = "".join(f'    *"bnstudy.study {study} "*) exit {code} ;;\n' for study, code in fails.items())
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        'case " $* " in\n'
        f"{cases}"
        '    *" bnstudy.study "*|*" bnstudy.report "*) echo "$*" >> "$CALLS"; exit 0 ;;\n'
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    (bin_dir / "python").chmod(0o755)
    return bin_dir


def regenerate_with(tmp_path, fails, *args, results_files=()):
    """The script run from a copy of the tree it reads (results/, experiments/), so that nothing it deletes or
    writes touches the checkout; training and reports faked by `fake_python`. `results_files`: paths under
    results/ written before it starts."""
    import os
    import shutil

    tree = tmp_path / "tree"
    (tree / "results").mkdir(parents=True)
    for name in results_files:
        (tree / "results" / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / "results" / name).write_text("{}\n")
    shutil.copy(SCRIPT, tree / "results" / "regenerate.sh")
    shutil.copytree(SCRIPT.parents[1] / "experiments", tree / "experiments")
    env = {**os.environ, "PATH": f"{fake_python(tmp_path, fails)}:{os.environ['PATH']}", "CALLS": str(tmp_path / "c")}
    env["RUNS_ROOT"] = str(tmp_path / "runs")
    cmd = ["bash", str(tree / "results" / "regenerate.sh"), "--force", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_keep_going_lands_the_studies_after_a_failed_one_and_exits_1_naming_it(tmp_path):
    done = regenerate_with(tmp_path, {"dead_units": 3}, "--keep-going", "dead_units", "ics")
    assert done.returncode == 1, done.stderr
    assert "== dead_units: FAILED (exit 3)" in done.stderr and "1 study(ies) failed: dead_units" in done.stderr
    assert "== ics: landed in results/ics" in done.stdout
    calls = (tmp_path / "c").read_text()
    assert "bnstudy.study ics" in calls and "--index results" in calls


def test_without_keep_going_or_on_a_signal_the_first_failure_stops_it_all(tmp_path):
    done = regenerate_with(tmp_path / "a", {"dead_units": 3}, "dead_units", "ics")
    assert done.returncode == 3 and "ics" not in done.stdout.split("fingerprint", 1)[1]
    done = regenerate_with(tmp_path / "b", {"dead_units": 130}, "--keep-going", "dead_units", "ics")
    assert done.returncode == 130 and "landed" not in done.stdout


def test_set_passes_each_override_to_every_study_named(tmp_path):
    cut = "model.init_scale=[0.1,1.0,10.0]"
    done = regenerate_with(tmp_path, {}, "--set", cut, "--set", "train.epochs=2", "init_scale", "ics")
    assert done.returncode == 0, done.stderr
    studies = [c for c in (tmp_path / "c").read_text().splitlines() if "bnstudy.study" in c]
    assert len(studies) == 2 and all(c.endswith(f"{cut} train.epochs=2") for c in studies), studies


def test_an_old_report_without_raw_runs_is_replaced_but_an_interrupted_sessions_time_is_kept(tmp_path):
    """A report from before raw runs were kept goes; a folder an interrupted first session left (its
    training_time.json, no report and no pack yet) stays, so the next session's time adds to it."""
    kept, old = "ics/training_time.json", "dead_units/verdict.json"
    done = regenerate_with(tmp_path, {}, "ics", "dead_units", results_files=(kept, old))
    assert done.returncode == 0, done.stderr
    results = tmp_path / "tree" / "results"
    assert (results / kept).is_file() and not (results / old).exists()
