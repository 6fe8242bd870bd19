"""Write a study's report: tables, figures and a README with the verdict, from bnstudy.analysis.study.

    python -m bnstudy.report STUDY [--runs DIR] [--out DIR] [--dataset NAME]
    python -m bnstudy.report STUDY --source wandb [--entity E] [--project P] [--group G]
    python -m bnstudy.report --index results/     # the verdict table atop results/README.md

Writes `results/<study>/` (or --out): summary.csv, runs.csv, comparisons.csv, table.md, table.tex, figures
(PNG and SVG), verdict.json (the verdict in brief, for --index) and README.md with the claim, the verdict, the effect sizes with their 95% intervals, the
tables, the figures, the command that regenerates it and the data/version facts of the runs. Reports are
regenerated, never edited. Needs only pandas, scipy, matplotlib, numpy and yaml: no training stack, no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import offset_copy

from bnstudy.analysis import stats
from bnstudy.analysis.study import (
    FINISHED,
    REPO,
    Analysis,
    ReportError,
    Runs,
    aggregate,
    analyse,
    for_dataset,
    history_frame,
    known_studies,
    load_local,
    load_wandb,
    spec_metrics,
)

OFFICIAL_SPLITS = {"mnist": (60000, 10000), "cifar10": (50000, 10000)}  # train / test sizes
DEFAULT_DATASET = "mnist_t10k"  # what `bnstudy-train` trains on when no dataset= is given

LABELS = {
    "model.norm": "normalization",
    "optimizer.lr": "learning rate",
    "model.init_scale": "init scale (x He-normal std)",
    "model.dropout.rate": "dropout rate",
    "model.dropout.placement": "dropout placement",
    "train.batch_size": "batch size",
    "test/acc": "test accuracy",
    "test/loss": "test loss",
    "train/loss": "train loss",
    "diverged": "fraction of runs diverged or not trained",
    "step_time": "step time (s)",
    "examples_per_s": "examples / s",
    "gen_gap": "train-subset acc - test acc",
    "step": "training step",
    "epoch": "epoch",
}
# Reading order of categorical axes (others sort alphabetically).
ORDER = {
    "model.norm": ["none", "before_relu", "after_relu"],
    "model.dropout.placement": ["none", "after_block", "before_classifier"],
}


# ----------------------------------------------------------------------------------------------- tables


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


def comparison_table(a: Analysis) -> pd.DataFrame:
    c = a.comparisons
    if c.empty:
        return c
    return pd.DataFrame(
        {
            "metric": c["metric"],
            "comparison": c["comparison"],
            "context": c["context"],
            "claimed effect": c["expect"],
            "mean A": c["mean_a"].map(fmt),
            "mean B": c["mean_b"].map(fmt),
            "effect [95% CI]": [
                f"{fmt(e)} [{fmt(lo)}, {fmt(hi)}]" for e, lo, hi in zip(c["estimate"], c["ci_low"], c["ci_high"])
            ],
            "interval": c["method"],
            "df": c["df"].map(fmt),
            "p support (Holm)": c["p_support_holm"].map(fmt),
            "p contradiction (Holm)": c["p_contra_holm"].map(fmt),
            "used / runs per group": c["n"],
            "verdict": c["verdict"] + c["note"].map(lambda s: f" ({s})" if s else ""),
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
            what = f"`{comp['metric']}`: ({_filters_text(comp['a'])}) vs ({_filters_text(comp['b'])})"
            what += f", expect {comp['expect']}"
        lines.append(f"- {what}; margin {margin:g} ({reason})")
    return lines


def _filters_text(filters: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in filters.items())


def to_latex(df: pd.DataFrame, caption: str) -> str:
    return df.to_latex(index=False, escape=True, caption=caption, na_rep="-")


# ---------------------------------------------------------------------------------------------- figures


def _save(fig, out: Path, name: str) -> list[str]:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    with matplotlib.rc_context({"svg.hashsalt": "bnstudy"}):  # same input, same bytes: reports diff cleanly
        fig.savefig(out / f"{stem}.png", dpi=120, bbox_inches="tight")
        fig.savefig(out / f"{stem}.svg", bbox_inches="tight", metadata={"Date": None})
    return [f"{stem}.png", f"{stem}.svg"]


def _line_keys(by: list[str], f: dict) -> list[str]:
    """Columns that split lines: the hue, then every other grid column not on an axis or a panel."""
    rest = [c for c in by if c not in (f.get("x"), f.get("hue"), f.get("col"))]
    return ([f["hue"]] if f.get("hue") in by else []) + rest


def _panels(frame: pd.DataFrame, col: str | None) -> list[tuple[str, pd.DataFrame]]:
    if not col or col not in frame:
        return [("", frame)]
    return [(f"{LABELS.get(col, col)} = {v}", g) for v, g in frame.groupby(col, sort=True)]


def _rank(col: str, value) -> tuple:
    order = ORDER.get(col, [])
    return (order.index(value) if value in order else len(order), value)


def _ordered_lines(part: pd.DataFrame, keys: list[str]) -> list[tuple]:
    """(value, rows) per line, in reading order (ORDER for known categories, else sorted)."""
    if not keys:
        return [((), part)]
    lines = list(part.groupby(keys, sort=True))
    return sorted(lines, key=lambda kv: [_rank(k, v) for k, v in zip(keys, _as_tuple(kv[0]))])


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _new_figure(n_panels: int):
    fig = Figure(figsize=(5.0 * n_panels, 3.8), layout="constrained")  # object API: no pyplot state
    FigureCanvasAgg(fig)  # Agg: no display needed
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def _line_label(keys: list[str], values) -> str:
    pairs = enumerate(zip(keys, _as_tuple(values)))
    parts = [f"{v}" if i == 0 else f"{k.split('.')[-1]}={v}" for i, (k, v) in pairs]
    return ", ".join(parts) or "all runs"


def _is_loss(metric: str) -> bool:
    return re.search(r"(^|/)loss(_\w+)?$", metric) is not None


def _log_y(f: dict, metric: str) -> bool:
    """Losses on a log axis (one run's first loss would otherwise flatten every curve), or when asked."""
    return bool(f.get("logy", _is_loss(metric)))


def _readable_ylim(ax, values, metric: str, log: bool) -> None:
    """Y range from the plotted values (means and single runs), not from the intervals: at n = 2 a t-interval
    is 12.7 standard errors wide and would flatten everything; intervals past the frame are cut there.
    Bounded metrics never leave their range."""
    v = pd.to_numeric(pd.Series(values), errors="coerce")
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if v.empty:
        return
    lo, hi = float(v.min()), float(v.max())
    if log:
        lo, hi = lo / 1.5, hi * 1.5
    else:
        pad = 0.25 * (hi - lo) or 0.05 * max(abs(hi), 1e-12)
        lo, hi = lo - pad, hi + pad
    bounds = stats.metric_bounds(metric)
    if bounds:
        lo, hi = (
            max(lo, bounds[0] - 0.02 * (bounds[1] - bounds[0])),
            min(hi, bounds[1] + 0.02 * (bounds[1] - bounds[0])),
        )
    ax.set_ylim(lo, hi)


def figure_xy(a: Analysis, f: dict, out: Path) -> list[str]:
    """Final metric vs a grid column: mean with its 95% interval (t, clipped to the metric's range; exact binomial
    for rates) and every run's value as a faint dot; one line per group, dodged by 4 pt."""
    frame, by = a.frames[f["y"]]
    x = f["x"]
    agg = aggregate(frame, f["y"], by)
    if agg["mean"].notna().sum() == 0:
        return []
    log = _log_y(f, f["y"])
    categorical = x in agg and not pd.api.types.is_numeric_dtype(agg[x])
    if categorical:
        agg = agg.assign(_pos=agg[x].map(partial(_rank, x)))
    used = frame[frame["status"].eq("done") | (f["y"] == "diverged")]
    panels = _panels(agg, f.get("col"))
    fig, axes = _new_figure(len(panels))
    for ax, (title, part) in zip(axes, panels):
        keys = _line_keys(by, f)
        lines = _ordered_lines(part, keys)
        shown = [part["mean"]]
        for i, (value, line) in enumerate(lines):
            line = line.sort_values("_pos" if categorical else x) if x in line else line
            xs = line[x].astype(str) if categorical else (line[x] if x in line else np.zeros(len(line)))
            low = line["ci_low"].clip(lower=line["mean"] * 1e-3) if log else line["ci_low"]
            err = [(line["mean"] - low).fillna(0), (line["ci_high"] - line["mean"]).fillna(0)]
            dodge = offset_copy(ax.transData, fig=fig, x=4.0 * (i - (len(lines) - 1) / 2), units="points")
            bars = ax.errorbar(
                xs,
                line["mean"],
                yerr=err,
                marker="o",
                capsize=3,
                linestyle="none" if categorical else "-",
                label=_line_label(keys, value),
            )
            for artist in (bars.lines[0], *bars.lines[1], *bars.lines[2]):  # shift after autoscaling saw the data
                artist.set_transform(dodge)
            if f["y"] != "diverged":
                on = [k for k in by if k in line]
                pts = used.merge(line[on], on=on) if on else used
                px = pts[x].astype(str) if categorical else (pts[x] if x in pts else np.zeros(len(pts)))
                ax.scatter(px, pts[f["y"]], s=9, alpha=0.35, color=bars.lines[0].get_color(), transform=dodge, zorder=1)
                shown.append(pts[f["y"]])
        if f.get("logx") and not categorical:
            ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        _readable_ylim(ax, pd.concat(shown, ignore_index=True), f["y"], log)
        interval = _interval_words(f["y"])
        _finish_axes(ax, f, LABELS.get(x, x), f"{LABELS.get(f['y'], f['y'])}\n({interval})", title, bool(keys))
    return _save(fig, out, f["name"])


def _interval_words(metric: str) -> str:
    if metric == "diverged":
        return "95% exact binomial interval"
    if stats.metric_bounds(metric):
        return "mean, 95% t-interval over seeds, clipped to [0, 1]; dots: runs"
    return "mean, 95% t-interval over seeds; dots: runs"


def _finish_axes(ax, f: dict, xlabel: str, ylabel: str, title: str, legend: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def figure_curve(a: Analysis, runs: Runs, f: dict, out: Path) -> list[str]:
    """A logged key over training (metrics.jsonl), mean with a 95% t-band over seeds, one line per group."""
    done = a.runs[a.runs["status"] == "done"]
    hist = history_frame(runs, done["run_id"], f["curve"])
    if hist.empty:
        return []
    x = f.get("x", "step")
    log = _log_y(f, f["curve"])
    keys = _line_keys(a.grid, f)
    cols = list(dict.fromkeys([*keys, *([f["col"]] if f.get("col") in a.grid else [])]))
    hist = hist.merge(done[["run_id", *cols]], on="run_id")
    g = hist.groupby([*cols, x], sort=True)["value"].agg(["mean", "std", "count"]).reset_index()
    half = stats.t_half_width(g["std"], g["count"])
    g["lo"], g["hi"] = stats.clip_to_bounds(g["mean"] - half, g["mean"] + half, f["curve"])
    if log:
        g["lo"] = g["lo"].clip(lower=g["mean"] * 1e-3)
    panels = _panels(g, f.get("col") if f.get("col") in a.grid else None)
    fig, axes = _new_figure(len(panels))
    for ax, (title, part) in zip(axes, panels):
        for value, line in _ordered_lines(part, keys):
            marker = "." if len(line) < 30 else None
            (handle,) = ax.plot(line[x], line["mean"], marker=marker, label=_line_label(keys, value))
            ax.fill_between(line[x], line["lo"], line["hi"], alpha=0.2, color=handle.get_color())
        if log:
            ax.set_yscale("log")
        _readable_ylim(ax, part["mean"], f["curve"], log)
        band = "clipped to [0, 1]" if stats.metric_bounds(f["curve"]) else "cut at the frame"
        ylabel = f"{LABELS.get(f['curve'], f['curve'])}\n(mean, 95% t-band over seeds, {band})"
        _finish_axes(ax, f, LABELS.get(x, x), ylabel, title, bool(keys))
    return _save(fig, out, f["name"])


def caption(a: Analysis, f: dict) -> str:
    what = f.get("curve") or f["y"]
    if "curve" in f:
        how = "over training; mean and 95% t-band over seeds; diverged and not-trained runs excluded"
    elif what == "diverged":
        how = "fraction of finished runs that diverged or did not train, with exact binomial 95% intervals"
    elif what in (a.spec.get("derived") or {}):
        how = "one value per seed (rule below the verdict); mean and 95% t-interval over seeds"
    else:
        how = "final values; mean and 95% t-interval over seeds (dots: single runs); diverged and not-trained runs excluded"
    return f"{LABELS.get(what, what)}: {how}."


def write_figures(a: Analysis, runs: Runs, out: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, caption) of each written figure, and notes on figures with no data."""
    written, notes = [], []
    for f in a.spec.get("figures") or []:
        files = figure_curve(a, runs, f, out) if "curve" in f else figure_xy(a, f, out)
        what = f.get("curve") or f.get("y")
        if files:
            written.append((files[0], caption(a, f)))
        else:
            notes.append(f"figure `{f['name']}` not drawn: no run has `{what}`")
    return written, notes


# ------------------------------------------------------------------------------------------------ README


def facts(a: Analysis) -> list[str]:
    """Data and version facts, read from the run summaries."""
    r = a.runs
    done = r[r["status"].isin(FINISHED)]

    def values(col, frame=r):
        if col not in frame:
            return "unknown"
        return ", ".join(f"{v} ({n} runs)" for v, n in frame[col].astype(str).value_counts().items())

    lines = [
        f"- dataset `{a.dataset}`; examples used per run (train / test): "
        f"{values('num_train', done)} / {values('num_test', done)}"
        + (
            f"; validation (held out of the training split, the same examples in every run): {values('num_val', done)}"
            if "num_val" in done
            else ""
        ),
    ]
    notes = done["data.note"].dropna().unique() if "data.note" in done else []
    if len(notes):  # a dataset that says what it is not (the embedded mnist_t10k)
        lines.append("- **" + "; ".join(notes) + "**")
    official = OFFICIAL_SPLITS.get(a.dataset)
    sizes = done.reindex(columns=["num_train", "num_test"]).dropna().astype(int)
    if official and len(sizes):
        if set(zip(sizes["num_train"], sizes["num_test"])) != {official}:
            lines.append(
                f"- **not the official {a.dataset} split** (official: {official[0]} train / {official[1]} test): "
                f"these numbers are not comparable to published {a.dataset} results."
            )
    if "train.epochs" in done:
        lines.append(f"- training: epochs {values('train.epochs', done)}; steps per run {values('steps', done)}")
    dirty = "git_sha" in r and r["git_sha"].astype(str).str.endswith("-dirty").any()
    lines.append(f"- git SHA: {values('git_sha')}" + (" (`-dirty`: uncommitted changes)" if dirty else ""))
    pkg_cols = sorted(c for c in r if c.startswith("packages."))
    if pkg_cols:
        pk = "; ".join(f"{c[9:]} {'/'.join(sorted(r[c].dropna().astype(str).unique()))}" for c in pkg_cols)
        lines.append(f"- packages: {pk}")
    dev = [c for c in ("device.backend", "device.device_kind", "device.device_count") if c in r]
    if dev:
        combos = r[dev].astype(str).agg(" / ".join, axis=1).value_counts()
        lines.append("- device (backend / kind / count): " + ", ".join(f"{k} ({n} runs)" for k, n in combos.items()))
    if "wall_time" in done:
        minutes = done["wall_time"].astype(float).sum() / 60
        lines.append(f"- total wall time of the finished runs: {minutes:.1f} min (sum over runs)")
    if "started_at" in r and r["started_at"].notna().any():
        lines.append(f"- runs started {r['started_at'].dropna().min()} .. {r['started_at'].dropna().max()}")
    return lines


def train_command(a: Analysis) -> str:
    """The training command of this grid, rebuilt from what the runs recorded."""
    parts = ["python", "-m", "bnstudy.train", "-m", f"experiment={a.study}"]
    if a.dataset != DEFAULT_DATASET:
        parts.append(f"dataset={a.dataset}")
    if "quick" in str(a.spec.get("variant", "")):
        parts.append("+preset=quick")
    epochs = a.runs["train.epochs"].dropna().unique() if "train.epochs" in a.runs else []
    if len(epochs) == 1:  # explicit, since a grid may have been run with fewer epochs than its file says
        parts.append(f"train.epochs={int(epochs[0])}")
    if "dataset.data_dir" in a.runs and a.runs["dataset.data_dir"].notna().any():
        # The reader's own prepared TFDS folder; the path on the machine that trained is not theirs.
        return shlex.join(parts) + " dataset.data_dir=$DATA_DIR"
    return shlex.join(parts)


def verdict_rules(a: Analysis) -> list[str]:
    """The statistics behind the verdict, in words (the rules are those of bnstudy.analysis.stats)."""
    k = len(a.comparisons)
    trained = (
        "Runs that diverged or did not train are excluded from means and counted; a finite run is "
        f"*not trained* when its final train loss is >= {stats.LOSS_RATIO:g} x its first logged train loss "
        f"or its test accuracy is <= chance + {stats.CHANCE_MARGIN:g}."
        if a.spec.get("require_trained", True)
        else "Diverged runs are excluded from means and counted; this study does not require runs to learn "
        "(`require_trained: false`)."
    )
    return [
        "Each comparison is a contrast of group means over seeds (mean A - mean B; with `relative_to`, that "
        "difference minus the same difference in the reference groups) with a 95% t-interval: **paired** (on "
        "per-seed differences) when every group holds the same seeds, since a seed fixes the initialization and "
        "the data order in every arm; **Welch** (unequal variances) otherwise. The `interval` column says which.",
        "",
        f"Verdicts use one-sided t-tests against each comparison's margin, Holm-Bonferroni adjusted over this "
        f"study's {k} comparison(s), at a family-wise level of {stats.FAMILY_ALPHA:g}: "
        f"{stats.DIRECTION_ALPHA:g} for support and {stats.DIRECTION_ALPHA:g} for contradiction. A comparison "
        "that expects *greater* (or *less*) is supported when its difference is shown above (below) the margin, "
        "contradicted when it is shown below (above) it: a difference shown equivalent to zero within a "
        "margin > 0 contradicts a directional claim, since it is smaller than the smallest difference that "
        "matters. *equivalent* is decided by two one-sided tests (TOST) within +-margin. A comparison with no "
        "variation across seeds (a zero-width interval) or fewer than 2 runs in a group is inconclusive. The "
        "claim is **supported** when every comparison supports it, **contradicted** when any contradicts it, "
        "otherwise **inconclusive**.",
        "",
        trained,
    ]


def metric_notes(a: Analysis) -> list[str]:
    """One line per kind of computed metric the study uses: how it is computed from the runs."""
    s, names = a.spec, spec_metrics(a.spec)
    lines = []
    if any(m.startswith("mean(") for m in names):
        lines.append("- `mean(key)`: the mean of a logged key over all its records in metrics.jsonl (over training).")
    if any(m.startswith("median(") for m in names):
        lines.append(
            "- `median(key)`: per run, the median of a logged key over its records after step 0; the "
            "step-0 value (the untrained net) is reported apart as `step0(key)`."
        )
    if any(m.startswith("log10(") for m in names):
        lines.append(
            "- `log10(metric)`: per run, log10 of the metric (values <= 0 give none); its mean over "
            "seeds is a log-mean, so one extreme seed moves it by its order of magnitude only."
        )
    if any("*" in m for m in names):
        lines.append("- `a/*/b`: the mean of `a/<layer>/b` over the layers that log it (per record for logged keys).")
    if "steps_to_target" in names:
        target = for_dataset(s.get("target_acc"), a.dataset)
        lines.append(
            f"- `steps_to_target`: first logged step with `{s.get('target_key', 'val/acc')}` >= {target}; "
            "a run that never reaches it counts at its last logged step (a lower bound) and has "
            "`reached_target` 0."
        )
    if "converged" in names:
        c = s["convergence"]
        lines.append(
            f"- `converged`: 1 when the last two logged values of `{c['key']}` differ by at most "
            f"{c['tolerance']:g} (the stated convergence criterion), else 0."
        )
    if any("trend" in c for c in s.get("compare") or []):
        lines.append(
            "- trend comparisons: per seed, the least-squares slope (scipy.stats.linregress) of the metric "
            "(log10 where stated) against the axis (log10: per decade) over the whole axis, counted only for "
            "seeds with a usable run at every axis value; the effect is the mean slope over seeds (or the "
            "per-seed difference of two arms' slopes) with its 95% t-interval."
        )
    if s.get("heavy_tailed"):
        lines.append(
            f"- heavy-tailed metrics ({', '.join(f'`{m}`' for m in s['heavy_tailed'])}): the tables give "
            "the median over seeds before the mean."
        )
    return lines


def readme(a: Analysis, tables: dict, comp: pd.DataFrame, figures, notes, command: str, data_note: str | None) -> str:
    s = a.spec
    counts = a.runs["status"].value_counts()
    lines = [
        f"# {a.study}: {s.get('title', a.study)}",
        "",
        "Generated by `bnstudy.report`; do not edit by hand. Regenerate this report with:",
        "",
        f"    {command}",
        "",
        "The runs were trained with (each run's exact config is in its config.yaml and in runs.csv):",
        "",
        f"    {train_command(a)}",
        "",
        "## Claim",
        "",
        f"{s['claim']}",
        "",
        f"Source: {s.get('source', 'not given')}",
        "",
    ]
    variant = s.get("variant") or f"default (experiments/{a.study}.yaml)"
    lines += [f"Grid variant: **{variant}**.", ""]
    data = [line[2:] for line in facts(a)[:2] if line.startswith("- ")]
    lines += [f"Data: {data[0]}", ""] + ([f"Data note: {data_note}", ""] if data_note else [])
    lines += [f"{data[1]}", ""] if len(data) > 1 and data[1].startswith("**not") else []
    lines += [f"## Verdict: **{a.verdict}**", "", *verdict_rules(a), ""]
    lines += [comp.to_markdown(index=False) if not comp.empty else "No comparison is declared for this study.", ""]
    if s.get("compare"):
        lines += ["Margins (the smallest difference that matters) and why:", "", *margins_text(a), ""]
    select = selection_table(a)
    if select is not None:
        by, over = s["select"]["by"], ", ".join(s["select"]["over"])
        lines += [
            f"### Per-arm selection of {over} (on `{by}`, never on the test split)",
            "",
            f"Each arm is compared at its own setting of {over}: the one where most runs trained, then the best "
            f"mean `{by}` over seeds ({s['select'].get('mode', 'max')}imum).",
            "",
            select.to_markdown(index=False),
            "",
        ]
    derived = a.spec.get("derived") or {}
    for name, d in derived.items():
        rule = (
            f"largest `{d['over']}` whose run finished without diverging with `{d['of']}` >= "
            f"{for_dataset(d.get('threshold'), a.dataset)}" + (" (log10)" if d.get("log10") else "")
            if d["reduce"] == "max_stable"
            else f"max - min of `{d['of']}` over `{d['over']}`, a diverged run counting as {d.get('diverged_value')}"
        )
        lines.append(
            f"- `{name}` (one value per seed): {rule}; a seed counts only if all its `{d['over']}` values finished."
        )
    if "epochs_to_target" in spec_metrics(s):
        target = for_dataset(s.get("target_acc"), a.dataset)
        lines.append(
            f"- `epochs_to_target`: first evaluated epoch with test accuracy >= {target}; runs that never "
            "reach it are not averaged in (n counts those that did)."
        )
    lines += metric_notes(a)
    if "gen_gap" in spec_metrics(s):
        lines.append(
            "- `gen_gap`: accuracy on the training subset in inference mode minus test accuracy (same "
            "weights, same BN mode); missing for runs that do not log `train_subset/acc`."
        )
    if any(m.startswith("bn/*/") for m in spec_metrics(s)):
        lines.append("- `bn/*/key`: the mean of `bn/<layer>/key` over the BN layers that log it.")
    lines += [
        "",
        "## Results",
        "",
        "Each cell: mean [95% t-interval] (n runs used) over seeds; accuracies and rates "
        "with the interval clipped to [0, 1] (the divergence rate: exact Clopper-Pearson interval).",
        "",
    ]
    for kind, t in tables.items():
        lines += [f"### {kind}", "", t.to_markdown(index=False), ""]
    lines += ["## Figures", ""]
    lines += [f"![{name}]({name})\n\n{text} (SVG: same name.)\n" for name, text in figures]
    lines += [] if figures else ["No figure could be drawn.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    by_status = ", ".join(f"{k} {v}" for k, v in counts.items())
    lines += ["## Runs", "", f"Runs by status: {by_status}; corrupt folders skipped: {len(a.skipped)}.", ""]
    incomplete = a.runs[~a.runs["status"].isin(FINISHED)]
    for _, r in incomplete.iterrows():
        error = f" ({r['error']})" if isinstance(r.get("error"), str) else ""
        lines.append(f"- {r['status']}: `{r['path']}`{error}")
    for path, why in a.skipped:
        lines.append(f"- corrupt, skipped: `{path}` ({why})")
    for m in a.missing:
        lines.append(f"- no run has metric `{m}`")
    lines += ["", "## Data and versions", ""] + facts(a)
    if data_note:
        lines.append(f"- note: {data_note}")
    lines += [
        "",
        "Files: `summary.csv` (one row per group and metric), `runs.csv` (one row per run), "
        "`comparisons.csv`, `table.md`, `table.tex`, figures as PNG and SVG.",
        "",
    ]
    return "\n".join(lines)


def write_report(a: Analysis, runs: Runs, out: Path, command: str, data_note: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    a.summary[["table", *a.summary.columns.drop("table")]].to_csv(out / "summary.csv", index=False)
    a.comparisons.to_csv(out / "comparisons.csv", index=False)
    # data_dir is a path on the machine that trained, meaningless to a reader.
    a.runs.drop(columns=["dataset.data_dir"], errors="ignore").to_csv(out / "runs.csv", index=False)
    tables = wide_tables(a)
    comp = comparison_table(a)
    md = [f"## {kind}\n\n{t.to_markdown(index=False)}\n" for kind, t in tables.items()]
    if not comp.empty:
        md.append(f"## comparisons (verdict: {a.verdict})\n\n{comp.to_markdown(index=False)}\n")
    (out / "table.md").write_text("\n".join(md))
    tex = [to_latex(t, f"{a.study}: {kind}; mean [95\\% t-interval] (n) over seeds") for kind, t in tables.items()]
    if not comp.empty:
        tex.append(
            to_latex(
                comp, f"{a.study}: comparisons, 95\\% intervals (paired or Welch), Holm-adjusted p; verdict {a.verdict}"
            )
        )
    (out / "table.tex").write_text("\n".join(tex))
    figures, notes = write_figures(a, runs, out)
    (out / "README.md").write_text(readme(a, tables, comp, figures, notes, command, data_note))
    (out / VERDICT_FILE).write_text(json.dumps(verdict_record(a), indent=1, default=_json_default) + "\n")
    return out


VERDICT_FILE = "verdict.json"  # one study's verdict in brief, read by `--index`


def _json_default(x):
    return x.item() if isinstance(x, np.generic) else str(x)


def deciding_row(c: pd.DataFrame, verdict: str) -> pd.Series | None:
    """The comparison that decides the study's verdict: the weakest of the supporting ones (largest Holm p of
    support) when supported, the strongest contradiction when contradicted, and when inconclusive the
    inconclusive comparison furthest from support."""
    if c.empty:
        return None
    rows = c[c["verdict"] == verdict]
    rows = rows if len(rows) else c
    key, largest = ("p_contra_holm", False) if verdict == "contradicted" else ("p_support_holm", True)
    order = rows[key].fillna(np.inf if largest else -np.inf).sort_values(ascending=not largest, kind="stable")
    return rows.loc[order.index[0]]


def verdict_record(a: Analysis) -> dict:
    """What the index of all reports shows for this study: claim, verdict, the deciding effect and its n."""
    row = deciding_row(a.comparisons, a.verdict)
    record = {
        "study": a.study,
        "title": a.spec.get("title", a.study),
        "claim": a.spec["claim"],
        "verdict": a.verdict,
        "dataset": a.dataset,
        "variant": a.spec.get("variant", "default"),
        "runs": int(len(a.runs)),
        "deciding": None,
    }
    if row is not None:
        record["deciding"] = {
            k: (None if isinstance(row[k], float) and not math.isfinite(row[k]) else row[k])
            for k in (
                "metric",
                "comparison",
                "context",
                "expect",
                "estimate",
                "ci_low",
                "ci_high",
                "method",
                "n",
                "verdict",
            )
        }
    return record


# --------------------------------------------------------------------------------------------------- index

INDEX_START, INDEX_END = "<!-- bnstudy-report --index: start -->", "<!-- bnstudy-report --index: end -->"


def index_table(results: Path) -> str:
    """One row per report under `results` (each `<folder>/verdict.json`): claim, verdict, deciding effect with
    its 95% interval, n and a link to the report."""
    records = [(json.loads(p.read_text()), p.parent.name) for p in sorted(results.glob(f"*/{VERDICT_FILE}"))]
    if not records:
        raise ReportError(f"no reports under {results}: expected <study>/{VERDICT_FILE} written by bnstudy-report.")
    lines = ["| study | claim | verdict | deciding effect [95% CI] | n | report |", "|---|---|---|---|---|---|"]
    for r, folder in records:
        d = r.get("deciding") or {}
        effect = (
            f"{d['comparison']} on `{d['metric']}` ({d['context']}): {fmt(d['estimate'])} "
            f"[{fmt(d['ci_low'])}, {fmt(d['ci_high'])}], expected {d['expect']}"
            if d
            else "no comparison"
        )
        n = f"{d.get('n', '-')} ({d.get('method', '-')})" if d else "-"
        variant = "" if r.get("variant", "default") == "default" else f" (variant: {r['variant']})"
        cells = [r["study"] + variant, r["claim"], f"**{r['verdict']}**", effect, n, f"[{folder}]({folder}/README.md)"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def write_index(results: Path) -> Path:
    """Put the index table at the top of `results/README.md`, between markers; the rest of the file (notes
    written by hand) is kept. A README without the markers gets the table above its text."""
    table = f"{INDEX_START}\n{index_table(results)}\n{INDEX_END}"
    readme_path = results / "README.md"
    text = readme_path.read_text() if readme_path.is_file() else ""
    if INDEX_START in text and INDEX_END in text:
        head, rest = text.split(INDEX_START, 1)
        text = head + table + rest.split(INDEX_END, 1)[1]
    else:
        text = f"# results\n\n{table}\n\n{text}"
    readme_path.write_text(text)
    return readme_path


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bnstudy-report",
        description="Turn a study's runs into a report: tables with 95% intervals, figures and a verdict on its claim.",
    )
    p.add_argument("study", nargs="?", help="study name, e.g. placement (experiments/<study>.yaml)")
    p.add_argument(
        "--index",
        type=Path,
        metavar="RESULTS",
        help="instead of a study: write the table of every report under RESULTS (their verdict.json) "
        "at the top of RESULTS/README.md",
    )
    p.add_argument("--runs", type=Path, help="folder of run folders (default: <out-dir>/<study>)")
    p.add_argument("--out-dir", type=Path, default=Path("outputs"), help="training out_dir root (default: outputs)")
    p.add_argument(
        "--out",
        type=Path,
        help="report folder (default: results/<study>; for a quick variant "
        "<out-dir>/reports/<study>, never under results/)",
    )
    p.add_argument("--dataset", help="report the runs of this dataset only (needed when runs mix datasets)")
    p.add_argument("--data-note", help="a sentence about the data, printed at the top of the report")
    p.add_argument("--source", choices=("local", "wandb"), default="local")
    p.add_argument("--entity", help="wandb entity (--source wandb)")
    p.add_argument("--project", default="bnstudy", help="wandb project (--source wandb; default bnstudy)")
    p.add_argument("--group", help="wandb group (--source wandb; default: the study name)")
    return p.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "bnstudy.report", args.study]
    for flag in ("runs", "out_dir", "out", "dataset", "data_note"):
        value = getattr(args, flag)
        if value is not None and not (flag == "out_dir" and (args.runs or str(value) == "outputs")):
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    if args.source == "wandb":
        parts += ["--source", "wandb", "--project", args.project]
        parts += [x for flag in ("entity", "group") if getattr(args, flag) for x in (f"--{flag}", getattr(args, flag))]
    return shlex.join(parts)


def _print_warning(message, category, *args, **kwargs) -> None:
    print(f"bnstudy-report: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        run(args)


def report_folder(args: argparse.Namespace, analysis: Analysis) -> Path:
    """Where the report goes; a quick variant's report never lands in results/, which holds full grids only."""
    quick = "quick" in str(analysis.spec.get("variant", ""))
    if args.out is None:
        return (args.out_dir / "reports" / args.study) if quick else Path("results") / args.study
    if quick and any(args.out.resolve().is_relative_to(r.resolve()) for r in (REPO / "results", Path("results"))):
        raise ReportError(
            f"--out {args.out}: these are runs of the quick variant ({analysis.spec['variant']}); "
            f"results/ holds reports of full grids only. Write it elsewhere (default: "
            f"{args.out_dir / 'reports' / args.study})."
        )
    return args.out


def run(args: argparse.Namespace) -> None:
    try:
        if args.index is not None:
            path = write_index(args.index)
            print(f"index -> {path}")
            return
        if not args.study:
            raise ReportError("give a study name (e.g. `bnstudy-report placement`) or `--index RESULTS_DIR`.")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.study):
            raise ReportError(f"study name {args.study!r} must be a plain name like `placement`.")
        if args.source == "wandb":
            runs = load_wandb(args.entity, args.project, args.group or args.study)
        else:
            runs_dir = args.runs or args.out_dir / args.study
            if not runs_dir.is_dir() and args.study not in known_studies():
                known = ", ".join(known_studies())
                raise ReportError(f"unknown study {args.study!r} and no runs in {runs_dir}. Known studies: {known}.")
            if not runs_dir.is_dir():
                quick = args.out_dir / "quick" / args.study
                hint = f" Quick runs of it are in {quick}: add `--out-dir {quick.parent}`." if quick.is_dir() else ""
                raise ReportError(
                    f"no runs directory {runs_dir}: expected the run folders of study {args.study!r} there. Train "
                    f"them with `python -m bnstudy.train -m experiment={args.study}`, or point --runs at the folder "
                    f"that holds them.{hint}"
                )
            runs = load_local(runs_dir)
        analysis = analyse(args.study, runs, args.dataset)
        out = write_report(analysis, runs, report_folder(args, analysis), command_line(args), args.data_note)
    except ReportError as e:
        print(f"bnstudy-report: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.study}: {analysis.verdict} ({len(analysis.runs)} runs) -> {out / 'README.md'}")


if __name__ == "__main__":
    main()
