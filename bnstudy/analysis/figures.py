"""The report's figures (PNG and SVG, byte-stable): final metrics against a grid column and logged keys over
training, means with 95% intervals, one line per group; and their captions.

Readable at any grid size: with a per-arm selection each arm is drawn at its selected setting (unless the
figure's axes are the selected key), and a panel holds at most MAX_LINES lines: more lines are split into
panels by the grid columns beyond the hue. Runs that diverged or did not train are not dropped: each is a
marked point at the bottom of its panel, labelled in the legend."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import offset_copy

from bnstudy.analysis import stats
from bnstudy.analysis.analyse import Analysis
from bnstudy.analysis.compare import aggregate, matches
from bnstudy.analysis.derived import FAILED, history_frame
from bnstudy.analysis.load import LoadedRuns

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


MAX_LINES = 8  # lines per panel a reader can tell apart by colour
FAILED_LABEL = "diverged / not trained (at bottom)"


def _n_lines(frame: pd.DataFrame, keys: list[str]) -> int:
    return len(frame[keys].drop_duplicates()) if keys else 1


def _layout(frame: pd.DataFrame, keys: list[str], col: str | None) -> tuple[list[str], list[str]]:
    """(panel columns, line columns): the figure's `col` splits panels, then line columns beyond the first
    (the hue) move to the panels until no panel holds more than MAX_LINES lines."""
    panel = [col] if col and col in frame else []
    lines = [k for k in keys if k not in panel]
    while len(lines) > 1 and max(_n_lines(g, lines) for _, g in _groups(frame, panel)) > MAX_LINES:
        panel.append(lines.pop())
    return panel, lines


def _groups(frame: pd.DataFrame, cols: list[str]):
    return frame.groupby(cols, sort=True, dropna=False) if cols else [((), frame)]


def _panels(frame: pd.DataFrame, cols: list[str], lines: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per panel; a panel still over MAX_LINES lines (a hue of many values) is cut in chunks."""
    out = []
    for values, g in _groups(frame, cols):
        title = ", ".join(f"{LABELS.get(c, c)} = {v}" for c, v in zip(cols, _as_tuple(values)))
        order = [_as_tuple(v) for v, _ in _ordered_lines(g, lines)] if lines else [()]
        chunks = [order[i : i + MAX_LINES] for i in range(0, len(order), MAX_LINES)]
        for j, chunk in enumerate(chunks):
            part = g[g[lines].apply(tuple, axis=1).isin(chunk)] if lines and len(chunks) > 1 else g
            out.append((title + (f" ({j + 1} of {len(chunks)})" if len(chunks) > 1 else ""), part))
    return out


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


PANELS_PER_ROW = 3
SLANT_AFTER_TICKS = 5  # more x tick labels than this are slanted, so that neighbours never overlap


class NotDrawn(Exception):
    """A figure that would show nothing (a curve of one point per run): the report says why instead."""


def _new_figure(n_panels: int):
    cols = min(n_panels, PANELS_PER_ROW)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(6.2 * cols, 3.8 * rows), layout="constrained")  # object API: no pyplot state
    FigureCanvasAgg(fig)  # Agg: no display needed
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def at_selected(a: Analysis, f: dict) -> bool:
    """Whether a figure draws each arm at its selected setting: with a per-arm selection, unless the figure's
    x, hue or panels are the selected key itself."""
    select = a.spec.get("select") or {}
    return bool(select) and not {f.get("x"), f.get("hue"), f.get("col")} & set(select["over"])


def plotted_runs(a: Analysis, metric: str, f: dict) -> tuple[pd.DataFrame, list[str]]:
    """(runs, grid) a figure of `metric` draws: each arm at its selection (the confirmation runs), or, for a
    figure along the selected key itself, the selection phase's runs, every searched setting at the same seeds."""
    if at_selected(a, f) and metric in a.compared:
        return selected_runs(a, metric)
    frame, grid = a.frames[metric]
    if a.phases is not None and "seed" in frame:
        frame = frame[frame["seed"].isin(a.phases.seeds)]
    return frame, grid


