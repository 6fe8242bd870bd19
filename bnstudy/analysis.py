"""Read a study's runs into one pandas DataFrame and decide its claim: aggregates over seeds, comparisons, verdict.

Runs come from run folders (`config.yaml`, `metrics.jsonl`, `summary.json`, written and read by bnstudy/runs.py) or from the
wandb API. The study's `report:` block (experiments/<study>.yaml, also stored in every run's
config.yaml) names the claim, the metrics, an optional per-arm selection and the comparisons that decide it.
Nothing here writes files or draws; bnstudy.report does. The statistics and verdict rules live in
bnstudy.stats. Only numpy, pandas, scipy and yaml are imported: no training stack, no GPU.

What is counted where:
- a group is every run with the same config apart from the seed; its value is the mean over the runs
  that finished `done` and trained (bnstudy.stats.is_trained) with a finite value. Diverged and
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

from bnstudy import config_tree, stats
from bnstudy import runs as runs_lib
from bnstudy.stats import CONFIDENCE  # noqa: F401  (re-exported: bnstudy.report reads it from here)

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = config_tree.experiments_dir()
FINISHED = (*runs_lib.FINISHED, "not_trained")
FAILED = ("diverged", "not_trained")  # counted as failures by the stability metrics

# Config keys that do not define what was trained (prefixes): never grouping columns.
NOT_GRID = ("seed", "out_dir", "compile_cache_dir", "study", "logger.", "report", "train.pack_size", "train.loop",
            "dataset.data_dir", "dataset.download", "train.eval_batch_size", "probe.", "discrepancy.")


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
    missing = [k for k in ("metric", "a", "b", "expect") if k not in comp]
    if missing:
        raise ReportError(f"{where} lacks {missing} (needs metric, a, b, expect).")
    if comp["expect"] not in stats.EXPECTATIONS:
        raise ReportError(f"{where}: `expect` must be one of {', '.join(stats.EXPECTATIONS)}, got {comp['expect']!r}.")
    if "margin" in comp and not _is_margin(comp["margin"]):
        raise ReportError(f"{where}: `margin` must be a number >= 0 or one per dataset, got {comp['margin']!r}.")
    if comp["expect"] == "equivalent" and not all(v > 0 for v in _margin_values(comp.get("margin", 0))):
        raise ReportError(f"{where}: `expect: equivalent` needs a `margin` > 0 (the largest difference that "
                          f"does not matter), got {comp.get('margin')!r}.")
    if "margin" in comp and not (isinstance(comp.get("margin_reason"), str) and comp["margin_reason"].strip()):
        raise ReportError(f"{where}: a declared `margin` needs a `margin_reason` (one sentence: why this size), "
                          f"got {comp.get('margin_reason')!r}.")


def validate_select(select: Any, study: str) -> None:
    """`select: {by: val/acc, over: [optimizer.lr], mode: max}`: chosen on validation, never on test keys."""
    where = f"study {study!r}: `select`"
    if not isinstance(select, dict) or not isinstance(select.get("by"), str) or not (
            isinstance(select.get("over"), list) and select["over"] and all(isinstance(k, str) for k in select["over"])):
        raise ReportError(f"{where} must be {{by: METRIC, over: [CONFIG_KEY, ...]}} (e.g. {{by: val/acc, over: "
                          f"[optimizer.lr]}}), got {select!r}.")
    if select["by"].startswith("test/"):
        raise ReportError(f"{where}: `by: {select['by']}` is a test metric; a setting must be chosen on the "
                          f"validation split (e.g. val/acc or val/loss), never on the test split.")
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
    if not isinstance(spec.get("require_trained", True), bool):
        raise ReportError(f"study {study!r}: `require_trained` must be true or false, got {spec['require_trained']!r}.")
    return spec


def for_dataset(value: Any, dataset: str) -> Any:
    """A spec value given once or per dataset ({mnist: ..., cifar10: ...})."""
    return value.get(dataset) if isinstance(value, dict) else value


# ----------------------------------------------------------------------------------------------- metrics


def grid_columns(frame: pd.DataFrame, config_cols: list[str]) -> list[str]:
    """Config columns that vary across the runs, except the seed and keys that do not change the model."""
    cols = [c for c in config_cols if c in frame and not c.startswith(NOT_GRID)]
    return [c for c in cols if frame[c].astype(str).nunique(dropna=False) > 1]


def history_frame(runs: Runs, run_ids, key: str) -> pd.DataFrame:
    """Long frame (run_id, step, epoch, value) of one logged key."""
    rows = [
        {"run_id": rid, "step": rec.get("step"), "epoch": rec.get("epoch"), "value": rec[key]}
        for rid in run_ids
        for rec in runs.history[rid]()
        if rec.get(key) is not None
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
    return [c for c in frame if re.fullmatch(rf"bn/[^/]+/{re.escape(name[5:])}", c)]


GEN_GAP_INPUTS = ("train_subset/acc", "test/acc")


def add_run_metrics(frame: pd.DataFrame, runs: Runs, names: list[str], dataset: str, spec: dict) -> list[str]:
    """Add a column per metric the study names; returns the names no run has.

    A final metric missing from summary.json is taken as its last value in metrics.jsonl. Derived ones:
    `diverged` (1 if the run diverged or did not train, else 0), `gen_gap` (bnstudy.stats.gen_gap:
    train_subset/acc - test/acc; missing for a run that lacks train_subset/acc), `bn/*/key` (mean over BN
    layers), `mean(key)` (mean over the logged records), `epochs_to_target` (first epoch with
    test/acc >= target_acc).
    """
    computed = ("diverged", "gen_gap", "epochs_to_target")
    wanted = [n for n in names if n not in computed and not n.startswith("mean(")]
    wanted += list(GEN_GAP_INPUTS) if "gen_gap" in names else []
    if any(not (_layer_columns(frame, n) if n.startswith("bn/*/") else _has(frame, n)) for n in wanted):
        last = last_logged(runs, frame["run_id"])
        for col in last:
            if not _has(frame, col):
                frame[col] = frame["run_id"].map(last[col])
    missing = []
    for name in dict.fromkeys(names):
        if name == "diverged":
            frame[name] = frame["status"].isin(FAILED).astype(float)
        elif name == "gen_gap":
            frame[name] = _gen_gap(frame)
        elif name.startswith("bn/*/"):
            cols = _layer_columns(frame, name)
            frame[name] = frame[cols].astype(float).mean(axis=1) if cols else np.nan
        elif name.startswith("mean(") and name.endswith(")"):
            hist = history_frame(runs, frame["run_id"], name[5:-1])
            frame[name] = frame["run_id"].map(hist.groupby("run_id")["value"].mean())
        elif name == "epochs_to_target":
            target = for_dataset(spec.get("target_acc"), dataset)
            hist = history_frame(runs, frame["run_id"], "test/acc")
            reached = hist[hist["value"] >= target] if target is not None else hist.iloc[:0]
            frame[name] = frame["run_id"].map(reached.groupby("run_id")["epoch"].min())
        frame[name] = pd.to_numeric(frame.get(name, np.nan), errors="coerce")
        if not frame[name].notna().any():
            missing.append(name)
    return missing


def _numeric(frame: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(frame[col], errors="coerce") if col in frame else pd.Series(np.nan, index=frame.index)


def _gen_gap(frame: pd.DataFrame) -> pd.Series:
    """train_subset/acc - test/acc per run; runs without train_subset/acc get none (with a warning)."""
    train, test = _numeric(frame, "train_subset/acc"), _numeric(frame, "test/acc")
    lacking = frame["status"].eq("done") & train.isna()
    if lacking.any():
        warnings.warn(f"gen_gap: {int(lacking.sum())} finished run(s) lack train_subset/acc (training-subset "
                      "accuracy in inference mode); their gen_gap is missing", ReportWarning, stacklevel=3)
    return pd.Series(stats.gen_gap(train, test), index=frame.index)


NUM_CLASSES = {"mnist": 10, "cifar10": 10}


def trained_flags(frame: pd.DataFrame, runs: Runs, dataset: str) -> pd.Series:
    """Per run: did it learn (bnstudy.stats.is_trained)? A `trained` the run wrote in summary.json wins;
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
    return pd.Series([bool(w) if isinstance(w, (bool, np.bool_)) else d for w, d in zip(written, derived)],
                     index=frame.index)


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
                value = g.loc[ok, d["over"]].max() if ok.any() else np.nan
                if d.get("log10") and not np.isnan(value):
                    value = math.log10(value)
            else:  # range
                v = g["_v"].where(g["status"] == "done", d.get("diverged_value", np.nan))
                value = v.max() - v.min()
        rows.append({**dict(zip(keys, key)), name: value, "status": "done"})
    return pd.DataFrame(rows)


