"""Aggregates over seeds and the comparisons that decide a claim: per-group means with 95% intervals, contrasts
between arms (paired or Welch), trend slopes along a grid axis, and the Holm-adjusted verdict of every row.
The statistical rules themselves live in bnstudy.analysis.stats."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from bnstudy.analysis import failures, stats
from bnstudy.analysis.edges import native
from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.spec import for_dataset


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


def matches(frame: pd.DataFrame, filters: dict) -> pd.Series:
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


def filters_label(filters: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in filters.items())


def _seed_values(sel: pd.DataFrame, metric: str, dataset: str, better: str | None = None) -> pd.Series:
    """The metric's values of every finished run, failed ones counted (bnstudy.analysis.failures: a value
    where the run has one, chance for a diverged run's accuracy, else the worst outcome +-inf), by seed."""
    values = failures.run_values(sel, metric, dataset, better)
    index = sel["seed"] if "seed" in sel else pd.RangeIndex(len(sel))
    return pd.Series(values.to_numpy(float), index=pd.Index(index, name="seed")).dropna()


@dataclass(frozen=True)
class Coverage:
    """What a comparison's groups should hold, beyond the runs present: the grid settings each group covers
    (one phase: every setting of its runs; two phases: each arm's selected setting) and the arms where no
    searched setting trained (they lose the comparisons that need them, see `forced_verdict`)."""

    settings: pd.DataFrame | None = None  # one row per grid setting; None: the settings of the runs present
    untrained: tuple = ()  # arms (grid column -> value) with no selection

    def of(self, frame: pd.DataFrame, grid: list[str], filters: dict) -> list[dict]:
        source = self.settings if self.settings is not None else frame
        cols = [c for c in (source.columns if self.settings is not None else grid) if c in source]
        part = source[matches(source, filters)] if len(source) else source
        if not cols:
            return [{}] if len(part) else []
        return [{k: native(v) for k, v in r.items()} for r in part[cols].drop_duplicates().to_dict("records")]

    def dead(self, filters: dict) -> bool:
        """Whether an untrained arm belongs to the group these filters select."""
        return any(all(_same(arm[k], v) for k, v in filters.items() if k in arm) for arm in self.untrained)

    def frame(self) -> pd.DataFrame:
        """The settings and the untrained arms, one row each (an untrained arm's `over` keys empty)."""
        return pd.concat([self.settings, pd.DataFrame(list(self.untrained))], ignore_index=True)

    def contexts(self, frame: pd.DataFrame, cols: list[str]) -> list[dict]:
        if not cols:
            return [{}]
        parts = [frame[cols]] if self.settings is None else [self.settings.reindex(columns=cols)]
        parts += [
            pd.DataFrame([{c: arm.get(c) for c in cols}]) for arm in self.untrained if all(c in arm for c in cols)
        ]
        return pd.concat(parts, ignore_index=True).drop_duplicates().to_dict("records")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return bool(np.isclose(float(a), float(b)))
    return str(a) == str(b)


def forced_verdict(expect: str, a_loses: bool, direction: str) -> str:
    """The verdict of a comparison one of whose two arms never trained: that arm loses. With `direction` the
    better values of the metric, a losing `a` puts theta = a - b on a's worse side."""
    if expect == "equivalent":
        return "contradicted"
    theta_positive = (direction == "lower") == a_loses
    return "supported" if (expect == "greater") == theta_positive else "contradicted"


def _expect_text(expect: str, margin: float) -> str:
    if expect == "equivalent":
        return f"within +-{margin:g}"
    return f"{'above' if expect == 'greater' else 'below'} {margin:g}"


def compare(
    frame: pd.DataFrame,
    grid: list[str],
    comp: dict,
    dataset: str,
    n_seeds: int | None = None,
    coverage: Coverage = Coverage(),
) -> list[dict]:
    """One row per context (every combination of the grid columns the comparison does not fix): the contrast,
    its 95% interval, which interval (paired, Welch or a rank test) and the unadjusted one-sided p-values of
    support and of the claim's failure. The verdicts come later, over all of a study's rows at once
    (`decide_rows`). With `n_seeds` (a look of the sequential design), only the first n seeds that every group
    holds are used. `coverage`: the settings each group should hold and the arms that never trained."""
    if "trend" in comp:
        return compare_trend(frame, grid, comp, dataset, n_seeds, coverage)
    where, ref = comp.get("where") or {}, comp.get("relative_to")
    fixed = {*comp["a"], *comp["b"], *where, *(ref or {})}
    context_cols = [c for c in grid if c not in fixed]
    contexts = coverage.contexts(frame, context_cols)
    margin = float(for_dataset(comp.get("margin", 0.0), dataset) or 0.0)
    sides = [(comp["a"], 1.0), (comp["b"], -1.0)]
    if ref:
        sides += [({**comp["a"], **ref}, -1.0), ({**comp["b"], **ref}, 1.0)]
    results = []
    for ctx in sorted(contexts, key=lambda d: [str(v) for v in d.values()]):
        groups, notes, rows, settings, dead = [], [], [], [], []
        for filters, _ in sides:
            full = {**where, **ctx, **filters}
            sel = frame[matches(frame, full)]
            groups.append(_seed_values(sel, comp["metric"], dataset, comp.get("better")))
            notes.append(f"{len(groups[-1])} of {len(sel)}")
            rows.append(sel)
            settings.append(coverage.of(frame, grid, full))
            dead.append(coverage.dead(full))
        a_label, b_label = filters_label(comp["a"]), filters_label(comp["b"])
        row = {
            "metric": comp["metric"],
            "comparison": f"({a_label}) - ({b_label})" + (f" minus the same at {filters_label(ref)}" if ref else ""),
            "context": filters_label({**where, **ctx}) or "all runs",
            "expect": _expect_text(comp["expect"], margin),
            "margin": margin,
            "margin_reason": comp.get("margin_reason", ""),
            "mean_a": float(groups[0].mean()) if len(groups[0]) else np.nan,
            "mean_b": float(groups[1].mean()) if len(groups[1]) else np.nan,
            "n": " / ".join(notes),
            "_runs": rows,
            "_settings": settings,
            "_where": {**where, **ctx},
        }
        row = with_contrast(row, groups, [coef for _, coef in sides], comp["expect"], margin, n_seeds)
        results.append(with_forced(row, dead, comp, plain=not ref))
    return results