def selected_runs(a: Analysis, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """(runs, grid) at each arm's selected setting: the confirmation runs, or before there are any, the
    selection runs at the chosen settings (so that a study in its selection phase still shows its arms)."""
    frame, grid = a.compared[metric]
    if len(frame) or a.phases is None or metric not in a.frames:
        return frame, grid
    base = a.frames[metric][0]
    settings = [{k: v for k, v in s.items() if k in base} for s in a.phases.chosen.to_dict("records")]
    at = np.logical_or.reduce([matches(base, s).to_numpy() for s in settings] or [np.zeros(len(base), bool)])
    return base[at], grid


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
    for rates) and every run's value as a faint dot; one line per group, dodged by 4 pt; each run that diverged
    or did not train a marked point at the bottom of its panel."""
    frame, by = plotted_runs(a, f["y"], f)
    x = f["x"]
    agg = aggregate(frame, f["y"], by)
    if agg["mean"].notna().sum() == 0:
        return []
    log = _log_y(f, f["y"])
    categorical = x in agg and not pd.api.types.is_numeric_dtype(agg[x])
    if categorical:
        agg = agg.assign(_pos=agg[x].map(partial(_rank, x)))
    rate = f["y"] == "diverged"  # the failures are this figure's data, not marks
    used = frame[frame["status"].eq("done") | rate]
    failed = frame[frame["status"].isin(FAILED) & ~rate]
    panel_cols, keys = _layout(agg, _line_keys(by, f), f.get("col"))
    panels = _panels(agg, panel_cols, keys)
    fig, axes = _new_figure(len(panels))
    for ax, (title, part) in zip(axes, panels):
        lines = _ordered_lines(part, keys)
        shown, marks = [part["mean"]], []
        for i, (value, line) in enumerate(lines):
            line = line.sort_values("_pos" if categorical else x) if x in line else line
            dodge = offset_copy(ax.transData, fig=fig, x=4.0 * (i - (len(lines) - 1) / 2), units="points")
            color = _mean_line(ax, line, x, categorical, log, dodge, _line_label(keys, value))
            on = [k for k in by if k in line]
            if not rate:
                pts = used.merge(line[on], on=on) if on else used
                ax.scatter(_xs(pts, x, categorical), pts[f["y"]], s=9, alpha=0.35, color=color, transform=dodge)
                shown.append(pts[f["y"]])
            marks.append((failed.merge(line[on], on=on) if on else failed, color, dodge))
        if f.get("logx") and not categorical:
            _log_x_at_values(ax, pd.concat([part[x], *(m[0][x] for m in marks)]) if x in part else part["mean"])
        if log:
            ax.set_yscale("log")
        _readable_ylim(ax, pd.concat(shown, ignore_index=True), f["y"], log)
        any_failed = _mark_failed(ax, marks, x, categorical)
        ylabel = f"{LABELS.get(f['y'], f['y'])}\n({_interval_words(f['y'])})"
        _finish_axes(ax, f, LABELS.get(x, x), ylabel, title, bool(keys) or any_failed)
    return _save(fig, out, f["name"])


def _xs(rows: pd.DataFrame, x: str, categorical: bool):
    if x not in rows:
        return np.zeros(len(rows))
    return rows[x].astype(str) if categorical else rows[x]


def _mean_line(ax, line: pd.DataFrame, x: str, categorical: bool, log: bool, dodge, label: str):
    """One group's means with their intervals, shifted by `dodge`; returns its colour."""
    low = line["ci_low"].clip(lower=line["mean"] * 1e-3) if log else line["ci_low"]
    err = [(line["mean"] - low).fillna(0), (line["ci_high"] - line["mean"]).fillna(0)]
    bars = ax.errorbar(
        _xs(line, x, categorical),
        line["mean"],
        yerr=err,
        marker="o",
        capsize=3,
        linestyle="none" if categorical else "-",
        label=label,
    )
    for artist in (bars.lines[0], *bars.lines[1], *bars.lines[2]):  # shift after autoscaling saw the data
        artist.set_transform(dodge)
    return bars.lines[0].get_color()


