"""Read a study's runs into one pandas DataFrame and decide its claim: aggregates over seeds, comparisons, verdict.

Runs come from run folders (`config.yaml`, `metrics.jsonl`, `summary.json`, written and read by bnstudy/runs.py) or from the
wandb API. The study's `report:` block (experiments/<study>.yaml, also stored in every run's
config.yaml) names the claim, the metrics, an optional per-arm selection and the comparisons that decide it.
Nothing here writes files or draws; bnstudy.report does. The statistics and verdict rules live in
bnstudy.analysis.stats. Only numpy, pandas, scipy and yaml are imported: no training stack, no GPU.

What is counted where:
- a group is every run with the same config apart from the seed; its value is the mean over the runs
  that finished `done` and trained (bnstudy.analysis.stats.is_trained) with a finite value. Diverged and
  not-trained runs are counted per group and never averaged in, except in the stability metrics that are
  defined on them: `diverged` (the fraction of runs that diverged or did not train) and the derived
  `max_stable` (the largest setting that trained) and `range` (a failed run counts as `diverged_value`).
- with `select: {by: val/acc, over: [optimizer.lr]}`, each arm (a combination of the other grid columns)
  is compared at its own setting of `over` with the best mean validation score over seeds; the test split
  never chooses anything.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats as scipy_stats

from bnstudy.analysis import convergence, stats
from bnstudy.analysis.stats import CONFIDENCE  # noqa: F401  (re-exported: bnstudy.report reads it from here)
from bnstudy.app import config_tree
from bnstudy.app import runs as runs_lib

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = config_tree.experiments_dir()
FINISHED = (*runs_lib.FINISHED, "not_trained")
FAILED = ("diverged", "not_trained")  # counted as failures by the stability metrics

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


class ReportError(RuntimeError):
    """Bad input (unknown study, missing runs, bad report block): the message says what was expected."""


class ReportWarning(UserWarning):
    """A run that could not be used (corrupt folder) or a metric that is missing."""


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class Runs:
    frame: pd.DataFrame  # one row per run: flattened config, summary metrics, status, path
    history: dict[str, Callable[[], list[dict]]]  # run_id -> its logged records (metrics.jsonl)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    specs: list[dict] = field(default_factory=list)  # the runs' `report:` blocks
    config_columns: list[str] = field(default_factory=list)  # the frame's columns that come from config.yaml


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON strings so that columns stay hashable."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def run_row(config: dict, summary: dict, path: str) -> dict:
    row = {**flatten(summary), **config_row(config)}
    row["run_id"] = summary.get("run_id") or Path(path).name
    row["status"] = summary.get("status") or "unknown"
    row["path"] = path
    return row


def config_row(config: dict) -> dict:
    return flatten({k: v for k, v in config.items() if k != "report"})


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that does not parse (a run killed mid-write) is skipped."""
    records, bad = runs_lib.read_metrics(path)
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that are not JSON", ReportWarning, stacklevel=2)
    return records


read_run_folder = runs_lib.read_run_folder


def load_local(runs_dir: Path) -> Runs:
    """Every run folder directly under `runs_dir`; corrupt ones are skipped with a warning. A `running`
    folder whose writer is gone reads as `stale`."""
    if not runs_dir.is_dir():
        raise ReportError(f"no runs directory {runs_dir}: expected one run folder per trained model there.")
    rows, history, skipped, specs, config_cols = [], {}, [], [], {}
    for path in runs_lib.run_folders(runs_dir):
        try:
            config, summary = read_run_folder(path)
        except (OSError, ValueError) as e:
            skipped.append((str(path), str(e)))
            warnings.warn(f"skipping corrupt run folder {path}: {e}", ReportWarning, stacklevel=2)
            continue
        summary = {**summary, "status": runs_lib.effective_status(summary)}
        row = run_row(config, summary, str(path))
        rows.append(row)
        config_cols.update(dict.fromkeys(config_row(config)))
        history[row["run_id"]] = partial(read_jsonl, path / "metrics.jsonl")
        if isinstance(config.get("report"), dict):
            specs.append(config["report"])
    return Runs(pd.DataFrame(rows), history, skipped, specs, list(config_cols))


WANDB_STATES = {"finished": "done", "running": "running", "crashed": "failed", "failed": "failed", "killed": "failed"}


def load_wandb(entity: str | None, project: str, group: str) -> Runs:
    """The runs of one wandb group through the public API, into the same frame as run folders."""
    where = f"{entity + '/' if entity else ''}{project}, group {group!r}"
    try:
        import wandb

        path = f"{entity}/{project}" if entity else project
        api_runs = list(wandb.Api(timeout=60).runs(path, filters={"group": group}))
    except Exception as e:  # no login, no network, no such project: all end here
        raise ReportError(
            f"could not read wandb runs of {where}: {type(e).__name__}: {e}. Check `wandb login`, the network "
            f"and --entity/--project/--group, or report from run folders with --source local."
        ) from None
    if not api_runs:
        raise ReportError(f"wandb has no runs in {where}.")
    rows, history, specs, config_cols = [], {}, [], {}
    for r in api_runs:
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        summary = {k: v for k, v in dict(r.summary_metrics).items() if not k.startswith("_")}
        summary.setdefault("status", WANDB_STATES.get(r.state, r.state))
        summary.setdefault("run_id", r.name)
        row = run_row(config, summary, r.url)
        rows.append(row)
        config_cols.update(dict.fromkeys(config_row(config)))
        history[row["run_id"]] = lambda r=r: [dict(rec) for rec in r.scan_history()]
        if isinstance(config.get("report"), dict):
            specs.append(config["report"])
    return Runs(pd.DataFrame(rows), history, [], specs, list(config_cols))


