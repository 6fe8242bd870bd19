"""A run's sinks: wandb runs in a child process of the job, every use of a run waits for its init, the run's
wandb id reaches its summary before anything can resume it, and no wandb failure reaches training.

Most tests give the child a fake `wandb` (put first on its PYTHONPATH) that records what it was asked in
`calls.jsonl` and can be held at its init by a gate file; one runs the real wandb offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_dashboard import decoded_run

from bnstudy.app import runs, sinks
from conftest import REPO, subprocess_env

FAKE_WANDB = """
import json, os, time
from pathlib import Path

HERE = Path(__file__).parent
GATE = HERE / "gate"
BEHAVIOUR = (HERE / "behaviour").read_text().strip() if (HERE / "behaviour").exists() else ""


def record(**entry):
    with open(HERE / "calls.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\\n")


class Settings:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Summary(dict):
    def __delitem__(self, key):  # wandb's removes the key, present or not
        record(op="remove", key=key)
        self.pop(key, None)


class Run:
    def __init__(self, name):
        self.id, self.name, self.summary = f"id-{name}", name, Summary()

    def log(self, metrics, step):
        record(op="log", name=self.name, step=step, metrics=metrics)

    def finish(self, exit_code):
        record(op="finish", name=self.name, exit_code=exit_code, summary=self.summary)


def init(mode, name, **kwargs):
    while not GATE.exists():
        time.sleep(0.01)
    record(op="init", name=name, mode=mode, pid=os.getpid(), config=kwargs.get("config"), job_type=kwargs.get("job_type"))
    if BEHAVIOUR == "die":
        os._exit(3)
    if BEHAVIOUR == "no-server" and mode == "online":
        raise TimeoutError("no server answered")
    return Run(name)