def _log_x_at_values(ax, values: pd.Series) -> None:
    """A log x axis ticked at the grid's own values (0.025, 0.05, 0.1), not at powers of ten; labels of two
    significant digits (an extension's 0.00111111 would run into its neighbour), slanted when there are many."""
    ticks = sorted(pd.to_numeric(values, errors="coerce").dropna().unique())
    ax.set_xscale("log")
    if ticks and ticks[0] > 0:
        ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks], fontsize=7)
        if len(ticks) > SLANT_AFTER_TICKS:
            ax.tick_params(axis="x", labelrotation=40)
        ax.minorticks_off()
        ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)


def _mark_failed(ax, marks: list, x: str, categorical: bool) -> bool:
    """Each run that diverged or did not train as an x at the panel's bottom, in its line's colour: a point
    whose group has no mean must not vanish from the figure. Whether any was drawn."""
    bottom = ax.get_ylim()[0]
    labelled = False
    for rows, color, dodge in marks:
        if rows.empty:
            continue
        if not categorical and x in rows:  # a dodged collection does not widen the axes by itself
            ax.update_datalim(np.column_stack([rows[x].astype(float), np.full(len(rows), bottom)]))
            ax.autoscale_view(scaley=False)
        ax.scatter(
            _xs(rows, x, categorical),
            np.full(len(rows), bottom),
            marker="x",
            s=36,
            color=color,
            transform=dodge,
            clip_on=False,
            zorder=3,
            label=None if labelled else FAILED_LABEL,
        )
        labelled = True
    ax.set_ylim(bottom, ax.get_ylim()[1])
    return labelled


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
    if legend:  # beside the panel, never over the data
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)


def figure_curve(a: Analysis, runs: LoadedRuns, f: dict, out: Path) -> list[str]:
    """A logged key over training (metrics.jsonl), mean with a 95% t-band over seeds, one line per group."""
    done, grid = a.runs[a.runs["status"] == "done"], a.grid
    if at_selected(a, f):
        chosen, grid = selected_runs(a, a.spec["select"]["by"])
        done = done[done["run_id"].isin(chosen["run_id"])]
    hist = history_frame(runs, done["run_id"], f["curve"])
    if hist.empty:
        return []
    x = f.get("x", "step")
    if x in hist and hist[x].nunique() < 2:
        raise NotDrawn(
            f"one logged value of `{f['curve']}` per run (at {x} {hist[x].iloc[0]:g}): a curve needs two or more; "
            f"the runs logged it once (e.g. one epoch)"
        )
    log = _log_y(f, f["curve"])
    col = f.get("col") if f.get("col") in grid else None
    keys = _line_keys(grid, f)
    cols = list(dict.fromkeys([*keys, *([col] if col else [])]))
    hist = hist.merge(done[["run_id", *cols]], on="run_id")
    g = hist.groupby([*cols, x], sort=True)["value"].agg(["mean", "std", "count"]).reset_index()
    half = stats.t_half_width(g["std"], g["count"])
    g["lo"], g["hi"] = stats.clip_to_bounds(g["mean"] - half, g["mean"] + half, f["curve"])
    if log:
        g["lo"] = g["lo"].clip(lower=g["mean"] * 1e-3)
    panel_cols, keys = _layout(g, keys, col)
    panels = _panels(g, panel_cols, keys)
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
        how = (
            "final values; mean and 95% t-interval over seeds (dots: single runs); diverged and not-trained "
            "runs are not averaged in, each is an x at the bottom of its panel"
        )
    if at_selected(a, f):
        how += f"; each arm at its selected {', '.join(a.spec['select']['over'])}"
    return f"{LABELS.get(what, what)}: {how}."


def write_figures(a: Analysis, runs: LoadedRuns, out: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, caption) of each written figure, and notes on figures with no data."""
    written, notes = [], []
    for f in a.spec.get("figures") or []:
        try:
            files = figure_curve(a, runs, f, out) if "curve" in f else figure_xy(a, f, out)
        except NotDrawn as why:
            notes.append(f"figure `{f['name']}` not drawn: {why}")
            continue
        what = f.get("curve") or f.get("y")
        if files:
            written.append((files[0], caption(a, f)))
        else:
            notes.append(f"figure `{f['name']}` not drawn: no run has `{what}`")
    return written, notes
