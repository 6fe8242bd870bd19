"""Read a study's runs into one pandas DataFrame and decide its claim: aggregates over seeds, comparisons, verdict.

Runs come from run folders (`config.yaml`, `metrics.jsonl`, `summary.json`, read by bnstudy/runs.py) or from the
wandb API. The study's `report:` block (configs/experiment/<study>.yaml, also stored in every run's
config.yaml) names the claim, the metrics and the comparisons that decide it. Nothing here writes files or
draws; bnstudy.report does. Only numpy, pandas, scipy and yaml are imported: no training stack, no GPU.

Statistics, stated once:
- a group is every run with the same config apart from the seed; its value is the mean over the runs
  that finished (`done`) with a finite value, with the sample std, n and the 95% t-interval
  mean +- t(0.975, n-1) * std / sqrt(n). Diverged runs are counted per group and never averaged in
  (except in metrics defined on them: `diverged`, the divergence rate, whose interval is the exact
  Clopper-Pearson binomial one, and derived metrics that say how they use them).
- a comparison is a contrast of group means (A - B, or (A - B) - (A' - B') with `relative_to`), with a
  Welch (unequal variances, Welch-Satterthwaite df) 95% t-interval. It supports its part of the claim
  when the interval lies entirely on the claimed side of the margin (default 0), contradicts it when it
  lies entirely on the other side, and is inconclusive otherwise (or with fewer than 2 runs in a group).
- the claim is supported when every comparison supports it (an intersection-union test, so no
  multiplicity correction is needed for "supported"), contradicted when any comparison contradicts it,
  and inconclusive otherwise.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from bnstudy import runs as runs_lib

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = REPO / "configs" / "experiment"
CONFIDENCE = 0.95
FINISHED = runs_lib.FINISHED

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
            f"no report block for study {study!r}: expected configs/experiment/{study}.yaml with a `report:` "
            f"block, or runs trained with one. Known studies: {', '.join(known_studies(experiments_dir)) or 'none'}."
        )
    return validate_spec(spec, study)


def validate_spec(spec: dict, study: str) -> dict:
    if not isinstance(spec.get("claim"), str):
        raise ReportError(f"study {study!r}: the report block needs a `claim` (one sentence).")
    for i, comp in enumerate(spec.get("compare") or []):
        missing = [k for k in ("metric", "a", "b", "expect") if k not in comp]
        if missing:
            raise ReportError(f"study {study!r}: comparison {i + 1} lacks {missing} (needs metric, a, b, expect).")
        if comp["expect"] not in ("greater", "less"):
            raise ReportError(
                f"study {study!r}: comparison {i + 1}: `expect` must be greater or less, got {comp['expect']!r}."
            )
    for name, d in (spec.get("derived") or {}).items():
        if d.get("reduce") not in ("max_stable", "range") or "over" not in d or "of" not in d:
            raise ReportError(f"study {study!r}: derived metric {name!r} needs over, of and reduce: max_stable|range.")
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


def add_run_metrics(frame: pd.DataFrame, runs: Runs, names: list[str], dataset: str, spec: dict) -> list[str]:
    """Add a column per metric the study names; returns the names no run has.

    A final metric missing from summary.json is taken as its last value in metrics.jsonl. Derived ones:
    `diverged` (0/1), `gen_gap` (train/epoch_acc - test/acc), `bn/*/key` (mean over BN layers),
    `mean(key)` (mean over the logged records), `epochs_to_target` (first epoch with test/acc >= target_acc).
    """
    computed = ("diverged", "gen_gap", "epochs_to_target")
    wanted = [n for n in names if n not in computed and not n.startswith("mean(")]
    if any(not (_layer_columns(frame, n) if n.startswith("bn/*/") else _has(frame, n)) for n in wanted):
        last = last_logged(runs, frame["run_id"])
        for col in last:
            if not _has(frame, col):
                frame[col] = frame["run_id"].map(last[col])
    missing = []
    for name in dict.fromkeys(names):
        if name == "diverged":
            frame[name] = (frame["status"] == "diverged").astype(float)
        elif name == "gen_gap" and {"train/epoch_acc", "test/acc"} <= set(frame):
            frame[name] = frame["train/epoch_acc"].astype(float) - frame["test/acc"].astype(float)
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


def proportion_ci(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (np.nan, np.nan)
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    return (ci.low, ci.high)


def aggregate(frame: pd.DataFrame, metric: str, by: list[str]) -> pd.DataFrame:
    """Per group: runs, diverged, n used, mean, std and the 95% t-interval of one metric."""
    f = frame.assign(_v=pd.to_numeric(frame[metric], errors="coerce"), _all=0)
    use = f["status"].eq("done") | (metric == "diverged")
    f["_v"] = f["_v"].where(use)
    g = f.groupby(by or ["_all"], dropna=False, sort=True)
    out = g["_v"].agg(["count", "mean", "std"]).rename(columns={"count": "n"})
    out["runs"] = g.size()
    out["diverged"] = g["status"].agg(lambda s: int((s == "diverged").sum()))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, out["n"] - 1) * out["std"] / np.sqrt(out["n"])
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    if metric == "diverged":  # a proportion: exact (Clopper-Pearson) binomial interval instead
        cis = [proportion_ci(round(m * n), n) for m, n in zip(out["mean"].fillna(0), out["n"])]
        out["ci_low"], out["ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
    out = out.reset_index().drop(columns=["_all"], errors="ignore")
    out.insert(len(by), "metric", metric)
    return out[[*by, "metric", "runs", "diverged", "n", "mean", "std", "ci_low", "ci_high"]]


# ------------------------------------------------------------------------------------------- comparisons


def welch_contrast(groups: list[np.ndarray], coefs: list[float]) -> dict:
    """Sum_i c_i * mean_i with its Welch-Satterthwaite t-interval and two-sided p-value (H0: contrast = 0)."""
    n = np.array([len(g) for g in groups], float)
    means = np.array([np.mean(g) for g in groups])
    var = np.array([np.var(g, ddof=1) for g in groups])
    c = np.asarray(coefs, float)
    estimate = float(c @ means)
    terms = c**2 * var / n
    se = float(math.sqrt(terms.sum()))
    if se == 0.0:  # every group has zero spread: the interval collapses to the point
        return {"estimate": estimate, "ci_low": estimate, "ci_high": estimate, "df": np.inf, "p": np.nan, "se": 0.0}
    df = se**4 / float((terms**2 / (n - 1)).sum())
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, df) * se
    p = 2 * stats.t.sf(abs(estimate) / se, df)
    return {"estimate": estimate, "ci_low": estimate - half, "ci_high": estimate + half, "df": df, "p": p, "se": se}


def decide(ci_low: float, ci_high: float, expect: str, margin: float) -> str:
    """supported / contradicted / inconclusive from where the interval lies relative to the margin."""
    above, below = ci_low > margin, ci_high < margin
    if expect == "greater":
        return "supported" if above else "contradicted" if below else "inconclusive"
    return "supported" if below else "contradicted" if above else "inconclusive"


def overall(verdicts: list[str]) -> str:
    if not verdicts:
        return "inconclusive"
    if "contradicted" in verdicts:
        return "contradicted"
    return "supported" if all(v == "supported" for v in verdicts) else "inconclusive"


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


def compare(frame: pd.DataFrame, grid: list[str], comp: dict, dataset: str) -> list[dict]:
    """One result per context (every combination of the grid columns the comparison does not fix)."""
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
        groups, coefs, notes = [], [], []
        for filters, coef in sides:
            sel = frame[_matches(frame, {**where, **ctx, **filters})]
            used = sel["status"].eq("done") | (comp["metric"] == "diverged")
            values = pd.to_numeric(sel.loc[used, comp["metric"]], errors="coerce").dropna()
            groups.append(values.to_numpy())
            coefs.append(coef)
            notes.append(f"{len(values)} of {len(sel)}")
        a_label, b_label = _label(comp["a"]), _label(comp["b"])
        row = {
            "metric": comp["metric"],
            "comparison": f"({a_label}) - ({b_label})" + (f" minus the same at {_label(ref)}" if ref else ""),
            "context": _label({**where, **ctx}) or "all runs",
            "expect": f"{'above' if comp['expect'] == 'greater' else 'below'} {margin:g}",
            "mean_a": float(np.mean(groups[0])) if len(groups[0]) else np.nan,
            "mean_b": float(np.mean(groups[1])) if len(groups[1]) else np.nan,
            "n": " / ".join(notes),
        }
        if min(len(g) for g in groups) < 2:
            row.update(estimate=np.nan, ci_low=np.nan, ci_high=np.nan, df=np.nan, p=np.nan,
                       verdict="inconclusive", note="fewer than 2 finished runs with this metric in a group")
        else:
            stat = welch_contrast(groups, coefs)
            row.update({k: stat[k] for k in ("estimate", "ci_low", "ci_high", "df", "p")})
            row["verdict"] = decide(stat["ci_low"], stat["ci_high"], comp["expect"], margin)
            row["note"] = "zero spread in every group" if stat["se"] == 0 else ""
        results.append(row)
    return results


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


def spec_metrics(spec: dict) -> list[str]:
    names = list(spec.get("metrics") or ["test/acc"])
    names += [c["metric"] for c in spec.get("compare") or []]
    names += [f["y"] for f in spec.get("figures") or [] if "y" in f]
    names += [d["of"] for d in (spec.get("derived") or {}).values()]
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
    frame = frame.copy()
    finished = frame[frame["status"].isin(FINISHED)].copy()
    if finished.empty:
        raise ReportError(f"none of the {len(frame)} run(s) of study {study!r} has finished (all running or failed).")
    grid = grid_columns(finished, runs.config_columns)
    derived = spec.get("derived") or {}
    run_names = [m for m in spec_metrics(spec) if m not in derived]
    missing = add_run_metrics(finished, runs, run_names, dataset, spec)
    frames = {m: (finished, grid) for m in run_names}
    tables = [aggregate(finished, m, grid).assign(table="runs") for m in run_names]
    for name, d in derived.items():
        dframe = derive_across(finished, name, d, grid, dataset)
        dgrid = [c for c in grid if c != d["over"]]
        frames[name] = (dframe, dgrid)
        tables.append(aggregate(dframe, name, dgrid).assign(table=f"per seed, over {d['over']}"))
        if dframe[name].isna().all():
            missing.append(name)
    for m in missing:
        warnings.warn(f"study {study!r}: no run has metric {m!r}", ReportWarning)
    summary = pd.concat(tables, ignore_index=True)
    results = []
    for comp in spec.get("compare") or []:
        cframe, cgrid = frames[comp["metric"]]
        results += compare(cframe, cgrid, comp, dataset)
    comparisons = pd.DataFrame(results)
    verdict = overall(list(comparisons["verdict"])) if len(comparisons) else "inconclusive"
    return Analysis(study, spec, dataset, frame, grid, summary, comparisons, verdict, missing, runs.skipped, frames)
