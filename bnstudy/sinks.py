"""Where one trained model's numbers go: its run folder (always, see bnstudy.runs) and its wandb run.

Run folder layout: docs/design.md §6.1 and bnstudy/runs.py. A wandb failure never stops training: an online init that fails (no server, no login, timeout) falls back
to offline mode so the history is kept for `wandb sync`; a job warns once, and after the first failure its
other models go offline at once instead of waiting again.

`wandb.init` runs in the job's one background thread, so that its start (~0.7 s per run offline, seconds
online) overlaps the compilation that follows; every use of the run waits for it first.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bnstudy.runs import FINISHED, RunFolder, clean

log = logging.getLogger("bnstudy")


class WandbJob:
    """wandb state shared by the models of one job: the mode they get and whether the job has warned."""

    def __init__(self, settings, sync_hint: str):
        self.settings, self.sync_hint = settings, sync_hint
        self.mode = settings.mode
        self.warned = False
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, fn, *args) -> Future:
        """`fn(*args)` in the job's background thread, one call after another (wandb imported here first:
        a module's first import racing another thread's can crash CPython 3.11's compiler)."""
        if self._executor is None:
            import wandb  # noqa: F401

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnstudy-wandb-init")
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def init(self, **kwargs):
        """wandb.init in the job's mode; online falls back to offline once, with one warning per job."""
        import wandb

        try:
            return self._init(wandb, self.mode, **kwargs)
        except Exception as e:
            if self.mode != "online":
                raise
            self._warn_offline(e)
            self.mode = "offline"
            for attempt in Path(kwargs["dir"]).glob("wandb/run-*"):  # the failed online run's empty folder
                shutil.rmtree(attempt, ignore_errors=True)
            return self._init(wandb, "offline", **kwargs)

    def _init(self, wandb, mode: str, **kwargs):
        settings = wandb.Settings(console="off", silent=True, init_timeout=self.settings.init_timeout)
        return wandb.init(mode=mode, reinit="create_new", settings=settings, **kwargs)

    def _warn_offline(self, error: Exception) -> None:
        if self.warned:
            return
        self.warned = True
        server = os.environ.get("WANDB_BASE_URL", "the wandb server")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning(
            "wandb online init failed (%s: %s; server %s, logger.wandb.init_timeout=%g s). This job's wandb runs "
            "are kept offline in their run folders; upload them later with `%s`.",
            type(error).__name__,
            first,
            server,
            self.settings.init_timeout,
            self.sync_hint,
        )


class WandbRun:
    """One wandb run per trained model; every call is guarded so wandb can never stop training."""

    def __init__(
        self,
        job: WandbJob,
        run_dir: Path,
        name: str,
        group: str,
        config: dict,
        notes: str | None = None,
        resume_id: str | None = None,
    ):
        """`resume_id`: the wandb id of the run to continue (a run resumed from its checkpoint). The init
        runs in `job`'s background thread."""
        self.run = None
        self._opening: Future | None = None
        if job.mode == "disabled":
            return
        s = job.settings
        resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
        kwargs = dict(
            project=s.project,
            entity=s.entity,
            group=group,
            name=name,
            tags=list(s.tags),
            config=config,
            notes=notes,
            dir=str(run_dir),
            **resume,
        )
        self._opening = job.submit(self._open, job, kwargs)

    def _open(self, job: WandbJob, kwargs: dict):
        try:
            return job.init(**kwargs)
        except Exception as e:  # wandb is optional to the science
            self._give_up("init", e)
            return None

    def wait(self) -> None:
        """Until the background init has returned (at once when it has)."""
        if self._opening is not None:
            self.run, self._opening = self._opening.result(), None

    @property
    def id(self) -> str | None:
        self.wait()
        return None if self.run is None else self.run.id

    def _give_up(self, what: str, error: Exception) -> None:
        warnings.warn(f"wandb {what} failed, continuing without wandb for this run: {error}", stacklevel=3)
        self.run = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.wait()
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in clean(metrics).items() if v is not None}, step=step)
        except Exception as e:
            self._give_up("log", e)

    def finish(self, summary: dict) -> None:
        self.wait()
        if self.run is None:
            return
        try:
            self.run.summary.update(clean(summary))
            self.run.finish(exit_code=0 if summary.get("status") in FINISHED else 1)
        except Exception as e:
            self._give_up("finish", e)


class RunSinks:
    """Both sinks of one model behind one interface."""

    def __init__(self, folder: RunFolder, wandb_run: WandbRun):
        self.folder, self.wandb = folder, wandb_run
        self._id_recorded = False

    def wandb_ready(self) -> None:
        """Wait for the wandb run, and put its id in the summary once (a resumed run reopens that run)."""
        if not self._id_recorded:
            self._id_recorded = True
            if self.wandb.id:
                self.folder.update({"wandb_id": self.wandb.id})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.wandb_ready()
        self.folder.log(step, metrics)
        self.wandb.log(step, metrics)

    def finish(self, summary: dict) -> None:
        """Final summary to both sinks; then a finished staging folder replaces the old result (after wandb
        has closed its files inside it)."""
        self.wandb_ready()
        self.folder.finish(summary)
        self.wandb.finish(self.folder.summary)
        self.folder.commit_if_finished()
