"""A study's report as one wandb run beside the runs it read: the verdict on the dashboard.

The run is `job_type="report"` in the study's wandb project and group. Its summary holds the claim, the verdict
and the deciding effect with its interval (as verdict.json); its media the comparisons, the per-arm selection and
the aggregates as tables, every figure as an image and the README; its config the study, dataset, variant and the
ids of the runs it read. Its id is derived from the study and those runs, so re-running the report on the same
runs updates that one run: offline, the earlier offline copy of it is replaced; online, it is resumed.

wandb is imported only inside `log_report` (the analysis layer never imports it at module level). Online mode
waits at most `init_timeout` seconds for the server, then falls back to offline with one warning, as training
runs do, in the report's own process (no child process: nothing here waits on it but the report).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bnstudy.analysis.analyse import Analysis
from bnstudy.analysis.errors import ReportWarning
from bnstudy.analysis.index import verdict_record
from bnstudy.app.wandb_process import first_line, split_nulls
from bnstudy.schema import WandbConfig

MODES = ("offline", "online", "disabled")


@dataclass
class ReportRun:
    """What the report's wandb run holds, before any wandb call."""

    id: str
    init: dict  # wandb.init's keyword arguments (mode and settings apart)
    summary: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)  # media key -> PNG
    readme: str = ""
    init_timeout: float = WandbConfig.init_timeout  # the runs' logger.wandb.init_timeout: online's longest wait


def report_run_id(study: str, dataset: str, run_ids: list[str]) -> str:
    """One id per study, dataset and set of runs (in any order): the same runs give the same wandb run."""
    digest = hashlib.sha256(json.dumps([study, dataset, sorted(run_ids)]).encode()).hexdigest()[:12]
    return f"report-{study.replace('.', '-')}-{digest}"


def _one(frame: pd.DataFrame, column: str, default):
    """The runs' value of a config column when they agree on one, else `default`."""
    if column not in frame:
        return default
    values = frame[column].dropna().unique()
    return values[0] if len(values) == 1 else default


def wandb_target(a: Analysis, project: str | None, entity: str | None) -> tuple[str, str | None, str]:
    """(project, entity, group) of the runs the report read: where the report run belongs."""
    project = project or _one(a.runs, "logger.wandb.project", WandbConfig.project)
    entity = entity or _one(a.runs, "logger.wandb.entity", None)
    return project, entity, _one(a.runs, "logger.wandb.group", None) or a.study


def report_run(a: Analysis, out: Path, project: str | None = None, entity: str | None = None) -> ReportRun:
    """The report run of analysis `a`, whose report folder is `out` (its figures and README)."""
    run_ids = [str(r) for r in a.runs["run_id"]]
    wandb_ids = sorted(str(w) for w in a.runs.get("wandb_id", pd.Series(dtype=object)).dropna())
    rid = report_run_id(a.study, a.dataset, run_ids)
    project, entity, group = wandb_target(a, project, entity)
    record = verdict_record(a)
    config = {
        "study": a.study,
        "dataset": a.dataset,
        "variant": record["variant"],
        "runs": sorted(run_ids),
        "wandb_runs": wandb_ids,
    }
    init = dict(
        project=project,
        entity=entity,
        group=group,
        job_type="report",
        name=f"{a.study}-report",
        id=rid,
        notes=a.spec.get("claim"),
        config=config,
        dir=str(out),
    )
    summary = {k: record[k] for k in ("title", "claim", "verdict", "verdict_sentence", "runs", "deciding")}
    summary["study"] = a.study
    tables = {"comparisons": a.comparisons, "summary_table": a.summary}
    if a.selection is not None:
        tables["selection"] = a.selection
    figures = {f"figures/{p.stem}": p for p in sorted(out.glob("*.png"))}
    readme = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    timeout = float(_one(a.runs, "logger.wandb.init_timeout", WandbConfig.init_timeout))
    return ReportRun(rid, init, summary, tables, figures, readme, timeout)


def _cell(v):
    """A table cell wandb can store: plain scalars, None for a missing number, JSON for anything nested."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)


def table_rows(frame: pd.DataFrame) -> tuple[list[str], list[list]]:
    return [str(c) for c in frame.columns], [[_cell(v) for v in row] for row in frame.itertuples(index=False)]


def remove_offline_copies(out: Path, run_id: str) -> None:
    """Earlier offline copies of this report run: the new one replaces them, so one sync gives one run."""
    for old in (out / "wandb").glob(f"offline-run-*-{run_id}"):
        shutil.rmtree(old, ignore_errors=True)


def log_report(run: ReportRun, mode: str) -> Path | None:
    """Log `run` to wandb (`mode`: offline, online or disabled). Returns its offline folder (None when online or
    disabled, or when wandb failed: a warning, never an error: the report folder is written already)."""
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError as e:
        warnings.warn(f"wandb is not installed, the report is not logged to wandb: {e}", ReportWarning)
        return None
    try:
        wrun = open_run(wandb, run, mode)
    except Exception as e:  # wandb is optional to the science
        warnings.warn(f"wandb init failed, the report is not logged to wandb: {e}", ReportWarning)
        return None
    try:
        wrun.log(media(wandb, run))
        offline = Path(wrun.dir).parent if wrun.offline else None
        values, nulls = split_nulls(run.summary)
        wrun.summary.update(values)
        for key in nulls:  # a resumed run's older value of a key this report has none for
            del wrun.summary[key]
        wrun.finish()
    except Exception as e:
        warnings.warn(f"wandb log of the report failed: {e}", ReportWarning)
        offline = None
    finally:
        wandb.teardown()  # finish can return before wandb's service has flushed the run's file; this waits
    return offline


def open_run(wandb, run: ReportRun, mode: str):
    """wandb.init of the report run; online waits at most `run.init_timeout` s, then it is kept offline with one
    warning (the failed attempt torn down first, or its id would still be in use)."""
    out = Path(run.init["dir"])
    remove_offline_copies(out, run.id)
    if mode == "online":
        try:
            return _init(wandb, run, "online", resume="allow")
        except Exception as e:
            wandb.teardown()
            for attempt in (out / "wandb").glob(f"run-*-{run.id}"):  # the failed online run's empty folder
                shutil.rmtree(attempt, ignore_errors=True)
            warnings.warn(
                f"wandb online init failed ({type(e).__name__}: {first_line(e)}; init timeout "
                f"{run.init_timeout:g} s): the report run is kept offline under {out / 'wandb'}; upload it later "
                "with `wandb sync`.",
                ReportWarning,
            )
    return _init(wandb, run, "offline")


def _init(wandb, run: ReportRun, mode: str, **resume):
    settings = wandb.Settings(console="off", silent=True, init_timeout=run.init_timeout)
    return wandb.init(mode=mode, reinit="create_new", settings=settings, **run.init, **resume)


def media(wandb, run: ReportRun) -> dict:
    """The report's tables, figures and README as wandb media, logged in one step."""
    logged = {name: wandb.Table(*table_rows(t), allow_mixed_types=True) for name, t in run.tables.items()}
    logged |= {key: wandb.Image(str(path), caption=path.stem) for key, path in run.figures.items()}
    logged["readme"] = wandb.Html(f"<pre>{_escape(run.readme)}</pre>", inject=False)
    return logged


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
