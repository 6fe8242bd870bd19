"""The verdicts of a study's comparison rows: one look at every seed (the fixed design: Holm over the rows), or
the group-sequential looks of the study's seed schedule (`report.seeds`) replayed from the runs, and the seeds
the next look needs (`pending_seeds`, which the study runner trains).

Replaying the looks: at look k, each comparison uses the first n_k seeds (sorted) that every one of its groups
holds, its one-sided p-values are computed as in the fixed design, and `sequential.take_look` decides the open
ones. A comparison decided at a look keeps that look's verdict and interval. The replay stops at the first look
for which an open comparison lacks n_k seeds with finished runs in every group: that look is pending.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bnstudy.analysis import stats
from bnstudy.analysis.compare import PRIVATE, decide_rows, forced_rows, matches
from bnstudy.analysis.edges import native
from bnstudy.analysis.sequential import LookState, SeedSchedule, seeds_for_fixed_design, take_look
from bnstudy.analysis.stats import DIRECTION_ALPHA, FAILURE_WORDS

if TYPE_CHECKING:
    from bnstudy.analysis.analyse import Analysis

RowsAt = Callable[[int | None], list[dict]]  # the study's comparison rows on the first n paired seeds (None: all)


def schedule_of(spec: dict) -> SeedSchedule | None:
    """The study's seed schedule, or None for the fixed design (every seed present, one look)."""
    s = spec.get("seeds")
    return SeedSchedule(start=s["start"], step=s["step"], max=s["max"]) if s else None


def seeds_used(row: dict) -> int:
    """Seeds in the smallest group of a row (the paired seeds on a look of the sequential design)."""
    c = row.get("_contrast")
    if c is not None and str(c.method).startswith("paired"):
        return int(round(c.df)) + 1
    return int(row.get("_smallest", 0))


def run_seeds(row: dict) -> set:
    """Seeds with a finished run in every group of a row: what a look can use whatever the runs' outcome."""
    sets = [set(sel["seed"]) if "seed" in sel else set() for sel in row["_runs"]]
    return set.intersection(*sets) if sets else set()


DECIDED_BY_SELECTION = 0  # `decided_at` of a comparison an arm that never trained decided: no confirmation seed


def fixed_design(rows: list[dict]) -> pd.DataFrame:
    """One look at every seed: Holm over the rows (bnstudy.analysis.stats), as before any schedule."""
    used = [seeds_used(r) for r in rows]
    forced = forced_rows(rows)
    m = len(rows)
    needed = [seeds_needed(r, m) for r in rows]
    frame = decide_rows(rows)
    if frame.empty:
        return frame
    frame["looks"] = [[] if f else [n] for n, f in zip(used, forced)]
    frame["decided_at"] = [
        DECIDED_BY_SELECTION if f else (n if v in DECIDED else None) for n, v, f in zip(used, frame["verdict"], forced)
    ]
    frame["seeds_needed"] = [k if d is None else None for k, d in zip(needed, frame["decided_at"])]
    return frame


DECIDED = ("supported", *FAILURE_WORDS)


def seeds_needed(row: dict, family: int = 1) -> int | None:
    """Paired seeds a fixed design would need to decide a row still open, at the observed spread and estimate:
    its one-sided t-test at DIRECTION_ALPHA / `family` (Holm's first step over the study's comparisons); for an
    equivalence claim on the side its estimate lies (inside the margin: the two one-sided tests; beyond it: the
    contradiction's doubled p, so half that level)."""
    c = row.get("_contrast")
    if c is None or not c.se > 0:
        return None
    n = seeds_used(row)
    margin = float(row["margin"])
    alpha = DIRECTION_ALPHA / max(family, 1)
    if row["_expect"] == "equivalent":
        threshold = math.copysign(margin, c.estimate)
        alpha = alpha if abs(c.estimate) < margin else alpha / 2
    else:
        threshold = margin
    return seeds_for_fixed_design(c.estimate, c.se * math.sqrt(n), threshold, alpha)


