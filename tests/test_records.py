"""Results that land one study at a time: the raw-runs file (bnstudy.records) round-trips a study's finished runs,
a report rewritten from it equals the one from the run folders, a fresh clone's study resumes from it, and the
code fingerprint names what decides the numbers and keeps runs of different code apart."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnstudy import records
from bnstudy.analysis import cli
from bnstudy.analysis.index import index_table
from bnstudy.app import landing, provenance
from tests.report_runs import placement_runs, write_run

REPO = Path(__file__).resolve().parents[1]


def test_raw_runs_round_trip_the_finished_runs_deterministically(tmp_path):
    root = placement_runs(tmp_path / "runs")
    write_run(root, norm="none", seed=7, status="running")  # unfinished: not a result, not kept
    folders = records.run_folders(root)
    first, second = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert records.write_raw_runs(folders, first) == len(folders) - 1
    records.write_raw_runs(list(reversed(folders)), second)
    assert first.read_bytes() == second.read_bytes()  # sorted, no timestamp: same runs, same bytes
    kept = list(records.read_raw_runs(first))
    assert {r["summary"]["status"] for r in kept} == {"done"}
    restored = tmp_path / "restored"
    assert records.restore_raw_runs(first, restored) == len(kept)
    for r in kept:
        config, summary = records.read_run_folder(restored / r["run_id"])
        assert (config, summary) == records.read_run_folder(root / r["run_id"])
        assert records.read_jsonl(restored / r["run_id"] / "metrics.jsonl") == r["metrics"]
    assert records.restore_raw_runs(first, restored) == 0  # folders there already are left alone
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"run_id": 1}\n'))
    with pytest.raises(ValueError, match="line 1 is not a run record"):
        list(records.read_raw_runs(tmp_path / "bad.jsonl.gz"))


def test_a_report_keeps_its_raw_runs_and_is_rewritten_from_them_alone(tmp_path, capsys):
    root = placement_runs(tmp_path / "runs")
    first = tmp_path / "results" / "placement"
    cli.main(["placement", "--runs", str(root), "--out", str(first), "--no-wandb"])
    raw = first / records.RAW_RUNS_FILE
    assert raw.is_file()
    again = tmp_path / "again"
    cli.main(["placement", "--runs", str(raw), "--out", str(again), "--no-wandb"])  # no run folder needed
    cli.main(["placement", "--runs", str(first), "--out", str(tmp_path / "third"), "--no-wandb"])  # the folder
    drop = lambda d: {k: v for k, v in d.items() if k != "path"}
    one, two = (json.loads((d / "verdict.json").read_text()) for d in (first, again))
    assert drop(one) == drop(two) and one["code_fingerprint"] == ["0123456789ab"]
    assert (again / records.RAW_RUNS_FILE).read_bytes() == raw.read_bytes()
    assert "code fingerprint (bnstudy/, configs/, experiments/): `0123456789ab`" in (again / "README.md").read_text()


def test_a_report_refuses_runs_of_two_fingerprints_unless_told(tmp_path, capsys):
    root = placement_runs(tmp_path / "runs")
    write_run(root, norm="none", seed=9, fingerprint="fedcba987654", summary={"test/acc": 0.83})
    with pytest.raises(SystemExit) as stop:
        cli.main(["placement", "--runs", str(root), "--out", str(tmp_path / "out"), "--no-wandb"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "2 code fingerprints" in err and "fedcba987654 (1 runs)" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written
    cli.main(
        ["placement", "--runs", str(root), "--out", str(tmp_path / "out"), "--no-wandb", "--allow-mixed-fingerprints"]
    )
    text = (tmp_path / "out" / "README.md").read_text()
    assert "several code fingerprints, reported together as asked" in text and "--allow-mixed-fingerprints" in text


def test_a_fresh_clone_resumes_from_the_report_folder_and_code_changes_are_caught(tmp_path, monkeypatch):
    root = placement_runs(tmp_path / "runs")
    out = tmp_path / "results" / "placement"
    records.write_raw_runs(records.run_folders(root), out / records.RAW_RUNS_FILE)
    clone_runs = tmp_path / "clone" / "placement"
    assert landing.restore(out, clone_runs) == len(records.run_folders(root))
    assert sorted(p.name for p in records.run_folders(clone_runs)) == sorted(p.name for p in records.run_folders(root))
    monkeypatch.setattr(provenance, "code_fingerprint", lambda: "0123456789ab")
    assert landing.fingerprint_problem(clone_runs) is None
    monkeypatch.setattr(provenance, "code_fingerprint", lambda: "999999999999")
    problem = landing.fingerprint_problem(clone_runs)
    assert "0123456789ab (9 runs)" in problem and "this code's is 999999999999" in problem
    write_run(clone_runs, norm="none", seed=11, fingerprint="999999999999", summary={"test/acc": 0.8})
    assert landing.keep_raw_runs(out, clone_runs) == 10  # after a round: the finished runs so far, kept
    assert len(list(records.read_raw_runs(out / records.RAW_RUNS_FILE))) == 10
    landing.add_training_time(out, 600.0)
    landing.add_training_time(out, 1200.0)
    kept = json.loads((out / records.TRAINING_TIME_FILE).read_text())
    assert kept["total_s"] == 1800.0 and len(kept["sessions"]) == 2


def test_the_index_gives_each_studys_training_time(tmp_path, capsys):
    results = tmp_path / "results"
    cli.main(
        [
            "placement",
            "--runs",
            str(placement_runs(tmp_path / "runs")),
            "--out",
            str(results / "placement"),
            "--no-wandb",
        ]
    )
    landing.add_training_time(results / "placement", 1500.0)
    landing.add_training_time(results / "placement", 960.0)
    assert "| 41 min (2 sessions) |" in index_table(results)


def test_the_fingerprint_covers_what_decides_the_numbers_and_nothing_else():
    names = [name for name, _ in provenance.fingerprinted_files()]
    assert {"bnstudy/core/engine.py", "bnstudy/schema.py", "configs/config.yaml", "experiments/placement.yaml"} <= set(
        names
    )
    assert "bnstudy/analysis/trained.py" in names and "bnstudy/analysis/stats.py" not in names
    assert not [n for n in names if n.startswith(("results/", "docs/", "tests/", "benchmarks/"))]
    # running, recording and reading studies changes no run's numbers: editing them keeps a study's fingerprint
    assert all((REPO / name).is_file() for name in provenance.ORCHESTRATION)
    assert not set(provenance.ORCHESTRATION) & set(names) and "bnstudy/app/main.py" in names
    # the app's imports of the analysis are all fingerprinted (they decide fields of summary.json), bnstudy-study's
    # rounds aside (they choose which runs to train, and every run records its own config)
    imported = set()
    for path in (REPO / "bnstudy" / "app").glob("*.py"):
        if path.name != "study_runner.py":
            imported |= set(re.findall(r"^\s*from bnstudy\.analysis(?:\.(\w+))? import (\w+)", path.read_text(), re.M))
    modules = {a or b for a, b in imported}
    assert {f"{m}.py" for m in modules} <= set(provenance.TRAINING_ANALYSIS), modules


def test_a_change_to_a_fingerprinted_file_changes_the_fingerprint(tmp_path):
    code = (
        "import sys; from pathlib import Path; from bnstudy.app import provenance as p; "
        "files = p.fingerprinted_files(); name, path = files[0]; "
        "p.fingerprinted_files = lambda: [(name, Path(sys.argv[1]))] + files[1:]; print(p.code_fingerprint())"
    )
    copy = tmp_path / "copy.py"
    first = provenance.fingerprinted_files()[0][1]
    copy.write_bytes(first.read_bytes())
    same = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, check=True)
    copy.write_bytes(first.read_bytes() + b"\n# a change\n")
    changed = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, check=True)
    assert same.stdout.strip() == provenance.code_fingerprint() != changed.stdout.strip()


def test_a_dirty_sha_means_uncommitted_code_not_a_study_writing_its_results(tmp_path):
    """A study writes its report and raw runs into results/ while it trains: its later runs must not record the
    commit as `-dirty`; a change to bnstudy/ or experiments/ must."""
    repo = tmp_path / "checkout"
    for name in ("bnstudy/engine.py", "experiments/placement.yaml", "results/README.md"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("one\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert provenance.checkout_sha(repo) == head
    (repo / "results/README.md").write_text("a study landed\n")
    assert provenance.checkout_sha(repo) == head
    for name in ("experiments/placement.yaml", "bnstudy/engine.py"):
        (repo / name).write_text("two\n")
        assert provenance.checkout_sha(repo) == f"{head}-dirty", name
        subprocess.run(["git", "checkout", "-q", "--", name], cwd=repo, check=True)
    assert provenance.checkout_sha(tmp_path) is None  # not a checkout