"""


@pytest.fixture
def fake_wandb(tmp_path) -> Path:
    """A folder holding the fake `wandb` package; its gate is open unless a test removes it."""
    package = tmp_path / "fake" / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_WANDB)
    (package / "gate").touch()
    return package


def fake_job(fake_wandb: Path, mode: str = "offline") -> sinks.WandbJob:
    settings = SimpleNamespace(mode=mode, project="p", entity=None, tags=[], init_timeout=1.0)
    env = {**subprocess_env(), "PYTHONPATH": f"{fake_wandb.parent}{os.pathsep}{REPO}"}
    return sinks.WandbJob(settings, sync_hint="wandb sync ...", env=env)


def calls(fake_wandb: Path) -> list[dict]:
    path = fake_wandb / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def new_sink(job: sinks.WandbJob, folder_path: Path, name: str, config: dict | None = None) -> sinks.RunSinks:
    config = config or {"seed": 0}
    folder = runs.RunFolder(folder_path, config, {"config_hash": "h"})
    return sinks.RunSinks(folder, sinks.WandbRun(job, folder.path, name, "g", config))


NESTED = {
    "model": {"norm": "before_relu", "dropout": {"placement": "none", "rate": 0.0}},
    "optimizer": {"lr": 0.1},
    "train": {"batch_size": 64},
    "logger": {"wandb": {"tags": ["a"]}},
    "seed": 1,
    "study": "placement",
    "report": {"claim": "c", "compare": [{"a": {"model.norm": "before_relu"}}]},
}
FLAT = {
    "model.norm": "before_relu",
    "model.dropout.placement": "none",
    "model.dropout.rate": 0.0,
    "optimizer.lr": 0.1,
    "train.batch_size": 64,
    "logger.wandb.tags": ["a"],
    "seed": 1,
    "study": "placement",
    "report": NESTED["report"],  # the study's spec stays one value: `bnstudy-report --source wandb` reads it
}


def test_the_wandb_config_has_every_key_flat_for_the_dashboards_group_by(tmp_path, fake_wandb):
    job = fake_job(fake_wandb)
    sink = new_sink(job, tmp_path / "run", "r0", NESTED)
    sink.finish({"status": "done"})
    job.close()
    (init,) = [c for c in calls(fake_wandb) if c["op"] == "init"]
    assert init["config"] == FLAT and init["job_type"] == "train"
    assert runs.read_run_folder(tmp_path / "run")[0]["model"]["norm"] == "before_relu"  # the run folder stays nested


def test_wandb_init_runs_in_the_child_process_and_every_use_waits_for_it(tmp_path, fake_wandb):
    (fake_wandb / "gate").unlink()
    job = fake_job(fake_wandb)
    sink = new_sink(job, tmp_path / "run", "r0")  # returns while the init is held at the gate
    time.sleep(0.5)
    assert calls(fake_wandb) == [] and "wandb_id" not in json.loads((sink.folder.path / "summary.json").read_text())
    (fake_wandb / "gate").touch()
    sink.log(3, {"train/loss": 1.5})
    assert json.loads((sink.folder.path / "summary.json").read_text())["wandb_id"] == "id-r0"
    sink.finish({"status": "done"})
    init, log, finish = calls(fake_wandb)  # finish returns once the child has finished the run
    assert init["pid"] not in (os.getpid(), None) and init["mode"] == "offline"
    assert (log["step"], log["metrics"]) == (3, {"train/loss": 1.5})
    assert finish["exit_code"] == 0 and finish["summary"]["wandb_id"] == "id-r0"
    job.close()


def test_a_disabled_job_starts_no_process_and_its_runs_have_no_id(tmp_path):
    settings = SimpleNamespace(mode="disabled", project="p", entity=None, tags=[], init_timeout=1.0)
    job = sinks.WandbJob(settings, sync_hint="")
    sink = new_sink(job, tmp_path / "run", "r0")
    sink.log(1, {"x": 1.0})
    sink.finish({"status": "done"})
    assert job.process is None and "wandb_id" not in sink.folder.summary


def test_an_unreachable_server_is_one_warning_and_every_run_goes_offline(tmp_path, fake_wandb, caplog):
    (fake_wandb / "behaviour").write_text("no-server")
    job = fake_job(fake_wandb, mode="online")
    pack = [new_sink(job, tmp_path / f"run{k}", f"r{k}") for k in range(2)]
    for sink in pack:
        sink.finish({"status": "done"})
    job.close()
    inits = [c for c in calls(fake_wandb) if c["op"] == "init"]
    # The first run tried online, then offline; the second went offline at once.
    assert [(c["name"], c["mode"]) for c in inits] == [("r0", "online"), ("r0", "offline"), ("r1", "offline")]
    warnings = [r.getMessage() for r in caplog.records if "wandb online init failed" in r.getMessage()]
    assert len(warnings) == 1 and "TimeoutError: no server answered" in warnings[0]
    assert [s.folder.summary["wandb_id"] for s in pack] == ["id-r0", "id-r1"]


def test_a_dead_wandb_process_is_a_warning_and_the_run_folder_still_finishes(tmp_path, fake_wandb):
    (fake_wandb / "behaviour").write_text("die")
    job = fake_job(fake_wandb)
    sink = new_sink(job, tmp_path / "run", "r0")
    with pytest.warns(UserWarning, match="continuing without wandb"):
        sink.log(1, {"train/loss": 1.0})
    sink.finish({"status": "done"})
    job.close()
    assert sink.folder.summary["status"] == "done" and "wandb_id" not in sink.folder.summary
    assert runs.read_jsonl(sink.folder.path / "metrics.jsonl")[0]["train/loss"] == 1.0


def test_a_run_left_open_is_finished_with_exit_code_1_when_the_job_closes(tmp_path, fake_wandb):
    job = fake_job(fake_wandb)
    sink = new_sink(job, tmp_path / "run", "r0")
    sink.log(1, {"train/loss": 1.0})
    job.close()  # the training process ended without finishing the run (a crash, a kill)
    assert [(c["op"], c.get("exit_code")) for c in calls(fake_wandb)] == [("init", None), ("log", None), ("finish", 1)]


def test_the_training_process_never_imports_wandb_and_the_offline_run_is_complete(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from types import SimpleNamespace
        from bnstudy.app import runs
        from bnstudy.app import sinks
        settings = SimpleNamespace(mode="offline", project="p", entity=None, tags=[], init_timeout=15.0)
        job = sinks.WandbJob(settings, sync_hint="")
        folder = runs.RunFolder(runs.Path({str(tmp_path / "run")!r}), {{"seed": 0}}, {{"config_hash": "h"}})
        sink = sinks.RunSinks(folder, sinks.WandbRun(job, folder.path, "r0", "g", {NESTED!r}))
        sink.log(1, {{"train/loss": 1.0}})
        sink.finish({{"status": "done", "study": "placement", "trained": True}})
        job.close()
        print("wandb imported:", "wandb" in sys.modules, "id:", folder.summary.get("wandb_id"))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "wandb imported: False id: " in out.stdout and "id: None" not in out.stdout
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    run = decoded_run(run_file)  # read back with wandb's own record format
    assert (run["run"].job_type, run["run"].run_group) == ("train", "g")
    assert {k: v for k, v in run["config"].items() if k != "_wandb"} == FLAT
    assert (run["summary"]["study"], run["summary"]["trained"], run["summary"]["train/loss"]) == (
        "placement",
        True,
        1.0,
    )


def test_a_null_in_the_summary_is_removed_from_the_wandb_summary_not_sent(tmp_path, fake_wandb):
    job = fake_job(fake_wandb)
    sink = new_sink(job, tmp_path / "run", "r0")
    sink.finish({"status": "diverged", "test/acc": None, "pack": {"size": 1, "note": None}})
    job.close()
    removes = [c["key"] for c in calls(fake_wandb) if c["op"] == "remove"]
    (finish,) = [c for c in calls(fake_wandb) if c["op"] == "finish"]
    assert removes == ["test/acc"]  # also erases the last logged value, as the run folder's null does
    assert finish["summary"]["pack"] == {"size": 1} and "test/acc" not in finish["summary"]
    assert runs.read_run_folder(tmp_path / "run")[1]["test/acc"] is None  # the run folder keeps its null


def test_the_wandb_process_finishes_a_summary_with_nulls_without_importing_pandas(tmp_path):
    # wandb encodes a null by asking pandas whether it is a DataFrame: 0.45-0.6 s of imports at every finish.
    code = textwrap.dedent(
        f"""
        import sys, wandb
        from bnstudy.app.wandb_process import ChildRuns
        runs = ChildRuns(wandb, "offline", 15.0)
        runs.init(1, dict(project="p", name="r0", config={{"seed": 0}}, dir={str(tmp_path)!r}))
        answer = runs.finish(1, {{"status": "done", "steps_to_target": None, "data": {{"note": None}}}}, 0)
        print("warning:", answer["warning"], "pandas imported:", "pandas" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "warning: None pandas imported: False" in out.stdout