def replay(rows_at: RowsAt, schedule: SeedSchedule) -> tuple[list[dict], LookState, dict]:
    """(each row as of its deciding or latest look, the look state, the pending look: {seeds, rows} or {}).
    A row an untrained arm decides (`_forced`) is decided before the first look and never waits for seeds."""
    rows = rows_at(schedule.looks[0])
    state, final, pending = LookState.start(len(rows)), list(rows), {}
    for i, f in enumerate(forced_rows(rows)):
        if f:
            state.verdicts[i], state.decided_at[i] = f[0], DECIDED_BY_SELECTION
    for k, n in enumerate(schedule.looks):
        rows = rows if k == 0 else rows_at(n)
        open_ = state.open
        if not open_.any():
            break
        short = [i for i in np.flatnonzero(open_) if len(run_seeds(rows[i])) < n]
        if short:
            pending = {"seeds": n, "rows": [rows[i] for i in short]}
            final = [rows[i] if open_[i] else final[i] for i in range(len(rows))]
            break
        ps, pc = [r["p_support"] for r in rows], [r["p_contra"] for r in rows]
        take_look(state, ps, pc, schedule, k, [r["failure_word"] for r in rows])
        final = [rows[i] if open_[i] else final[i] for i in range(len(rows))]
    return final, state, pending


def sequential_design(rows_at: RowsAt, schedule: SeedSchedule) -> tuple[pd.DataFrame, dict]:
    """The verdict of every row under the seed schedule, and the pending look ({} when none)."""
    final, state, pending = replay(rows_at, schedule)
    frame = pd.DataFrame(final)
    if frame.empty:
        return frame, pending
    at_max = not pending
    frame["verdict"] = state.verdicts
    frame["p_support_holm"] = frame["p_contra_holm"] = np.nan  # levels are per look, see `looks`
    frame["looks"] = state.looks
    frame["decided_at"] = state.decided_at
    m = len(final)
    frame["seeds_needed"] = [
        seeds_needed(r, m) if at_max and d is None else None for r, d in zip(final, state.decided_at)
    ]
    frame["note"] = [_note(r, v, d, at_max, pending) for r, v, d in zip(final, state.verdicts, state.decided_at)]
    return frame.drop(columns=PRIVATE, errors="ignore"), pending


def _note(row: dict, verdict: str, decided_at: int | None, at_max: bool, pending: dict) -> str:
    forced = row.get("_forced")
    if isinstance(forced, tuple):
        return forced[1]
    if decided_at is not None:
        return f"decided at {decided_at} seeds"
    if not at_max:
        return f"open: the next look needs {pending['seeds']} seeds"
    why = stats.why(row.get("_contrast"), row["_expect"], row["margin"], verdict)
    return why or "still open at the schedule's maximum seeds"


def decide(rows_at: RowsAt, spec: dict) -> tuple[pd.DataFrame, dict]:
    """The study's comparisons with their verdicts, looks and decided_at; and the pending look ({} if none)."""
    schedule = schedule_of(spec)
    if schedule is None:
        return fixed_design(rows_at(None)), {}
    return sequential_design(rows_at, schedule)


def pending_seeds(analysis: Analysis) -> dict:
    """The next look's seeds for the groups of the open comparisons: {seeds: n, groups: [{filters, missing}]}
    with each group's full grid setting (config key -> value) and the seeds it lacks; {} when every comparison
    is decided or the schedule's maximum is reached. The seeds a look uses are the first n that the comparison's
    runs hold, then fresh ones from `analysis.first_new_seed` (a study with a selection: confirmation seeds)."""
    look = analysis.pending_look
    if not look:
        return {}
    n, pool, groups = look["seeds"], analysis.pool, {}
    for row in look["rows"]:
        settings = [s for group in row["_settings"] for s in group]
        present = {_key(s): _seeds_at(pool, s) for s in settings}
        have = sorted(set().union(*present.values())) if present else []
        start = max([analysis.first_new_seed - 1, *have]) + 1
        target = [*have, *range(start, start + n)][:n]
        for setting in settings:
            missing = sorted(set(target) - present[_key(setting)])
            if missing:
                groups.setdefault(_key(setting), {"filters": setting, "missing": set()})["missing"].update(missing)
    out = [{"filters": g["filters"], "missing": sorted(native(s) for s in g["missing"])} for g in groups.values()]
    return {"seeds": n, "groups": out} if out else {}


def _key(setting: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in setting.items()))


def _seeds_at(pool: pd.DataFrame, setting: dict) -> set:
    if pool.empty or "seed" not in pool:
        return set()
    return {native(s) for s in pool.loc[matches(pool, setting), "seed"].dropna()}
