"""A study's whole analysis, no files written: its runs and spec in, an `Analysis` (aggregates, comparisons,
verdict) out. Only numpy, pandas, scipy and yaml are imported: no training stack, no GPU.

What is counted where:
- a group is every run with the same config apart from the seed. Its table value is the mean over the runs
  that finished `done` and trained (bnstudy.analysis.stats.is_trained) with a finite value, with the diverged
  and not-trained runs counted beside it. In a comparison every finished run of the group counts, a failed one
  against its arm (bnstudy.analysis.failures): its own value of an outcome of training (accuracy, loss),
  chance for a diverged run's accuracy, else (every probe of a mechanism) the worst outcome and a rank test.
- with `select: {by: val/acc, over: [optimizer.lr]}` the study has two phases on disjoint seeds
  (bnstudy.analysis.phases): each arm (a combination of the other grid columns) chooses its setting of `over`
  on the selection seeds' runs (best mean validation score over all runs there, failures counted; the test
  split never chooses), and the comparisons use only confirmation runs at those settings. Where a selection
  sits in what the arm searched is in `edges` (bnstudy.analysis.edges).
- comparisons are decided on every seed at once (the fixed design), or look by look under the study's seed
  schedule (bnstudy.analysis.looks); an `along:` comparison once per axis value (bnstudy.analysis.verdicts).
- a comparison of a layer mean (`*` in its metric) is also redone layer by layer on the same runs and seeds,
  descriptive only (bnstudy.analysis.per_layer).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from bnstudy.analysis.compare import Coverage, aggregate, compare, filters_label
from bnstudy.analysis.derived import FINISHED, add_run_metrics, derive_across, mark_not_trained
from bnstudy.analysis.edges import ArmEdge, arm_edges
from bnstudy.analysis.errors import ReportError, ReportWarning
from bnstudy.analysis.load import LoadedRuns
from bnstudy.analysis.looks import decide
from bnstudy.analysis.per_layer import per_layer
from bnstudy.analysis.phases import Phases, split_phases
from bnstudy.analysis.spec import CONFIRMATION_SEED_BASE, EXPERIMENTS_DIR, choose_spec, spec_metrics
from bnstudy.analysis.verdicts import expand_along, study_verdict, verdict_sentence

# Config keys that do not define what was trained (prefixes): never grouping columns.
NOT_GRID = (
    "seed",
    "out_dir",
    "compile_cache_dir",
    "study",
    "logger.",
    "report",
    "train.pack_size",
    "train.loop",
    "dataset.data_dir",
    "dataset.download",
    "train.eval_batch_size",
    "probe.",
    "discrepancy.",
)


def grid_columns(frame: pd.DataFrame, config_cols: list[str]) -> list[str]:
    """Config columns that vary across the runs, except the seed and keys that do not change the model."""
    cols = [c for c in config_cols if c in frame and not c.startswith(NOT_GRID)]
    return [c for c in cols if frame[c].astype(str).nunique(dropna=False) > 1]


@dataclass
class Analysis:
    study: str
    spec: dict
    dataset: str
    runs: pd.DataFrame  # every run (all statuses)
    grid: list[str]
    summary: pd.DataFrame  # long: one row per (table, group, metric)
    comparisons: pd.DataFrame
    verdict: str
    missing: list[str]
    skipped: list[tuple[str, str]]
    frames: dict[str, tuple[pd.DataFrame, list[str]]]  # metric -> (frame it lives in, its grid columns)
    selection: pd.DataFrame | None = None  # per arm and candidate setting: mean validation score, n, chosen
    edges: list[ArmEdge] = field(default_factory=list)  # per arm: searched, selected, edge and why
    compared: dict = field(default_factory=dict)  # metric -> (frame, grid) its comparisons use (selected runs)
    verdict_sentence: str = ""
    pending_look: dict = field(default_factory=dict)  # the sequential design's next look: {seeds, rows} or {}
    phases: Phases | None = None  # a study with a selection: its selection and confirmation phases
    pool: pd.DataFrame | None = None  # the runs the comparisons draw from (finished; or confirmation runs)
    first_new_seed: int = 0  # the first seed a new look trains (confirmation seeds from CONFIRMATION_SEED_BASE)
    per_layer: pd.DataFrame = field(default_factory=pd.DataFrame)  # comparisons of layer means, layer by layer


def select_dataset(frame: pd.DataFrame, dataset: str | None) -> tuple[pd.DataFrame, str]:
    names = sorted(frame["dataset.name"].dropna().astype(str).unique()) if "dataset.name" in frame else []
    if dataset:
        if dataset not in names:
            raise ReportError(f"no runs on dataset {dataset!r}; the runs use {names}.")
        return frame[frame["dataset.name"] == dataset], dataset
    if len(names) > 1:
        raise ReportError(f"the runs use several datasets {names}: choose one with --dataset (and an --out for each).")
    return frame, names[0] if names else "unknown"


def analyse(
    study: str, runs: LoadedRuns, dataset: str | None = None, experiments_dir: Path = EXPERIMENTS_DIR
) -> Analysis:
    """The whole computation, no files written: aggregates, comparisons, verdict."""
    if runs.frame.empty:
        raise ReportError(f"no readable runs for study {study!r} ({len(runs.skipped)} corrupt folder(s) skipped).")
    spec = choose_spec(study, runs, experiments_dir)
    frame = runs.frame
    if "study" in frame and frame["study"].notna().any():
        other = frame["study"].notna() & (frame["study"] != study)
        if other.any():
            warnings.warn(f"ignoring {int(other.sum())} run(s) of other studies", ReportWarning)
            frame = frame[~other]
    frame, dataset = select_dataset(frame.reset_index(drop=True), dataset)
    frame = mark_not_trained(frame, runs, dataset, spec)
    finished = frame[frame["status"].isin(FINISHED)].copy()
    if finished.empty:
        raise ReportError(f"none of the {len(frame)} run(s) of study {study!r} has finished (all running or failed).")
    grid = grid_columns(finished, runs.config_columns)
    derived = spec.get("derived") or {}
    run_names = [m for m in spec_metrics(spec) if m not in derived]
    missing = add_run_metrics(finished, runs, run_names, dataset, spec)
    frames = {m: (finished, grid) for m in run_names}
    compared = {m: (finished, grid) for m in run_names}  # metric -> (frame, grid) that its comparisons use
    coverage, phases, pool, n_axis = Coverage(), None, finished, {}
    if spec.get("select"):
        phases = split_phases(finished, grid, spec, dataset)
        frame = frame.assign(phase=frame["seed"].isin(phases.seeds).map({True: "selection", False: "confirmation"}))
        pool, over = phases.confirmation, spec["select"]["over"]
        sgrid = [c for c in grid if c not in over]
        selecting = finished[finished["seed"].isin(phases.seeds)]
        tables = [
            aggregate(selecting, m, grid).assign(table="selection phase: every searched setting") for m in run_names
        ]
        compared = {m: (pool, sgrid) for m in run_names}
        coverage = Coverage(settings=phases.chosen, untrained=tuple(phases.untrained))
        n_axis = {k: len({*phases.chosen[k], *(a[k] for a in phases.untrained if k in a)}) for k in sgrid}
        at = f"confirmation phase: each arm at its selected {', '.join(over)}"
        tables += [aggregate(pool, m, sgrid).assign(table=at) for m in run_names if len(pool)]
        if len(phases.stray):
            warnings.warn(
                f"{len(phases.stray)} confirmation-seed run(s) at a setting that is not their arm's selection "
                f"are left out",
                ReportWarning,
            )
    else:
        tables = [aggregate(finished, m, grid).assign(table="runs") for m in run_names]
    for name, d in derived.items():
        # With a per-arm selection, an axis other than the selected one is derived from the confirmation runs
        # (e.g. the spread over init scales of each (norm, scale)'s accuracy at its own selected lr).
        at_selected = phases is not None and d["over"] not in spec["select"]["over"]
        base, bgrid = (compared[d["of"]]) if at_selected else (finished, grid)
        dframe = derive_across(base, name, d, bgrid, dataset, n_axis.get(d["over"]))
        dgrid = [c for c in bgrid if c != d["over"]]
        frames[name] = compared[name] = (dframe, dgrid)
        where = f", at each arm's selected {', '.join(spec['select']['over'])}" if at_selected else ""
        tables.append(aggregate(dframe, name, dgrid).assign(table=f"per seed, over {d['over']}{where}"))
        if dframe[name].isna().all():
            missing.append(name)
    for m in missing:
        warnings.warn(f"study {study!r}: no run has metric {m!r}", ReportWarning)
    summary = pd.concat(tables, ignore_index=True)
    rows_at = partial(comparison_rows, spec, compared, dataset, coverage)
    comparisons, pending = decide(rows_at, spec)
    verdict = study_verdict(comparisons)
    selection = phases.table if phases is not None else None
    edges = arm_edges(selection, grid, spec["select"]) if selection is not None else []
    return Analysis(
        study, spec, dataset, frame, grid, summary, comparisons, verdict, missing, runs.skipped, frames, selection,
        edges=edges, compared=compared, verdict_sentence=verdict_sentence(comparisons, verdict), pending_look=pending,
        phases=phases, pool=pool, first_new_seed=CONFIRMATION_SEED_BASE if phases is not None else 0,
        per_layer=per_layer(spec, compared, comparisons, runs, dataset, coverage),
    )  # fmt: skip


def comparison_rows(spec: dict, compared: dict, dataset: str, coverage: Coverage, n_seeds: int | None) -> list[dict]:
    """Every comparison row of the study (an `along:` comparison once per axis value), on the first `n_seeds`
    paired seeds of each (None: on all seeds, as the fixed design). An along row also names its context
    without the axis (`along_context`), for the sentence that reads the verdicts along the axis."""
    rows = []
    for i, declared in enumerate(spec.get("compare") or []):
        cframe, cgrid = compared[declared["metric"]]
        source = coverage.frame() if coverage.settings is not None else cframe
        for comp, along in expand_along(declared, source, i):
            for r in compare(cframe, cgrid, comp, dataset, n_seeds, coverage):
                if along:
                    rest = {k: v for k, v in r["_where"].items() if k != along["along_axis"]}
                    along = {**along, "along_context": filters_label(rest)}
                rows.append({**r, **along})
    return rows