def aggregate(frame: pd.DataFrame, metric: str, by: list[str]) -> pd.DataFrame:
    """Per group: runs, diverged, not trained, n used, mean, std and the 95% interval of one metric.

    The interval is the t-interval of the mean (clipped to the metric's range when it has one, e.g. [0, 1] for
    accuracies); for `diverged`, a proportion, the exact Clopper-Pearson interval.
    """
    f = frame.assign(_v=pd.to_numeric(frame[metric], errors="coerce"), _all=0)
    use = f["status"].eq("done") | (metric == "diverged")
    f["_v"] = f["_v"].where(use)
    g = f.groupby(by or ["_all"], dropna=False, sort=True)
    out = g["_v"].agg(["count", "mean", "std"]).rename(columns={"count": "n"})
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
    return out[[*by, "metric", "runs", "diverged", "not_trained", "n", "mean", "std", "ci_low", "ci_high"]]


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
        c = stats.contrast(groups, [coef for _, coef in sides]) if min(len(g) for g in groups) >= 2 else None
        if c is None:
            row.update(method="-", estimate=np.nan, ci_low=np.nan, ci_high=np.nan, df=np.nan, p=np.nan,
                       p_support=np.nan, p_contra=np.nan)
        else:
            low, high = c.interval()
            p_support, p_contra = stats.one_sided_pvalues(c, comp["expect"], margin)
            row.update(method=c.method, estimate=c.estimate, ci_low=low, ci_high=high, df=c.df, p=c.p_two_sided(),
                       p_support=p_support, p_contra=p_contra)
        row["_contrast"], row["_expect"] = c, comp["expect"]
        results.append(row)
    return results


