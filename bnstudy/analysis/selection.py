"""The per-arm selection of a setting (`select: {by: val/acc, over: [optimizer.lr]}`): each arm, a combination
of the other grid columns, is compared at its own best setting on validation; the test split never chooses."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bnstudy.analysis.derived import has_values, numeric_column
from bnstudy.analysis.errors import ReportError


def select_per_arm(frame: pd.DataFrame, grid: list[str], select: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs at each arm's selected setting, the selection table).

    An arm is a combination of the grid columns outside `over`; its candidates are its settings of `over`.
    The chosen one has the largest share of its runs that trained, then the best mean of `by` (max, or min
    with `mode: min`) over those runs; ties go to the first candidate in sorted order. A share, not a count:
    seeds added to the selected setting alone must not lock the choice.
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
    arms = [c for c in grid if c not in over]
    f = frame.assign(
        _v=numeric_column(frame, by).where(frame["status"].eq("done")),
        _trained=frame["status"].eq("done").astype(float),
        _arm=0,
    )
    g = f.groupby([*(arms or ["_arm"]), *over], dropna=False, sort=True)
    table = g.agg(runs=("status", "size"), trained=("_trained", "sum"), n=("_v", "count"), mean=("_v", "mean"))
    table = table.reset_index()
    sign = 1.0 if mode == "max" else -1.0
    table["_score"] = (sign * table["mean"]).fillna(-np.inf)
    table["_share"] = table["trained"] / table["runs"]
    best = table.sort_values(["_share", "_score"], ascending=False, kind="stable").groupby(arms or ["_arm"])
    table["selected"] = table.index.isin(best.head(1).index)
    chosen = table.loc[table["selected"], [*(arms or ["_arm"]), *over]]
    selected = f.merge(chosen, on=[*(arms or ["_arm"]), *over]).drop(columns=["_v", "_trained", "_arm"])
    table = table.drop(columns=["_score", "_share", "_arm"], errors="ignore").rename(columns={"mean": f"mean {by}"})
    return selected, table
