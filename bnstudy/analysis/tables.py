"""The report's tables: formatted cells ('mean [95% CI] (n)'), one wide table per kind of aggregate, the
comparison and selection tables, the margins in words, and LaTeX."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from bnstudy.analysis.analyse import Analysis
from bnstudy.analysis.compare import filters_label, matches
from bnstudy.analysis.spec import for_dataset


def fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4g}" if isinstance(x, (float, np.floating)) else str(x)


def cell_text(r: pd.Series, heavy_tailed: tuple = ()) -> str:
    """'mean [95% CI] (n)'; a heavy-tailed metric leads with its median, which one extreme seed cannot move."""
    if r["n"] == 0:
        return "- (n=0)"
    text = f"{fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] (n={r['n']})"
    return f"median {fmt(r['median'])}; mean {text}" if r["metric"] in heavy_tailed else text


def wide_tables(a: Analysis) -> dict[str, pd.DataFrame]:
    """Per table kind: one row per group, its run counts, one 'mean [95% CI] (n)' column per metric."""
    out = {}
    for kind, part in a.summary.groupby("table", sort=False):
        by = [c for c in a.grid if c in part and part[c].notna().any()] or ["group"]
        heavy = tuple(a.spec.get("heavy_tailed") or ())
        part = part.assign(cell=part.apply(cell_text, axis=1, heavy_tailed=heavy), group="all runs")
        wide = part.pivot_table(index=by, columns="metric", values="cell", aggfunc="first", sort=False)
        if "per seed" not in kind:
            counts = part.groupby(by, sort=False)[["runs", "diverged", "not_trained"]].first()
            counts.columns = ["finished runs", "of which diverged", "of which not trained"]
        else:
            counts = part.groupby(by, sort=False)[["runs"]].first().set_axis(["seeds"], axis=1)
        table = counts.join(wide[list(part["metric"].unique())]).reset_index()
        table.columns.name = None
        out[kind] = table
    return out


def contrast_columns(rows: pd.DataFrame) -> dict:
    """The columns every table of contrasts shows: the two means, the effect with its interval, the method."""
    return {
        "mean A": rows["mean_a"].map(fmt),
        "mean B": rows["mean_b"].map(fmt),
        "effect [95% CI]": [
            f"{fmt(e)} [{fmt(lo)}, {fmt(hi)}]" for e, lo, hi in zip(rows["estimate"], rows["ci_low"], rows["ci_high"])
        ],
        "interval": rows["method"],
    }


def comparison_table(a: Analysis) -> pd.DataFrame:
    c = a.comparisons
    if c.empty:
        return c
    converged = comparison_convergence(a)
    return pd.DataFrame(
        {
            "metric": c["metric"],
            "comparison": c["comparison"],
            "context": c["context"],
            "claimed effect": c["expect"],
            **contrast_columns(c),
            "df": c["df"].map(fmt),
            "p support (Holm)": c["p_support_holm"].map(fmt),
            "p contradiction (Holm)": c["p_contra_holm"].map(fmt),
            "used / runs per group": c["n"],
            "looks (seeds)": c["looks"].map(_seed_list) if "looks" in c else "-",
            "verdict": c["verdict"]
            + c["note"].map(lambda s: f" ({s})" if s else "")
            + [
                f"; **most of its runs did not converge** ({k} of {n} met the criterion)" if n and 2 * k < n else ""
                for k, n in converged
            ],
            "converged runs": [f"{k} of {n}" if n else "-" for k, n in converged],
        }
    )


def per_layer_table(a: Analysis) -> pd.DataFrame:
    """The per-layer contrasts of the comparisons of layer-mean metrics (bnstudy.analysis.per_layer), formatted."""
    p = a.per_layer
    if p.empty:
        return p
    return pd.DataFrame(
        {
            "metric": p["metric"],
            "layer": p["layer"],
            "comparison": p["comparison"],
            "context": p["context"],
            **contrast_columns(p),
            "n": p["n"],
        }
    )


def _declared_comparison(row: pd.Series, declared: list[dict]) -> dict | None:
    """The study's declared comparison a row of `a.comparisons` comes from (by its metric and label)."""
    for comp in declared:
        if comp["metric"] != row["metric"]:
            continue
        if "a" in comp and row["comparison"].startswith(f"({filters_label(comp['a'])}) - ({filters_label(comp['b'])})"):
            return comp
        if "a" not in comp and comp.get("trend") and str(comp["trend"]) in row["comparison"]:
            return comp
    return None