def decide_rows(rows: list[dict]) -> pd.DataFrame:
    """Verdicts of all of a study's comparison rows: Holm-Bonferroni over the rows, support and contradiction."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    verdicts, ps, pc = stats.decide_family(frame["p_support"], frame["p_contra"])
    frame["p_support_holm"], frame["p_contra_holm"], frame["verdict"] = ps, pc, verdicts
    frame["note"] = [stats.why(c, e, m, v) for c, e, m, v in
                     zip(frame["_contrast"], frame["_expect"], frame["margin"], frame["verdict"])]
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
        raise ReportError(f"`select.by: {by}`: no run has this metric, so no setting can be chosen. Runs must "
                          f"log it (validation metrics need a validation split), or drop `select`.")
    arms = [c for c in grid if c not in over]
    f = frame.assign(_v=_numeric(frame, by).where(frame["status"].eq("done")),
                     _trained=frame["status"].eq("done").astype(float), _arm=0)
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
        dframe = derive_across(finished, name, d, grid, dataset)
        dgrid = [c for c in grid if c != d["over"]]
        frames[name] = compared[name] = (dframe, dgrid)
        tables.append(aggregate(dframe, name, dgrid).assign(table=f"per seed, over {d['over']}"))
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
    return Analysis(study, spec, dataset, frame, grid, summary, comparisons, verdict, missing, runs.skipped, frames,
                    selection)
