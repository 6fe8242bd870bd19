"""Run metrics computed from each run's summary and logged history, and per-seed metrics derived across a grid axis.

Per run: `diverged` and the trained flag (a `done` run that did not learn becomes `not_trained`), `gen_gap`,
layer means `a/*/b`, `mean()`/`median()`/`step0()`/`log10()` of a key, epochs and steps to a target accuracy,
`converged`. Per seed across an axis: `max_stable` (the largest setting that trained) and `range`.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd

from bnstudy import records as runs_lib
from bnstudy.analysis import convergence, stats
from bnstudy.analysis.errors import ReportWarning
from bnstudy.analysis.load import LoadedRuns
from bnstudy.analysis.spec import FUNCTION_NAME, for_dataset

FINISHED = (*runs_lib.FINISHED, "not_trained")
FAILED = ("diverged", "not_trained")  # counted as failures by the stability metrics


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


def history_frame(runs: LoadedRuns, run_ids, key: str) -> pd.DataFrame:
    """Long frame (run_id, step, epoch, value) of one logged key (`a/*/b`: per record, the mean over layers)."""
    pattern = wildcard(key)
    rows = [
        {"run_id": rid, "step": rec.get("step"), "epoch": rec.get("epoch"), "value": value}
        for rid in run_ids
        for rec in runs.history[rid]()
        if (value := record_value(rec, key, pattern)) is not None
    ]
    return pd.DataFrame(rows, columns=["run_id", "step", "epoch", "value"])


def last_logged(runs: LoadedRuns, run_ids) -> pd.DataFrame:
    """Per run (index run_id): the last logged value of every key in its metrics.jsonl."""
    last = {}
    for rid in run_ids:
        values = {}
        for rec in runs.history[rid]():
            values.update({k: v for k, v in rec.items() if v is not None})
        last[rid] = values
    return pd.DataFrame.from_dict(last, orient="index")


def has_values(frame: pd.DataFrame, name: str) -> bool:
    return name in frame and pd.to_numeric(frame[name], errors="coerce").notna().any()


def _layer_columns(frame: pd.DataFrame, name: str) -> list[str]:
    pattern = wildcard(name)
    return [c for c in frame if pattern.fullmatch(c)] if pattern else []


GEN_GAP_INPUTS = ("train_subset/acc", "test/acc")


def add_run_metrics(frame: pd.DataFrame, runs: LoadedRuns, names: list[str], dataset: str, spec: dict) -> list[str]:
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
    plain = [n for n in names if not FUNCTION_NAME.match(n)]
    plain += [m.group(2) for n in names if (m := FUNCTION_NAME.match(n)) and m.group(1) == "log10"]
    wanted = [n for n in plain if n not in computed]
    wanted += list(GEN_GAP_INPUTS) if "gen_gap" in plain else []
    if any(not (_layer_columns(frame, n) if "*" in n else has_values(frame, n)) for n in wanted):
        last = last_logged(runs, frame["run_id"])
        for col in last:
            if not has_values(frame, col):
                frame[col] = frame["run_id"].map(last[col])
    missing, unreached = [], False
    for name in names:
        m = FUNCTION_NAME.match(name)
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
            frame[name], unreached = epochs_to_target(frame, runs, spec, dataset)
        elif name in ("steps_to_target", "reached_target"):
            steps, reached = steps_to_target_columns(frame, runs, spec, dataset)
            frame[name] = steps if name == "steps_to_target" else reached
        elif name == "converged":
            frame[name] = converged_flags(frame, runs, spec["convergence"])
        frame[name] = pd.to_numeric(frame.get(name, np.nan), errors="coerce")
        if not frame[name].notna().any() and not (name == "epochs_to_target" and unreached):
            missing.append(name)
    return missing


def epochs_to_target(frame: pd.DataFrame, runs: LoadedRuns, spec: dict, dataset: str) -> tuple[pd.Series, bool]:
    """Per run, the first evaluated epoch with test/acc >= the spec's target_acc (none if never reached), and
    whether the runs logged test/acc but none reached it: then a warning says so, not that the metric is
    missing (quick runs of one epoch stop short of the target)."""
    target = for_dataset(spec.get("target_acc"), dataset)
    hist = history_frame(runs, frame["run_id"], "test/acc")
    reached = hist[hist["value"] >= target] if target is not None else hist.iloc[:0]
    values = frame["run_id"].map(reached.groupby("run_id")["epoch"].min())
    unreached = target is not None and not hist.empty and reached.empty
    if unreached:
        best = pd.to_numeric(hist["value"], errors="coerce").max()
        warnings.warn(
            f"epochs_to_target: no run reached target_acc {target:g} on test/acc (best {best:.4f}); "
            "its table rows count no runs",
            ReportWarning,
            stacklevel=3,
        )
    return values, unreached


def run_function(frame: pd.DataFrame, runs: LoadedRuns, fn: str, arg: str, dataset: str, spec: dict) -> pd.Series:
    """One value per run of `fn(arg)` (see add_run_metrics)."""
    if fn == "log10":
        if arg not in frame:
            add_run_metrics(frame, runs, [arg], dataset, spec)
        values = numeric_column(frame, arg)
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


def steps_to_target_columns(
    frame: pd.DataFrame, runs: LoadedRuns, spec: dict, dataset: str
) -> tuple[pd.Series, pd.Series]:
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


def converged_flags(frame: pd.DataFrame, runs: LoadedRuns, conv: dict) -> pd.Series:
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


def numeric_column(frame: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(frame[col], errors="coerce") if col in frame else pd.Series(np.nan, index=frame.index)


def _gen_gap(frame: pd.DataFrame) -> pd.Series:
    """train_subset/acc - test/acc per run; runs without train_subset/acc get none (with a warning)."""
    train, test = numeric_column(frame, "train_subset/acc"), numeric_column(frame, "test/acc")
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


def trained_flags(frame: pd.DataFrame, runs: LoadedRuns, dataset: str) -> pd.Series:
    """Per run: did it learn (bnstudy.analysis.stats.is_trained)? A `trained` the run wrote in summary.json wins;
    otherwise the first and last logged train/loss and the final test/acc decide."""
    hist = history_frame(runs, frame["run_id"], "train/loss").sort_values("step", kind="stable")
    first = hist.groupby("run_id")["value"].first()
    last = hist.groupby("run_id")["value"].last()
    final = numeric_column(frame, "train/loss").fillna(frame["run_id"].map(last))
    acc = numeric_column(frame, "test/acc")
    classes = NUM_CLASSES.get(dataset, 10)
    derived = [
        stats.is_trained(first.get(rid), f if np.isfinite(f) else None, a if np.isfinite(a) else None, classes)
        for rid, f, a in zip(frame["run_id"], final, acc)
    ]
    written = frame["trained"] if "trained" in frame else pd.Series(None, index=frame.index, dtype=object)
    return pd.Series(
        [bool(w) if isinstance(w, (bool, np.bool_)) else d for w, d in zip(written, derived)], index=frame.index
    )


def mark_not_trained(frame: pd.DataFrame, runs: LoadedRuns, dataset: str, spec: dict) -> pd.DataFrame:
    """A `done` run that did not learn becomes `not_trained` (unless the study sets `require_trained: false`)."""
    frame = frame.copy()
    done = frame["status"].eq("done")
    frame["trained"] = pd.Series(np.nan, index=frame.index, dtype=object)
    if done.any():
        frame.loc[done, "trained"] = trained_flags(frame[done], runs, dataset)
    if spec.get("require_trained", True):
        frame.loc[done & frame["trained"].eq(False), "status"] = "not_trained"
    return frame


def derive_across(
    finished: pd.DataFrame, name: str, d: dict, grid: list[str], dataset: str, n_axis: int | None = None
) -> pd.DataFrame:
    """One value per (grid without the `over` axis, seed) from that seed's runs along the axis.

    `max_stable`: the largest axis value whose run finished `done` with `of` >= threshold (log10 if asked).
    `range`: max - min of `of` along the axis, a diverged run counting as `diverged_value`.
    A seed whose runs along the axis have not all finished gets no value; `n_axis` is how many axis values
    make the whole axis (default: as many as the runs hold).
    """
    keys = [c for c in grid if c != d["over"]] + ["seed"]
    values = finished.get(d["of"], pd.Series(np.nan, index=finished.index)).astype(float)
    n_axis = n_axis or finished[d["over"]].nunique()
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
    return pd.DataFrame(rows, columns=[*keys, name, "status"])


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
