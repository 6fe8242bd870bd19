"""Per layer: each declared comparison of a layer-mean metric (`a/*/b`, also inside `median(...)`, `log10(...)`),
redone with `*` replaced by one layer's name, over the same runs, contexts and seeds: A - B and its 95% interval
(paired or Welch) per layer. Descriptive only: no verdict, not part of the Holm family."""

from __future__ import annotations

import re

import pandas as pd

from bnstudy.analysis.compare import Coverage, compare
from bnstudy.analysis.derived import add_run_metrics
from bnstudy.analysis.load import LoadedRuns
from bnstudy.analysis.spec import FUNCTION_NAME
from bnstudy.analysis.verdicts import expand_along

COLUMNS = [
    "metric",
    "layer",
    "comparison",
    "context",
    "mean_a",
    "mean_b",
    "estimate",
    "ci_low",
    "ci_high",
    "method",
    "n",
]

# Layer kinds in the order a network applies them; a name is placed by its leading letters, then its number.
NETWORK_ORDER = ("stem", "conv", "stage", "block", "layer", "dense", "fc", "classifier", "head", "logits")


def layer_key(metric: str) -> str | None:
    """The logged key a metric reads, functions unwrapped (`log10(median(ics/*/rel))` -> `ics/*/rel`), when it
    has exactly one `*` (a layer mean); else None."""
    while m := FUNCTION_NAME.match(metric):
        metric = m.group(2)
    return metric if metric.count("*") == 1 else None


def layer_names(keys, key: str) -> list[str]:
    """The layer names that fill the `*` of `key` among logged keys (not the layer mean's own column), in network
    order (`layer_order`)."""
    before, after = key.split("*")
    pattern = re.compile(re.escape(before) + "([^/]+)" + re.escape(after))
    found = {m.group(1) for k in keys if (m := pattern.fullmatch(str(k)))}
    return layer_order(found - {"*"})  # `a/*/b` itself: the layer-mean column


def layer_order(names) -> list[str]:
    """Network order where the name's kind is known (NETWORK_ORDER: conv before dense before classifier), else
    after them; within a kind, natural order (conv2 before conv10)."""

    def key(name: str):
        kind = re.match(r"[a-zA-Z_]*", name).group(0).rstrip("_").lower()
        rank = NETWORK_ORDER.index(kind) if kind in NETWORK_ORDER else len(NETWORK_ORDER)
        return rank, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]

    return sorted(names, key=key)


def logged_keys(frame: pd.DataFrame, runs: LoadedRuns) -> set[str]:
    """Every key the runs of `frame` logged: their summary columns and the keys of their history records."""
    keys = set(frame.columns)
    for rid in frame["run_id"]:
        for rec in runs.history[rid]():
            keys.update(rec)
    return keys


def seeds_of(row: pd.Series) -> int | None:
    """The paired seeds a comparison row used on a look of the sequential design (its `n` says `k paired seeds
    (first of m)`); None for the fixed design (every seed)."""
    m = re.match(r"(\d+) paired seeds", str(row.get("n", "")))
    return int(m.group(1)) if m else None


def per_layer(
    spec: dict,
    compared: dict,
    comparisons: pd.DataFrame,
    runs: LoadedRuns,
    dataset: str,
    coverage: Coverage,
) -> pd.DataFrame:
    """One row per (declared comparison of a layer-mean metric, context, layer), in the order of the study's
    comparisons: the contrast of the layer's metric over the runs and seeds of the study's row of that context."""
    rows = []
    derived = spec.get("derived") or {}
    for i, declared in enumerate(spec.get("compare") or []):
        metric = declared["metric"]
        key = layer_key(metric)
        if key is None or metric in derived or metric not in compared:
            continue
        cframe, cgrid = compared[metric]
        frame = cframe.copy()
        layers = layer_names(logged_keys(frame, runs), key)
        names = [metric.replace("*", layer) for layer in layers]
        add_run_metrics(frame, runs, names, dataset, spec)
        parents = comparisons[comparisons["metric"] == metric] if len(comparisons) else comparisons
        for layer, name in zip(layers, names):
            rows += layer_rows(frame, cgrid, {**declared, "metric": name}, i, parents, dataset, coverage, layer)
    return pd.DataFrame(rows, columns=COLUMNS)


def layer_rows(
    frame: pd.DataFrame,
    grid: list[str],
    comp: dict,
    index: int,
    parents: pd.DataFrame,
    dataset: str,
    coverage: Coverage,
    layer: str,
) -> list[dict]:
    """The layer's rows of one declared comparison: per context, `compare` on the seeds its study row used."""
    source = coverage.frame() if coverage.settings is not None else frame
    cache: dict = {}

    def rows_at(sub: dict, n: int | None) -> list[dict]:
        key = (repr(sub.get("where")), n)
        if key not in cache:
            cache[key] = compare(frame, grid, sub, dataset, n, coverage)
        return cache[key]

    out = []
    for sub, _ in expand_along(comp, source, index):
        for r in rows_at(sub, None):
            same = (
                (parents["comparison"] == r["comparison"]) & (parents["context"] == r["context"])
                if len(parents)
                else []
            )
            parent = parents[same] if len(parents) else parents
            n = seeds_of(parent.iloc[0]) if len(parent) else None
            if n is not None:
                r = next(x for x in rows_at(sub, n) if x["context"] == r["context"])
            out.append({**{k: r[k] for k in COLUMNS if k in r}, "layer": layer})
    return out
