"""Where one trained model's numbers go: its run folder (always, see bnstudy.app.runs) and its wandb run.

Run folder layout: docs/design.md §6.1 and bnstudy/runs.py. wandb runs in a child process of the job
(bnstudy.app.wandb_process), so its import, inits and finishes overlap the compilation and the steps, and
a wandb failure never stops training: an online init that fails (no server, no login, timeout) falls
back to offline mode so the history is kept for `wandb sync`; a job warns once, and after the first
failure its other models go offline at once instead of waiting again. Every use of a run that needs its
wandb id (the first log, a checkpoint, the finish) waits for its init first.

A run's wandb config is shaped for the dashboard's group-by and filters: every config key flat at the top level
(`model.norm`, `optimizer.lr`, `train.batch_size`, ...; `dashboard_config`), the study's `report:` spec as one
value; `job_type` is "train" (a study's report run is "report", bnstudy.analysis.dashboard). The summary holds
the study and the run's `trained` flag.
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bnstudy.app.runs import FINISHED, RunFolder, clean
from bnstudy.app.wandb_process import WandbProcess

log = logging.getLogger("bnstudy")


NESTED_KEYS = ("report",)  # config values kept whole: the study's spec, read back by `bnstudy-report --source wandb`


def dashboard_config(config: dict, prefix: str = "") -> dict:
    """{"model": {"norm": "bn"}} -> {"model.norm": "bn"}: flat keys a dashboard groups and filters by, the
    same column names the report reads from run folders."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in NESTED_KEYS:
            flat.update(dashboard_config(value, name + "."))
        else:
            flat[name] = value
    return flat


class WandbJob:
    """The wandb side of one job: its child process (started with the first run), and the one warning it
    gives if online wandb is unreachable."""

    def __init__(self, settings, sync_hint: str, env: dict[str, str] | None = None):
        """`env`: the child's environment (default: this process's)."""
        self.settings, self.sync_hint, self.env = settings, sync_hint, env
        self.mode = settings.mode
        self.process: WandbProcess | None = None
        self._keys = 0

    def open(self, kwargs: dict) -> tuple[int, Future]:
        """A new run's key and the future of its init's answer (see bnstudy.app.wandb_process)."""
        if self.process is None:
            self.process = WandbProcess(self.mode, self.settings.init_timeout, env=self.env)
        self._keys += 1
        return self._keys, self.process.request("init", self._keys, kwargs)

    def close(self) -> None:
        """Wait for the child to finish every run and exit."""
        if self.process is not None:
            self.process.close()
            self.process = None

    def offline_because(self, error: str) -> None:
        """The child fell back to offline after an online init failed: say so once for the job."""
        server = os.environ.get("WANDB_BASE_URL", "the wandb server")
        log.warning(
            "wandb online init failed (%s; server %s, logger.wandb.init_timeout=%g s). This job's wandb runs "
            "are kept offline in their run folders; upload them later with `%s`.",
            error,
            server,
            self.settings.init_timeout,
            self.sync_hint,
        )


class WandbRun:
    """One wandb run per trained model, in the job's wandb process; wandb can never stop training."""

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
        """`resume_id`: the wandb id of the run to continue (a run resumed from its checkpoint). Returns
        at once; the init runs in the job's wandb process."""
        self.job, self.key, self._id = job, None, None
        self._opening: Future | None = None
        if job.mode == "disabled":
            return
        s = job.settings
        resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
        kwargs = dict(
            project=s.project,
            entity=s.entity,
            group=group,
            job_type="train",
            name=name,
            tags=list(s.tags),
            config=dashboard_config(config),
            notes=notes,
            dir=str(run_dir),
            **resume,
        )
        self.key, self._opening = job.open(kwargs)

    def wait(self) -> None:
        """Until the init has answered (at once when it has)."""
        if self._opening is None:
            return
        opening, self._opening = self._opening, None
        try:
            answer = opening.result()
        except Exception as e:
            self._give_up(f"wandb init failed, continuing without wandb for this run: {e}")
            return
        if answer["offline_because"]:
            self.job.offline_because(answer["offline_because"])
        if answer["warning"]:
            self._give_up(answer["warning"])
        self._id = answer["id"]

    @property
    def id(self) -> str | None:
        self.wait()
        return self._id

    def _give_up(self, warning: str) -> None:
        warnings.warn(warning, stacklevel=3)
        self._id = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.id is None:
            return
        record = {k: v for k, v in clean(metrics).items() if v is not None}
        self.job.process.request("log", self.key, step, record, reply=False)

    def finish(self, summary: dict) -> None:
        """The final summary, then wait until the wandb process has closed the run's files."""
        if self.id is None:
            return
        exit_code = 0 if summary.get("status") in FINISHED else 1
        try:
            answer = self.job.process.request("finish", self.key, clean(summary), exit_code).result()
        except Exception as e:
            self._give_up(f"wandb finish failed: {e}")
            return
        if answer["warning"]:
            self._give_up(answer["warning"])


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
