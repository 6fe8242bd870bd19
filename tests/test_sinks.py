"""A run's sinks: wandb.init runs in the job's background thread, every use of the run waits for it, and the
run's wandb id reaches its summary before anything can resume it."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

from bnstudy import runs, sinks


class FakeRun:
    def __init__(self, run_id: str):
        self.id, self.logged, self.summary, self.exit_code = run_id, [], {}, None

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self, exit_code):
        self.exit_code = exit_code


class GatedJob(sinks.WandbJob):
    """A WandbJob whose init blocks until `opened` is set, recording the thread it ran in."""

    def __init__(self):
        settings = SimpleNamespace(mode="offline", project="p", entity=None, tags=[], init_timeout=1.0)
        super().__init__(settings, sync_hint="wandb sync ...")
        self.opened, self.threads = threading.Event(), []

    def _init(self, wandb, mode, **kwargs):
        self.threads.append(threading.current_thread().name)
        assert self.opened.wait(timeout=30)
        return FakeRun(f"id-{kwargs['name']}")


def test_wandb_init_runs_in_the_background_and_every_use_waits_for_it(tmp_path):
    job = GatedJob()
    folder = runs.RunFolder(tmp_path / "run", {"seed": 0}, {"config_hash": "h"})
    run = sinks.WandbRun(job, folder.path, "r0", "g", {"seed": 0})  # returns while init is still blocked
    sink = sinks.RunSinks(folder, run)
    assert run.run is None and "wandb_id" not in json.loads((folder.path / "summary.json").read_text())
    job.opened.set()
    sink.log(3, {"train/loss": 1.5})
    assert job.threads == ["bnstudy-wandb-init_0"]  # not the main thread
    assert run.run.logged == [(3, {"train/loss": 1.5})]
    assert json.loads((folder.path / "summary.json").read_text())["wandb_id"] == "id-r0"
    sink.finish({"status": "done"})
    assert run.run.exit_code == 0 and run.run.summary["wandb_id"] == "id-r0"
    job.close()


def test_a_disabled_job_starts_no_thread_and_its_runs_have_no_id(tmp_path):
    settings = SimpleNamespace(mode="disabled", project="p", entity=None, tags=[], init_timeout=1.0)
    job = sinks.WandbJob(settings, sync_hint="")
    folder = runs.RunFolder(tmp_path / "run", {"seed": 0}, {"config_hash": "h"})
    sink = sinks.RunSinks(folder, sinks.WandbRun(job, folder.path, "r0", "g", {}))
    sink.log(1, {"x": 1.0})
    sink.finish({"status": "done"})
    assert job._executor is None and "wandb_id" not in folder.summary