def with_forced(row: dict, dead: list[bool], comp: dict, plain: bool) -> dict:
    """The row decided by an arm that never trained (`_forced`: its verdict and why), or unchanged."""
    if not any(dead):
        return row
    a_dead, b_dead = any(dead[0::2]), any(dead[1::2])
    if plain and a_dead != b_dead:
        direction = failures.metric_direction(comp["metric"], comp.get("better"))
        verdict = forced_verdict(comp["expect"], a_loses=a_dead, direction=direction)
        arm = filters_label(comp["a"] if a_dead else comp["b"])
        row["_forced"] = (verdict, f"({arm}) trained at no searched setting: it loses this comparison")
    else:
        row["_forced"] = ("inconclusive", "an arm trained at no searched setting, and this contrast has no side for it")
    return row


def first_paired_seeds(groups: list[pd.Series], n_seeds: int) -> tuple[list[pd.Series], int]:
    """Each group at the first `n_seeds` seeds (sorted) that every group holds; and how many such seeds exist."""
    common = sorted(set.intersection(*(set(g.index) for g in groups)))
    return [g.loc[common[:n_seeds]] for g in groups], len(common)


def with_contrast(
    row: dict, groups: list[pd.Series], coefs: list[float], expect: str, margin: float, n_seeds: int | None = None
) -> dict:
    """The row with its contrast, 95% interval and one-sided p-values (none when a group has < 2 values)."""
    if n_seeds is not None:
        groups, row["_paired_seeds"] = first_paired_seeds(groups, n_seeds)
        row["n"] = f"{min(n_seeds, row['_paired_seeds'])} paired seeds (first of {row['_paired_seeds']})"
    row["_smallest"] = min(len(g) for g in groups)
    c = None
    if row["_smallest"] >= 2:
        if failures.has_worst(groups):
            c = failures.rank_contrast(groups, coefs, paired=stats.same_seeds(groups))
        else:
            c = stats.contrast(groups, coefs)
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
            failure_word="contradicted",
        )
    else:
        low, high = c.interval()
        p_support, p_contra, word = stats.one_sided_pvalues(c, expect, margin)
        row.update(
            method=c.method,
            estimate=c.estimate,
            ci_low=low,
            ci_high=high,
            df=c.df,
            p=c.p_two_sided(),
            p_support=p_support,
            p_contra=p_contra,
            failure_word=word,
        )
    row["_contrast"], row["_expect"] = c, expect
    return row


def seed_slopes(
    sel: pd.DataFrame,
    metric: str,
    axis: str,
    logx: bool,
    logy: bool,
    n_axis: int,
    dataset: str,
    against: float,
) -> pd.Series:
    """Per seed (index): the least-squares slope of the metric (log10 if `logy`) against the axis (log10 if
    `logx`) over that seed's runs (scipy.stats.linregress). A seed counts only when every one of the
    context's `n_axis` axis values has a run with a usable value (> 0 on a log scale): a slope over part of
    the axis would not estimate the same thing. A failed run counts at its own value or chance accuracy
    (bnstudy.analysis.failures); where it is the worst outcome (+-inf: a probe the failed run has no meaningful
    value of), its seed's slope is `against`, the slope that counts against the claim, never dropped."""
    x = pd.to_numeric(sel[axis], errors="coerce")
    y = failures.run_values(sel, metric, dataset)
    usable = np.isfinite(x) & ((x > 0) if logx else True)
    failed = usable & np.isinf(y)
    ok = usable & np.isfinite(y) & ((y > 0) if logy else True)
    part = pd.DataFrame({"seed": sel["seed"], "x": x, "y": y, "failed": failed})[ok | failed]
    slopes = {}
    for seed, g in part.groupby("seed", sort=True):
        if g["x"].nunique() == n_axis >= 3 and len(g) == n_axis:
            if g["failed"].any():
                slopes[seed] = against
                continue
            gx, gy = np.log10(g["x"]) if logx else g["x"], np.log10(g["y"]) if logy else g["y"]
            slopes[seed] = scipy_stats.linregress(gx.to_numpy(float), gy.to_numpy(float)).slope
    return pd.Series(slopes, dtype=float).rename_axis("seed")


