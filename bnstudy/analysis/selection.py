"""The per-arm selection of a setting (`select: {by: val/acc, over: [optimizer.lr]}`): each arm, a combination
of the other grid columns, is compared at its own best setting on validation; the test split never chooses.

The score of a setting is the mean of `by` over every run there, a failed run at its real value (a run that did
not learn has a validation accuracy) or, without one, at its failure value (bnstudy.analysis.failures: chance
for a diverged run's accuracy, else the worst outcome). A setting where runs fail therefore scores low without a
separate rule. An arm where no run at any searched setting trained has no selection at all: no tie-break picks
one, it is never extended, and it loses the comparisons that need it to train (bnstudy.analysis.compare).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bnstudy.analysis.derived import has_values
from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.failures import run_values


def arm_columns(grid: list[str], select: dict) -> list[str]:
    """The grid columns that make an arm: every one but the selected keys."""
    return [c for c in grid if c not in select["over"]]


def select_per_arm(
    frame: pd.DataFrame, grid: list[str], select: dict, dataset: str = ""
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(each arm's selected setting: one row of its arm and `over` columns, the selection table).

    An arm is a combination of the grid columns outside `over`; its candidates are its settings of `over`.
    The chosen one has the best mean of `by` over all its runs (max, or min with `mode: min`), failed runs
    counted (module docstring); ties go to the first candidate in sorted order. An arm none of whose runs
    trained gets no row in the first frame and no `selected` candidate in the table.
    The edges of each arm's choice (bnstudy.analysis.edges) are read from the table's `trained` counts.
    """
    by, over, mode = select["by"], list(select["over"]), select.get("mode", "max")
    unknown = [k for k in over if k not in frame]
    if unknown:
        raise ReportError(f"`select.over` names {unknown}, which are not config keys of the runs.")
    if not has_values(frame, by):
        raise ReportError(
            f"`select.by: {by}`: no run has this metric, so no setting can be chosen. Runs must "
            f"log it (validation metrics need a validation split), or drop `select`."
        )
    arms = arm_columns(grid, select) or ["_arm"]
    f = frame.assign(_v=run_values(frame, by, dataset), _trained=frame["status"].eq("done").astype(float), _arm=0)
    g = f.groupby([*arms, *over], dropna=False, sort=True)
    table = g.agg(runs=("status", "size"), trained=("_trained", "sum"), n=("_v", "count"), mean=("_v", "mean"))
    table = table.reset_index()
    sign = 1.0 if mode == "max" else -1.0
    table["_score"] = (sign * table["mean"]).fillna(-np.inf)
    arm_trained = table.groupby(arms, dropna=False)["trained"].transform("sum")
    best = table[arm_trained > 0].sort_values("_score", ascending=False, kind="stable").groupby(arms, dropna=False)
    table["selected"] = table.index.isin(best.head(1).index)
    chosen = table.loc[table["selected"], [*arms, *over]].drop(columns=["_arm"], errors="ignore")
    table = table.drop(columns=["_score", "_arm"], errors="ignore").rename(columns={"mean": f"mean {by}"})
    return chosen.reset_index(drop=True), table


def untrained_arms(table: pd.DataFrame, grid: list[str], select: dict) -> list[dict]:
    """The arms (grid column -> value) where no run at any searched setting trained."""
    arms = arm_columns(grid, select)
    if not arms:
        return [] if table["trained"].sum() > 0 else [{}]
    totals = table.groupby(arms, dropna=False, sort=True)["trained"].sum()
    dead = totals[totals == 0].index
    return [dict(zip(arms, key if isinstance(key, tuple) else (key,))) for key in dead]