def comparison_convergence(a: Analysis) -> list[tuple[int, int]]:
    """Per row of `a.comparisons`: (runs that met the study's convergence criterion, runs with a flag) among the
    runs of its comparison, both arms and every context, at each arm's selected setting when the study selects
    one; (0, 0) where the study declares no criterion (no `converged` metric)."""
    if "converged" not in a.frames:
        return [(0, 0)] * len(a.comparisons)
    every = a.frames["converged"][0]
    out = []
    for _, row in a.comparisons.iterrows():
        comp = _declared_comparison(row, a.spec.get("compare") or [])
        frame = a.compared.get(row["metric"], (every,))[0]
        frame = frame if "converged" in frame else every  # a metric derived per seed: the runs it is read from
        if comp is None:
            flags = frame["converged"]
        else:
            where = dict(comp.get("where") or {})
            if isinstance(row.get("along_axis"), str):  # one value of an `along:` axis: its runs alone
                where[row["along_axis"]] = row["along_value"]
            arms = [comp["a"], comp["b"]] if "a" in comp else [{}]
            mask = pd.Series(False, index=frame.index)
            for arm in arms:
                filters = {k: v for k, v in {**where, **arm}.items() if k in frame}
                mask |= matches(frame, filters)
            flags = frame.loc[mask, "converged"]
        flags = pd.to_numeric(flags, errors="coerce").dropna()
        out.append((int((flags > 0).sum()), len(flags)))
    return out


def convergence_line(a: Analysis) -> str:
    """The study's fraction of finished runs that met its convergence criterion, in words."""
    conv = a.spec.get("convergence")
    if not conv or "converged" not in a.frames:
        return "Convergence: this study states no convergence criterion (no `converged` metric)."
    flags = pd.to_numeric(a.frames["converged"][0]["converged"], errors="coerce").dropna()
    k, n = int((flags > 0).sum()), len(flags)
    if not n:
        return f"Convergence: no run has the two evaluations of `{conv['key']}` that the study's criterion compares."
    share = f" ({100 * k / n:.0f}%)"
    return (
        f"Convergence: {k} of {n} finished runs{share} met the study's criterion (`{conv['key']}` changed by at most "
        f"{conv['tolerance']:g} between the last two evaluations); a comparison most of whose runs did not meet "
        "it says so beside its verdict."
    )


def _seed_list(looks) -> str:
    return ", ".join(str(n) for n in looks) if isinstance(looks, list) and looks else "-"


def edges_table(a: Analysis) -> pd.DataFrame | None:
    """Per arm: the values searched, the one selected, and whether it sits at an edge of them and why."""
    if not a.edges:
        return None
    return pd.DataFrame(
        {
            "arm": [filters_label(e.filters) or "all runs" for e in a.edges],
            "axis": [e.axis for e in a.edges],
            "searched": [", ".join(fmt(v) for v in e.searched) for e in a.edges],
            "selected": [fmt(e.selected) for e in a.edges],
            "edge": [e.edge or "inside" for e in a.edges],
            "why": [e.edge_reason or "" for e in a.edges],
        }
    )


def selection_table(a: Analysis) -> pd.DataFrame | None:
    """Per arm and candidate setting: runs, trained, n and mean validation score; the chosen one marked."""
    if a.selection is None:
        return None
    t = a.selection.copy()
    score = next(c for c in t if c.startswith("mean "))
    t[score] = t[score].map(fmt)
    t["trained"] = t["trained"].astype(int)
    t["selected"] = t["selected"].map({True: "**selected**", False: ""})
    return t


def margins_text(a: Analysis) -> list[str]:
    """One line per declared comparison: its margin and why."""
    lines = []
    for comp in a.spec.get("compare") or []:
        margin = for_dataset(comp.get("margin", 0.0), a.dataset) or 0.0
        reason = comp.get("margin_reason") or "none declared: any difference counts"
        if "trend" in comp:  # a slope along one axis, not two arms
            what = f"`{comp['metric']}`: slope along {comp['trend']}, expect {comp['expect']}"
        else:
            what = f"`{comp['metric']}`: ({filters_label(comp['a'])}) vs ({filters_label(comp['b'])})"
            what += f", expect {comp['expect']}"
        lines.append(f"- {what}; margin {margin:g} ({reason})")
    return lines


def to_latex(df: pd.DataFrame, caption: str) -> str:
    return df.to_latex(index=False, escape=True, caption=caption, na_rep="-")