def slope_against(expect: str, coef: float) -> float:
    """The slope of one arm that counts against the claim: it moves the contrast (sum of coef x slope) to
    +inf when the claim expects it below (`less`) or within a margin (`equivalent`), to -inf when above."""
    toward = -1.0 if expect == "greater" else 1.0
    return math.copysign(math.inf, toward * coef)


def tied_to(frame: pd.DataFrame, col: str, axis: str) -> bool:
    """Whether a grid column takes one value per value of the axis (e.g. an lr scaled with the batch size):
    it moves along the axis, so it is part of the trend, not a context to split it by."""
    return bool(frame.groupby(axis)[col].nunique(dropna=False).max() <= 1)


def compare_trend(
    frame: pd.DataFrame,
    grid: list[str],
    comp: dict,
    dataset: str,
    n_seeds: int | None = None,
    coverage: Coverage = Coverage(),
) -> list[dict]:
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
    tied_source = coverage.settings if coverage.settings is not None and len(coverage.settings) else frame
    context_cols = [c for c in grid if c not in fixed and not (c in tied_source and tied_to(tied_source, c, axis))]
    contexts = coverage.contexts(frame, context_cols)
    margin = float(for_dataset(comp.get("margin", 0.0), dataset) or 0.0)
    y_name = f"log10 {comp['metric']}" if logy else comp["metric"]
    x_name = f"log10 {axis}" if logx else axis
    results = []
    for ctx in sorted(contexts, key=lambda d: [str(v) for v in d.values()]):
        groups, notes, rows, settings, dead = [], [], [], [], []
        for filters, coef in arms:
            full = {**where, **ctx, **filters}
            sel = frame[matches(frame, full)]
            rows.append(sel)
            settings.append(coverage.of(frame, grid, full))
            dead.append(coverage.dead(full))
            axis_values = {s.get(axis) for s in settings[-1]} if coverage.settings is not None else set()
            n_axis = len(axis_values) or int(pd.to_numeric(sel[axis], errors="coerce").nunique())
            against = slope_against(comp["expect"], coef)
            groups.append(seed_slopes(sel, comp["metric"], axis, logx, logy, n_axis, dataset, against))
            n_failed = int(np.isinf(groups[-1]).sum())
            failed_note = f" ({n_failed} with a failed run: against the claim)" if n_failed else ""
            notes.append(f"{len(groups[-1])} of {sel['seed'].nunique() if 'seed' in sel else 0} seeds{failed_note}")
        label = f"slope of {y_name} vs {x_name}"
        if len(arms) == 2:
            label = f"({filters_label(comp['a'])}) - ({filters_label(comp['b'])}): {label}"
        row = {
            "metric": comp["metric"],
            "comparison": label,
            "context": filters_label({**where, **ctx}) or "all runs",
            "expect": _expect_text(comp["expect"], margin),
            "margin": margin,
            "margin_reason": comp.get("margin_reason", ""),
            "mean_a": float(groups[0].mean()) if len(groups[0]) else np.nan,
            "mean_b": float(groups[1].mean()) if len(groups) > 1 and len(groups[1]) else np.nan,
            "n": " / ".join(notes),
            "_runs": rows,
            "_settings": settings,
            "_where": {**where, **ctx},
        }
        row = with_contrast(row, groups, [coef for _, coef in arms], comp["expect"], margin, n_seeds)
        results.append(with_forced(row, dead, comp, plain=False))
    return results


# Row fields the deciding steps read (the contrast, the runs of each group, seed counts), never written out.
PRIVATE = ["_contrast", "_expect", "_runs", "_paired_seeds", "_smallest", "_settings", "_where", "_forced"]


def forced_rows(rows: list[dict]) -> list[tuple[str, str] | None]:
    """Per row, the (verdict, why) an arm that never trained decides, or None."""
    return [r.get("_forced") if isinstance(r.get("_forced"), tuple) else None for r in rows]


def decide_rows(rows: list[dict]) -> pd.DataFrame:
    """Verdicts of all of a study's comparison rows: Holm-Bonferroni over the rows, for support and for the
    claim's failure; a row an untrained arm decides takes that verdict and no p-value."""
    forced = forced_rows(rows)
    for r, f in zip(rows, forced):
        if f:
            r["p_support"] = r["p_contra"] = np.nan
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    verdicts, ps, pc = stats.decide_family(frame["p_support"], frame["p_contra"], frame["failure_word"])
    frame["p_support_holm"], frame["p_contra_holm"] = ps, pc
    frame["verdict"] = [f[0] if f else v for f, v in zip(forced, verdicts)]
    frame["note"] = [
        f[1] if f else stats.why(c, e, m, v)
        for f, c, e, m, v in zip(forced, frame["_contrast"], frame["_expect"], frame["margin"], frame["verdict"])
    ]
    return frame.drop(columns=PRIVATE, errors="ignore")