def experiment_spec(study: str, experiments_dir: Path = EXPERIMENTS_DIR) -> dict | None:
    path = experiments_dir / f"{study}.yaml"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("report")


def known_studies(experiments_dir: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(p.stem for p in experiments_dir.glob("*.yaml"))


def choose_spec(study: str, runs: Runs, experiments_dir: Path = EXPERIMENTS_DIR) -> dict:
    """The report block the runs were trained with (the most common one), else the experiment file's."""
    if runs.specs:
        blobs = pd.Series([json.dumps(s, sort_keys=True) for s in runs.specs])
        if blobs.nunique() > 1:
            warnings.warn(f"runs carry {blobs.nunique()} different report blocks; using the most common", ReportWarning)
        spec = json.loads(blobs.value_counts().index[0])
    else:
        spec = experiment_spec(study, experiments_dir)
    if not spec:
        raise ReportError(
            f"no report block for study {study!r}: expected experiments/{study}.yaml with a `report:` "
            f"block, or runs trained with one. Known studies: {', '.join(known_studies(experiments_dir)) or 'none'}."
        )
    return validate_spec(spec, study)


def _margin_values(value: Any) -> list:
    return list(value.values()) if isinstance(value, dict) else [value]


def _is_margin(value: Any) -> bool:
    """A margin: a number >= 0, or one per dataset ({mnist: 0.005, cifar10: 0.01})."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in _margin_values(value))


def validate_comparison(comp: Any, where: str) -> None:
    """A `compare:` entry: metric, a, b, expect; a declared margin needs `margin_reason`, `equivalent` a margin."""
    if not isinstance(comp, dict):
        raise ReportError(f"{where}: expected a mapping with metric, a, b, expect; got {comp!r}.")
    if "trend" in comp:
        validate_trend(comp, where)
    else:
        missing = [k for k in ("metric", "a", "b", "expect") if k not in comp]
        if missing:
            raise ReportError(f"{where} lacks {missing} (needs metric, a, b, expect; or metric, trend, expect).")
    if comp["expect"] not in stats.EXPECTATIONS:
        raise ReportError(f"{where}: `expect` must be one of {', '.join(stats.EXPECTATIONS)}, got {comp['expect']!r}.")
    if "margin" in comp and not _is_margin(comp["margin"]):
        raise ReportError(f"{where}: `margin` must be a number >= 0 or one per dataset, got {comp['margin']!r}.")
    if comp["expect"] == "equivalent" and not all(v > 0 for v in _margin_values(comp.get("margin", 0))):
        raise ReportError(
            f"{where}: `expect: equivalent` needs a `margin` > 0 (the largest difference that "
            f"does not matter), got {comp.get('margin')!r}."
        )
    if "margin" in comp and not (isinstance(comp.get("margin_reason"), str) and comp["margin_reason"].strip()):
        raise ReportError(
            f"{where}: a declared `margin` needs a `margin_reason` (one sentence: why this size), "
            f"got {comp.get('margin_reason')!r}."
        )


def validate_trend(comp: dict, where: str) -> None:
    """A trend comparison: `{metric, trend: AXIS, expect, [logx], [logy], [a, b]}`: the slope of the metric
    along a grid axis, alone or as the difference of two arms' slopes (a and b given together)."""
    missing = [k for k in ("metric", "expect") if k not in comp]
    if missing:
        raise ReportError(f"{where}: a trend comparison lacks {missing} (needs metric, trend, expect).")
    if not isinstance(comp["trend"], str) or not comp["trend"]:
        raise ReportError(
            f"{where}: `trend` must name the grid axis the slope runs along (e.g. train.batch_size), "
            f"got {comp['trend']!r}."
        )
    if ("a" in comp) != ("b" in comp):
        raise ReportError(
            f"{where}: a trend comparison takes both `a` and `b` (difference of two arms' slopes) or "
            f"neither (one slope), got only {'a' if 'a' in comp else 'b'}."
        )
    for key in ("logx", "logy"):
        if not isinstance(comp.get(key, key == "logx"), bool):
            raise ReportError(f"{where}: `{key}` must be true or false, got {comp[key]!r}.")
    if "relative_to" in comp:
        raise ReportError(f"{where}: `relative_to` is not supported in a trend comparison; use a and b.")


RUN_FUNCTIONS = ("mean", "median", "step0", "log10")  # `fn(key)` run metrics, see add_run_metrics
_FUNCTION_NAME = re.compile(r"^(\w+)\((.+)\)$")


def validate_metric_name(name: Any, study: str) -> None:
    if not isinstance(name, str) or not name:
        raise ReportError(f"study {study!r}: a metric name must be a non-empty string, got {name!r}.")
    m = _FUNCTION_NAME.match(name)
    if m and m.group(1) not in RUN_FUNCTIONS:
        raise ReportError(
            f"study {study!r}: metric {name!r} uses unknown function {m.group(1)!r}; known: "
            f"{', '.join(f'{f}(KEY)' for f in RUN_FUNCTIONS)}."
        )
    if m:
        validate_metric_name(m.group(2), study)


def validate_convergence(conv: Any, study: str) -> None:
    """`convergence: {key: val/acc, tolerance: 0.005}`: the stated criterion behind the `converged` metric."""
    if not (
        isinstance(conv, dict)
        and isinstance(conv.get("key"), str)
        and _is_margin(conv.get("tolerance", -1))
        and not isinstance(conv.get("tolerance"), dict)
    ):
        raise ReportError(
            f"study {study!r}: `convergence` must be {{key: LOGGED_KEY, tolerance: NUMBER >= 0}} "
            f"(e.g. {{key: val/acc, tolerance: 0.005}}), got {conv!r}."
        )


def validate_select(select: Any, study: str) -> None:
    """`select: {by: val/acc, over: [optimizer.lr], mode: max}`: chosen on validation, never on test keys."""
    where = f"study {study!r}: `select`"
    if (
        not isinstance(select, dict)
        or not isinstance(select.get("by"), str)
        or not (
            isinstance(select.get("over"), list) and select["over"] and all(isinstance(k, str) for k in select["over"])
        )
    ):
        raise ReportError(
            f"{where} must be {{by: METRIC, over: [CONFIG_KEY, ...]}} (e.g. {{by: val/acc, over: "
            f"[optimizer.lr]}}), got {select!r}."
        )
    if select["by"].startswith("test/"):
        raise ReportError(
            f"{where}: `by: {select['by']}` is a test metric; a setting must be chosen on the "
            f"validation split (e.g. val/acc or val/loss), never on the test split."
        )
    if select.get("mode", "max") not in ("max", "min"):
        raise ReportError(f"{where}: `mode` must be max or min, got {select.get('mode')!r}.")


def validate_spec(spec: dict, study: str) -> dict:
    if not isinstance(spec.get("claim"), str):
        raise ReportError(f"study {study!r}: the report block needs a `claim` (one sentence).")
    for i, comp in enumerate(spec.get("compare") or []):
        validate_comparison(comp, f"study {study!r}: comparison {i + 1}")
    for name, d in (spec.get("derived") or {}).items():
        if d.get("reduce") not in ("max_stable", "range") or "over" not in d or "of" not in d:
            raise ReportError(f"study {study!r}: derived metric {name!r} needs over, of and reduce: max_stable|range.")
    if "select" in spec:
        validate_select(spec["select"], study)
    for name in spec_metrics(spec):
        validate_metric_name(name, study)
    if "convergence" in spec:
        validate_convergence(spec["convergence"], study)
    elif "converged" in spec_metrics(spec):
        raise ReportError(
            f"study {study!r}: metric `converged` needs a `convergence: {{key, tolerance}}` block "
            f"(the stated criterion)."
        )
    if "steps_to_target" in spec_metrics(spec) and not _is_margin(spec.get("target_acc", -1)):
        raise ReportError(
            f"study {study!r}: metric `steps_to_target` needs `target_acc` (a number, or one per "
            f"dataset), got {spec.get('target_acc')!r}."
        )
    heavy = spec.get("heavy_tailed", [])
    if not (isinstance(heavy, list) and all(isinstance(h, str) for h in heavy)):
        raise ReportError(f"study {study!r}: `heavy_tailed` must be a list of metric names, got {heavy!r}.")
    if not isinstance(spec.get("require_trained", True), bool):
        raise ReportError(f"study {study!r}: `require_trained` must be true or false, got {spec['require_trained']!r}.")
    return spec


# A per-dataset spec value given for the family holds for its members: the embedded digits are MNIST digits.
DATASET_FAMILY = {"mnist_t10k": "mnist"}


def for_dataset(value: Any, dataset: str) -> Any:
    """A spec value given once or per dataset ({mnist: ..., cifar10: ...}; `mnist` also covers mnist_t10k)."""
    if not isinstance(value, dict):
        return value
    return value[dataset] if dataset in value else value.get(DATASET_FAMILY.get(dataset, dataset))


# ----------------------------------------------------------------------------------------------- metrics


def grid_columns(frame: pd.DataFrame, config_cols: list[str]) -> list[str]:
    """Config columns that vary across the runs, except the seed and keys that do not change the model."""
    cols = [c for c in config_cols if c in frame and not c.startswith(NOT_GRID)]
    return [c for c in cols if frame[c].astype(str).nunique(dropna=False) > 1]


def wildcard(key: str) -> re.Pattern | None:
    """`prefix/*/suffix` -> a pattern matching every layer's key (`bn/*/kl`, `ics/*/l2`); None without `*`."""
    if "*" not in key:
        return None
    return re.compile("[^/]+".join(re.escape(part) for part in key.split("*")))


def record_value(rec: dict, key: str, pattern: re.Pattern | None):
    """A record's value of `key`; for a wildcard key the mean over the record's matching keys (None if none)."""
    if pattern is None:
        return rec.get(key)
    values = [v for k, v in rec.items() if v is not None and pattern.fullmatch(k)]
    return float(np.mean(values)) if values else None


def history_frame(runs: Runs, run_ids, key: str) -> pd.DataFrame:
    """Long frame (run_id, step, epoch, value) of one logged key (`a/*/b`: per record, the mean over layers)."""
    pattern = wildcard(key)
    rows = [
        {"run_id": rid, "step": rec.get("step"), "epoch": rec.get("epoch"), "value": value}
        for rid in run_ids
        for rec in runs.history[rid]()
        if (value := record_value(rec, key, pattern)) is not None
    ]
    return pd.DataFrame(rows, columns=["run_id", "step", "epoch", "value"])


def last_logged(runs: Runs, run_ids) -> pd.DataFrame:
    """Per run (index run_id): the last logged value of every key in its metrics.jsonl."""
    last = {}
    for rid in run_ids:
        values = {}
        for rec in runs.history[rid]():
            values.update({k: v for k, v in rec.items() if v is not None})
        last[rid] = values
    return pd.DataFrame.from_dict(last, orient="index")


def _has(frame: pd.DataFrame, name: str) -> bool:
    return name in frame and pd.to_numeric(frame[name], errors="coerce").notna().any()


def _layer_columns(frame: pd.DataFrame, name: str) -> list[str]:
    pattern = wildcard(name)
    return [c for c in frame if pattern.fullmatch(c)] if pattern else []


GEN_GAP_INPUTS = ("train_subset/acc", "test/acc")


def add_run_metrics(frame: pd.DataFrame, runs: Runs, names: list[str], dataset: str, spec: dict) -> list[str]:
    """Add a column per metric the study names; returns the names no run has.

    A final metric missing from summary.json is taken as its last value in metrics.jsonl. Derived ones:
    `diverged` (1 if the run diverged or did not train, else 0), `gen_gap` (bnstudy.analysis.stats.gen_gap:
    train_subset/acc - test/acc; missing for a run that lacks train_subset/acc), `a/*/b` (mean over the
    layers that have it, e.g. `bn/*/kl`, `relu/*/dead_frac`), `epochs_to_target` (first epoch with
    test/acc >= target_acc), `steps_to_target` and `reached_target` (see `steps_to_target_columns`),
    `converged` (see `converged_flags`), and the functions of a key (`*` allowed in the key):
    `mean(key)` (mean over all its logged records), `median(key)` (median over its records with step > 0),
    `step0(key)` (its value at step 0), `log10(metric)` (log10 of another run metric; values <= 0 give none).
    """
    computed = ("diverged", "gen_gap", "epochs_to_target", "steps_to_target", "reached_target", "converged")
    plain = [n for n in names if not _FUNCTION_NAME.match(n)]
    plain += [m.group(2) for n in names if (m := _FUNCTION_NAME.match(n)) and m.group(1) == "log10"]
    wanted = [n for n in plain if n not in computed]
    wanted += list(GEN_GAP_INPUTS) if "gen_gap" in plain else []
    if any(not (_layer_columns(frame, n) if "*" in n else _has(frame, n)) for n in wanted):
        last = last_logged(runs, frame["run_id"])
        for col in last:
            if not _has(frame, col):
                frame[col] = frame["run_id"].map(last[col])
    missing = []
    for name in names:
        m = _FUNCTION_NAME.match(name)
        if m:
            frame[name] = run_function(frame, runs, m.group(1), m.group(2), dataset, spec)
        elif name == "diverged":
            frame[name] = frame["status"].isin(FAILED).astype(float)
        elif name == "gen_gap":
            frame[name] = _gen_gap(frame)
        elif "*" in name:
            cols = _layer_columns(frame, name)
            frame[name] = frame[cols].astype(float).mean(axis=1) if cols else np.nan
        elif name == "epochs_to_target":
            target = for_dataset(spec.get("target_acc"), dataset)
            hist = history_frame(runs, frame["run_id"], "test/acc")
            reached = hist[hist["value"] >= target] if target is not None else hist.iloc[:0]
            frame[name] = frame["run_id"].map(reached.groupby("run_id")["epoch"].min())
        elif name in ("steps_to_target", "reached_target"):
            steps, reached = steps_to_target_columns(frame, runs, spec, dataset)
            frame[name] = steps if name == "steps_to_target" else reached
        elif name == "converged":
            frame[name] = converged_flags(frame, runs, spec["convergence"])
        frame[name] = pd.to_numeric(frame.get(name, np.nan), errors="coerce")
        if not frame[name].notna().any():
            missing.append(name)
    return missing


def run_function(frame: pd.DataFrame, runs: Runs, fn: str, arg: str, dataset: str, spec: dict) -> pd.Series:
    """One value per run of `fn(arg)` (see add_run_metrics)."""
    if fn == "log10":
        if arg not in frame:
            add_run_metrics(frame, runs, [arg], dataset, spec)
        values = _numeric(frame, arg)
        return np.log10(values.where(values > 0))
    hist = history_frame(runs, frame["run_id"], arg)
    hist["value"] = pd.to_numeric(hist["value"], errors="coerce")
    if fn == "mean":
        per_run = hist.groupby("run_id")["value"].mean()
    elif fn == "median":  # step 0 apart: a probe of the untrained net dominates any average that includes it
        per_run = hist[hist["step"] > 0].groupby("run_id")["value"].median()
    else:  # step0
        per_run = hist[hist["step"] == 0].groupby("run_id")["value"].first()
    return frame["run_id"].map(per_run)


def steps_to_target_columns(frame: pd.DataFrame, runs: Runs, spec: dict, dataset: str) -> tuple[pd.Series, pd.Series]:
    """(steps_to_target, reached_target) per run: the first logged step whose `target_key` (default val/acc)
    is >= `target_acc` (bnstudy.analysis.convergence.steps_to_target). A run that never reaches it is censored at
    its last logged step (a lower bound of its true value) and has reached_target 0."""
    target = float(for_dataset(spec["target_acc"], dataset))
    key = spec.get("target_key", "val/acc")
    steps, reached = {}, {}
    for rid in frame["run_id"]:
        history = runs.history[rid]()
        first = convergence.steps_to_target(history, target, key)
        logged = [int(r["step"]) for r in history if r.get(key) is not None and "step" in r]
        reached[rid] = float(first is not None) if logged else np.nan
        steps[rid] = first if first is not None else (max(logged) if logged else np.nan)
    return frame["run_id"].map(steps), frame["run_id"].map(reached)


def converged_flags(frame: pd.DataFrame, runs: Runs, conv: dict) -> pd.Series:
    """1 when the run's last two logged values of `conv['key']` differ by at most `conv['tolerance']` (the
    training had stopped changing that metric), 0 when they differ more, none with fewer than two."""
    hist = history_frame(runs, frame["run_id"], conv["key"]).sort_values("step", kind="stable")
    hist["value"] = pd.to_numeric(hist["value"], errors="coerce")

    def flag(values: pd.Series) -> float:
        v = values.to_numpy(float)
        if len(v) < 2:
            return np.nan
        return float(np.isfinite(v[-2:]).all() and abs(v[-1] - v[-2]) <= conv["tolerance"])

    per_run = hist.groupby("run_id")["value"].apply(flag) if len(hist) else pd.Series(dtype=float)
    return frame["run_id"].map(per_run)


def _numeric(frame: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(frame[col], errors="coerce") if col in frame else pd.Series(np.nan, index=frame.index)


def _gen_gap(frame: pd.DataFrame) -> pd.Series:
    """train_subset/acc - test/acc per run; runs without train_subset/acc get none (with a warning)."""
    train, test = _numeric(frame, "train_subset/acc"), _numeric(frame, "test/acc")
    lacking = frame["status"].eq("done") & train.isna()
    if lacking.any():
        warnings.warn(
            f"gen_gap: {int(lacking.sum())} finished run(s) lack train_subset/acc (training-subset "
            "accuracy in inference mode); their gen_gap is missing",
            ReportWarning,
            stacklevel=3,
        )
    return pd.Series(stats.gen_gap(train, test), index=frame.index)


NUM_CLASSES = {"mnist": 10, "cifar10": 10}


def trained_flags(frame: pd.DataFrame, runs: Runs, dataset: str) -> pd.Series:
    """Per run: did it learn (bnstudy.analysis.stats.is_trained)? A `trained` the run wrote in summary.json wins;
    otherwise the first and last logged train/loss and the final test/acc decide."""
    hist = history_frame(runs, frame["run_id"], "train/loss").sort_values("step", kind="stable")
    first = hist.groupby("run_id")["value"].first()
    last = hist.groupby("run_id")["value"].last()
    final = _numeric(frame, "train/loss").fillna(frame["run_id"].map(last))
    acc = _numeric(frame, "test/acc")
    classes = NUM_CLASSES.get(dataset, 10)
    derived = [
        stats.is_trained(first.get(rid), f if np.isfinite(f) else None, a if np.isfinite(a) else None, classes)
        for rid, f, a in zip(frame["run_id"], final, acc)
    ]
    written = frame["trained"] if "trained" in frame else pd.Series(None, index=frame.index, dtype=object)
    return pd.Series(
        [bool(w) if isinstance(w, (bool, np.bool_)) else d for w, d in zip(written, derived)], index=frame.index
    )


def mark_not_trained(frame: pd.DataFrame, runs: Runs, dataset: str, spec: dict) -> pd.DataFrame:
    """A `done` run that did not learn becomes `not_trained` (unless the study sets `require_trained: false`)."""
    frame = frame.copy()
    done = frame["status"].eq("done")
    frame["trained"] = pd.Series(np.nan, index=frame.index, dtype=object)
    if done.any():
        frame.loc[done, "trained"] = trained_flags(frame[done], runs, dataset)
    if spec.get("require_trained", True):
        frame.loc[done & frame["trained"].eq(False), "status"] = "not_trained"
    return frame


def derive_across(finished: pd.DataFrame, name: str, d: dict, grid: list[str], dataset: str) -> pd.DataFrame:
    """One value per (grid without the `over` axis, seed) from that seed's runs along the axis.

    `max_stable`: the largest axis value whose run finished `done` with `of` >= threshold (log10 if asked).
    `range`: max - min of `of` along the axis, a diverged run counting as `diverged_value`.
    A seed whose runs along the axis have not all finished gets no value.
    """
    keys = [c for c in grid if c != d["over"]] + ["seed"]
    values = finished.get(d["of"], pd.Series(np.nan, index=finished.index)).astype(float)
    n_axis = finished[d["over"]].nunique()
    threshold = for_dataset(d.get("threshold"), dataset)
    rows = []
    for key, g in finished.assign(_v=values).groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        value = np.nan
        if g[d["over"]].nunique() == n_axis:  # only seeds whose whole axis finished
            if d["reduce"] == "max_stable":
                ok = (g["status"] == "done") & (g["_v"] >= (threshold if threshold is not None else -np.inf))
                passed = g.loc[ok, d["over"]].max() if ok.any() else np.nan
                value = math.log10(passed) if d.get("log10") and not np.isnan(passed) else passed
                if d.get("interpolate") and not np.isnan(passed) and threshold is not None:
                    value = interpolated_crossing(g, d, float(passed), threshold)
            else:  # range
                v = g["_v"].where(g["status"] == "done", d.get("diverged_value", np.nan))
                value = v.max() - v.min()
        rows.append({**dict(zip(keys, key)), name: value, "status": "done"})
    return pd.DataFrame(rows)


def interpolated_crossing(g: pd.DataFrame, d: dict, passed: float, threshold: float) -> float:
    """Where `of` falls through the threshold between the largest setting that passed and the next one of the grid, by linear interpolation (in log10 of the setting when `log10`);
    a failed run counts as `diverged_value`. A grid step is coarse: a continuous value per seed lets seeds
    that pass at the same setting still differ, so that their spread is measured rather than zero."""
    xs = np.sort(g[d["over"]].astype(float).unique())
    scale = math.log10 if d.get("log10") else float
    above = xs[xs > passed]
    if not len(above):
        return scale(passed)  # passed at the largest setting of the grid: no crossing inside it
    v = g["_v"].where(g["status"] == "done", d.get("diverged_value", np.nan))
    at = dict(zip(g[d["over"]].astype(float), v))
    y0, y1 = at[passed], at[above[0]]
    fraction = float(np.clip((y0 - threshold) / (y0 - y1), 0.0, 1.0)) if np.isfinite(y1) and y0 > y1 else 1.0
    return float(scale(passed) + fraction * (scale(above[0]) - scale(passed)))


def aggregate(frame: pd.DataFrame, metric: str, by: list[str]) -> pd.DataFrame:
    """Per group: runs, diverged, not trained, n used, mean, std, the 95% interval and the median of one metric.

    The interval is the t-interval of the mean (clipped to the metric's range when it has one, e.g. [0, 1] for
    accuracies); for `diverged`, a proportion, the exact Clopper-Pearson interval.
    """
    f = frame.assign(_v=pd.to_numeric(frame[metric], errors="coerce"), _all=0)
    use = f["status"].eq("done") | (metric == "diverged")
    f["_v"] = f["_v"].where(use)
    g = f.groupby(by or ["_all"], dropna=False, sort=True)
    out = g["_v"].agg(["count", "mean", "std", "median"]).rename(columns={"count": "n"})
    out["runs"] = g.size()
    out["diverged"] = g["status"].agg(lambda s: int((s == "diverged").sum()))
    out["not_trained"] = g["status"].agg(lambda s: int((s == "not_trained").sum()))
    half = stats.t_half_width(out["std"], out["n"])
    out["ci_low"], out["ci_high"] = stats.clip_to_bounds(out["mean"] - half, out["mean"] + half, metric)
    if metric == "diverged":  # a proportion: exact (Clopper-Pearson) binomial interval instead
        cis = [stats.proportion_interval(round(m * n), n) for m, n in zip(out["mean"].fillna(0), out["n"])]
        out["ci_low"], out["ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
    out = out.reset_index().drop(columns=["_all"], errors="ignore")
    out.insert(len(by), "metric", metric)
    return out[[*by, "metric", "runs", "diverged", "not_trained", "n", "mean", "std", "ci_low", "ci_high", "median"]]


# ------------------------------------------------------------------------------------------- comparisons


def _matches(frame: pd.DataFrame, filters: dict) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for key, value in filters.items():
        if key not in frame:
            known = sorted(c for c in frame if "." in c)
            raise ReportError(f"comparison filter on unknown config key {key!r}; known: {known}")
        col = frame[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and pd.api.types.is_numeric_dtype(col):
            mask &= np.isclose(col.astype(float), float(value))
        else:
            mask &= col.astype(str) == str(value)
    return mask


def _label(filters: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in filters.items())


def _seed_values(sel: pd.DataFrame, metric: str) -> pd.Series:
    """The metric's values of the runs used (done, or any finished run for `diverged`), indexed by seed."""
    used = sel["status"].eq("done") | (metric == "diverged")
    part = sel.loc[used]
    values = pd.to_numeric(part[metric], errors="coerce")
    index = part["seed"] if "seed" in part else pd.RangeIndex(len(part))
    return pd.Series(values.to_numpy(), index=pd.Index(index, name="seed")).dropna()


def _expect_text(expect: str, margin: float) -> str:
    if expect == "equivalent":
        return f"within +-{margin:g}"
    return f"{'above' if expect == 'greater' else 'below'} {margin:g}"


def compare(frame: pd.DataFrame, grid: list[str], comp: dict, dataset: str) -> list[dict]:
    """One row per context (every combination of the grid columns the comparison does not fix): the contrast,
    its 95% interval, which interval (paired or Welch) and the unadjusted one-sided p-values of support and
    contradiction. The verdicts come later, over all of a study's rows at once (`decide_rows`)."""
    if "trend" in comp:
        return compare_trend(frame, grid, comp, dataset)
    where, ref = comp.get("where") or {}, comp.get("relative_to")
    fixed = {*comp["a"], *comp["b"], *where, *(ref or {})}
    context_cols = [c for c in grid if c not in fixed]
    contexts = frame[context_cols].drop_duplicates().to_dict("records") if context_cols else [{}]
    margin = float(for_dataset(comp.get("margin", 0.0), dataset) or 0.0)
    sides = [(comp["a"], 1.0), (comp["b"], -1.0)]
    if ref:
        sides += [({**comp["a"], **ref}, -1.0), ({**comp["b"], **ref}, 1.0)]
    results = []
    for ctx in sorted(contexts, key=lambda d: [str(v) for v in d.values()]):
        groups, notes = [], []
        for filters, _ in sides:
            sel = frame[_matches(frame, {**where, **ctx, **filters})]
            groups.append(_seed_values(sel, comp["metric"]))
            notes.append(f"{len(groups[-1])} of {len(sel)}")
        a_label, b_label = _label(comp["a"]), _label(comp["b"])
        row = {
            "metric": comp["metric"],
            "comparison": f"({a_label}) - ({b_label})" + (f" minus the same at {_label(ref)}" if ref else ""),
            "context": _label({**where, **ctx}) or "all runs",
            "expect": _expect_text(comp["expect"], margin),
            "margin": margin,
            "margin_reason": comp.get("margin_reason", ""),
            "mean_a": float(groups[0].mean()) if len(groups[0]) else np.nan,
            "mean_b": float(groups[1].mean()) if len(groups[1]) else np.nan,
            "n": " / ".join(notes),
        }
        results.append(with_contrast(row, groups, [coef for _, coef in sides], comp["expect"], margin))
    return results


def with_contrast(row: dict, groups: list[pd.Series], coefs: list[float], expect: str, margin: float) -> dict:
    """The row with its contrast, 95% interval and one-sided p-values (none when a group has < 2 values)."""
    c = stats.contrast(groups, coefs) if min(len(g) for g in groups) >= 2 else None
    if c is None:
        row.update(
            method="-",
            estimate=np.nan,
            ci_low=np.nan,
            ci_high=np.nan,
            df=np.nan,
            p=np.nan,
            p_support=np.nan,
            p_contra=np.nan,
        )
    else:
        low, high = c.interval()
        p_support, p_contra = stats.one_sided_pvalues(c, expect, margin)
        row.update(
            method=c.method,
            estimate=c.estimate,
            ci_low=low,
            ci_high=high,
            df=c.df,
            p=c.p_two_sided(),
            p_support=p_support,
            p_contra=p_contra,
        )
    row["_contrast"], row["_expect"] = c, expect
    return row


def seed_slopes(sel: pd.DataFrame, metric: str, axis: str, logx: bool, logy: bool, n_axis: int) -> pd.Series:
    """Per seed (index): the least-squares slope of the metric (log10 if `logy`) against the axis (log10 if
    `logx`) over that seed's runs (scipy.stats.linregress). A seed counts only when every one of the
    context's `n_axis` axis values has a finished, trained run with a usable value (> 0 on a log scale):
    a slope over part of the axis would not estimate the same thing."""
    done = sel[sel["status"].eq("done")]
    x = pd.to_numeric(done[axis], errors="coerce")
    y = pd.to_numeric(done[metric], errors="coerce") if metric in done else pd.Series(np.nan, index=done.index)
    ok = np.isfinite(x) & np.isfinite(y) & ((x > 0) if logx else True) & ((y > 0) if logy else True)
    part = pd.DataFrame({"seed": done["seed"], "x": x, "y": y})[ok]
    slopes = {}
    for seed, g in part.groupby("seed", sort=True):
        if g["x"].nunique() == n_axis >= 3 and len(g) == n_axis:
            gx, gy = np.log10(g["x"]) if logx else g["x"], np.log10(g["y"]) if logy else g["y"]
            slopes[seed] = scipy_stats.linregress(gx.to_numpy(float), gy.to_numpy(float)).slope
    return pd.Series(slopes, dtype=float).rename_axis("seed")


def tied_to(frame: pd.DataFrame, col: str, axis: str) -> bool:
    """Whether a grid column takes one value per value of the axis (e.g. an lr scaled with the batch size):
    it moves along the axis, so it is part of the trend, not a context to split it by."""
    return bool(frame.groupby(axis)[col].nunique(dropna=False).max() <= 1)


def compare_trend(frame: pd.DataFrame, grid: list[str], comp: dict, dataset: str) -> list[dict]:
    """A trend over the whole axis: per context, each seed's slope of the metric against `trend` (both on log10
    scales by default for x, `logy` for y); the estimate is the mean slope over seeds with its t-interval, or
    with `a` and `b` the mean per-seed difference of the two arms' slopes (paired by seed when they hold the
    same seeds, Welch otherwise). The slope is in units of y (or log10 y) per unit (per decade) of x."""
    axis, where = comp["trend"], comp.get("where") or {}
    logx, logy = comp.get("logx", True), comp.get("logy", False)
    if axis not in frame:
        raise ReportError(f"trend comparison on {comp['metric']!r}: `trend: {axis}` is not a config key of the runs.")
    arms = [(comp["a"], 1.0), (comp["b"], -1.0)] if "a" in comp else [({}, 1.0)]
    fixed = {axis, *where, *(k for arm, _ in arms for k in arm)}
    context_cols = [c for c in grid if c not in fixed and not tied_to(frame, c, axis)]
    contexts = frame[context_cols].drop_duplicates().to_dict("records") if context_cols else [{}]
    margin = float(for_dataset(comp.get("margin", 0.0), dataset) or 0.0)
    y_name = f"log10 {comp['metric']}" if logy else comp["metric"]
    x_name = f"log10 {axis}" if logx else axis
    results = []
    for ctx in sorted(contexts, key=lambda d: [str(v) for v in d.values()]):
        groups, notes = [], []
        for filters, _ in arms:
            sel = frame[_matches(frame, {**where, **ctx, **filters})]
            n_axis = int(pd.to_numeric(sel[axis], errors="coerce").nunique())
            groups.append(seed_slopes(sel, comp["metric"], axis, logx, logy, n_axis))
            notes.append(f"{len(groups[-1])} of {sel['seed'].nunique() if 'seed' in sel else 0} seeds")
        label = f"slope of {y_name} vs {x_name}"
        if len(arms) == 2:
            label = f"({_label(comp['a'])}) - ({_label(comp['b'])}): {label}"
        row = {
            "metric": comp["metric"],
            "comparison": label,
            "context": _label({**where, **ctx}) or "all runs",
            "expect": _expect_text(comp["expect"], margin),
            "margin": margin,
            "margin_reason": comp.get("margin_reason", ""),
            "mean_a": float(groups[0].mean()) if len(groups[0]) else np.nan,
            "mean_b": float(groups[1].mean()) if len(groups) > 1 and len(groups[1]) else np.nan,
            "n": " / ".join(notes),
        }
        results.append(with_contrast(row, groups, [coef for _, coef in arms], comp["expect"], margin))
    return results


def decide_rows(rows: list[dict]) -> pd.DataFrame:
    """Verdicts of all of a study's comparison rows: Holm-Bonferroni over the rows, support and contradiction."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    verdicts, ps, pc = stats.decide_family(frame["p_support"], frame["p_contra"])
    frame["p_support_holm"], frame["p_contra_holm"], frame["verdict"] = ps, pc, verdicts
    frame["note"] = [
        stats.why(c, e, m, v)
        for c, e, m, v in zip(frame["_contrast"], frame["_expect"], frame["margin"], frame["verdict"])
    ]
    return frame.drop(columns=["_contrast", "_expect"])


# ------------------------------------------------------------------------------------------- selection


def select_per_arm(frame: pd.DataFrame, grid: list[str], select: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs at each arm's selected setting, the selection table).

    An arm is a combination of the grid columns outside `over`; its candidates are its settings of `over`.
    The chosen one has the most runs that trained, then the best mean of `by` (max, or min with
    `mode: min`) over those runs; ties go to the first candidate in sorted order.
    """
    by, over, mode = select["by"], list(select["over"]), select.get("mode", "max")
    unknown = [k for k in over if k not in frame]
    if unknown:
        raise ReportError(f"`select.over` names {unknown}, which are not config keys of the runs.")
    if not _has(frame, by):
        raise ReportError(
            f"`select.by: {by}`: no run has this metric, so no setting can be chosen. Runs must "
            f"log it (validation metrics need a validation split), or drop `select`."
        )
    arms = [c for c in grid if c not in over]
    f = frame.assign(
        _v=_numeric(frame, by).where(frame["status"].eq("done")),
        _trained=frame["status"].eq("done").astype(float),
        _arm=0,
    )
    g = f.groupby([*(arms or ["_arm"]), *over], dropna=False, sort=True)
    table = g.agg(runs=("status", "size"), trained=("_trained", "sum"), n=("_v", "count"), mean=("_v", "mean"))
    table = table.reset_index()
    sign = 1.0 if mode == "max" else -1.0
    table["_score"] = (sign * table["mean"]).fillna(-np.inf)
    best = table.sort_values(["trained", "_score"], ascending=False, kind="stable").groupby(arms or ["_arm"])
    table["selected"] = table.index.isin(best.head(1).index)
    chosen = table.loc[table["selected"], [*(arms or ["_arm"]), *over]]
    selected = f.merge(chosen, on=[*(arms or ["_arm"]), *over]).drop(columns=["_v", "_trained", "_arm"])
    table = table.drop(columns=["_score", "_arm"], errors="ignore").rename(columns={"mean": f"mean {by}"})
    return selected, table


# --------------------------------------------------------------------------------------------- analysis


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


def spec_metrics(spec: dict) -> list[str]:
    names = list(spec.get("metrics") or ["test/acc"])
    names += [c["metric"] for c in spec.get("compare") or []]
    names += [f["y"] for f in spec.get("figures") or [] if "y" in f]
    names += [d["of"] for d in (spec.get("derived") or {}).values()]
    names += [spec["select"]["by"]] if spec.get("select") else []
    return list(dict.fromkeys(names))


def select_dataset(frame: pd.DataFrame, dataset: str | None) -> tuple[pd.DataFrame, str]:
    names = sorted(frame["dataset.name"].dropna().astype(str).unique()) if "dataset.name" in frame else []
    if dataset:
        if dataset not in names:
            raise ReportError(f"no runs on dataset {dataset!r}; the runs use {names}.")
        return frame[frame["dataset.name"] == dataset], dataset
    if len(names) > 1:
        raise ReportError(f"the runs use several datasets {names}: choose one with --dataset (and an --out for each).")
    return frame, names[0] if names else "unknown"


def analyse(study: str, runs: Runs, dataset: str | None = None, experiments_dir: Path = EXPERIMENTS_DIR) -> Analysis:
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
    tables = [aggregate(finished, m, grid).assign(table="runs") for m in run_names]
    compared = dict(frames)  # metric -> (frame, grid) that its comparisons use
    selection = None
    if spec.get("select"):
        chosen, selection = select_per_arm(finished, grid, spec["select"])
        sgrid = [c for c in grid if c not in spec["select"]["over"]]
        compared = {m: (chosen, sgrid) for m in run_names}
        over = ", ".join(spec["select"]["over"])
        tables += [aggregate(chosen, m, sgrid).assign(table=f"at each arm's selected {over}") for m in run_names]
    for name, d in derived.items():
        # With a per-arm selection, an axis other than the selected one is derived from the selected runs
        # (e.g. the spread over init scales of each (norm, scale)'s accuracy at its own selected lr).
        at_selected = selection is not None and d["over"] not in spec["select"]["over"]
        base, bgrid = (compared[d["of"]]) if at_selected else (finished, grid)
        dframe = derive_across(base, name, d, bgrid, dataset)
        dgrid = [c for c in bgrid if c != d["over"]]
        frames[name] = compared[name] = (dframe, dgrid)
        where = f", at each arm's selected {', '.join(spec['select']['over'])}" if at_selected else ""
        tables.append(aggregate(dframe, name, dgrid).assign(table=f"per seed, over {d['over']}{where}"))
        if dframe[name].isna().all():
            missing.append(name)
    for m in missing:
        warnings.warn(f"study {study!r}: no run has metric {m!r}", ReportWarning)
    summary = pd.concat(tables, ignore_index=True)
    results = []
    for comp in spec.get("compare") or []:
        cframe, cgrid = compared[comp["metric"]]
        results += compare(cframe, cgrid, comp, dataset)
    comparisons = decide_rows(results)
    verdict = stats.overall(list(comparisons["verdict"])) if len(comparisons) else "inconclusive"
    return Analysis(
        study, spec, dataset, frame, grid, summary, comparisons, verdict, missing, runs.skipped, frames, selection
    )
