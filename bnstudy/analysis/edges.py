"""Whether each arm's selected setting lies inside what was searched: the per-arm edge of a selection, why an edge
stands (the runs just beyond it failed, the study's bound, or nothing was searched past it), and the next grid
value beyond an edge that nothing explains yet (`pending_extensions`, which the study runner trains).

"Each arm at its own best lr" holds only when the best lr is inside the searched grid. A selection at the
grid's first or last value is an *edge*; it stands as the arm's optimum only when the next value beyond it was
tried and every run there diverged or did not train (the edge of stability), or when the study's
`select.bounds` forbid going further and the bound itself was tried. Otherwise the grid is extended by one step
of its own spacing (geometric for a grid of positive values like lr, whose neighbours keep a ratio; arithmetic
otherwise), or to the bound itself when that step would pass it. An arm where nothing trained has no selection
and no edge to extend: it is reported as such ("no optimizer.lr in [a, b] trained").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from bnstudy.analysis.analyse import Analysis

LOW, HIGH = "low", "high"
REASON_FAILED = "every run at the next value beyond it diverged or did not train"
REASON_BOUND = "the study's bound select.bounds reached (and tried)"
NONE_TRAINED = "none"  # the edge of an arm where no searched value trained
REASON_OPEN = "not extended: the grid was not searched past it"
REASON_SINGLE = "not extended: one value searched, no grid spacing to step by"


@dataclass
class ArmEdge:
    """One arm's selection along one `over` key: what was searched, what was chosen, and where it sits."""

    filters: dict  # the arm: grid column -> value (and the other `over` keys at their selected values)
    axis: str
    searched: list
    selected: object
    edge: str | None = None  # None, "low", "high", or "none" (no searched value trained)
    edge_reason: str | None = None
    next_value: float | None = None  # the value to train beyond an edge that nothing explains yet

    def record(self) -> dict:
        """The selection as verdict.json records it."""
        keys = ("filters", "axis", "searched", "selected", "edge")
        out = {k: getattr(self, k) for k in keys}
        if self.edge is not None:
            out["edge_reason"] = self.edge_reason
        return out


def native(value):
    """A plain Python value (JSON, Hydra overrides) from a numpy or pandas scalar."""
    return value.item() if isinstance(value, np.generic) else value


def is_geometric(values: list[float]) -> bool:
    """Whether a sorted grid is spaced by ratios (lr: 0.01, 0.03, 0.1) rather than by differences."""
    v = np.asarray(values, float)
    if len(v) < 2 or (v <= 0).any():
        return False
    if len(v) == 2:
        return True
    ratios, steps = v[1:] / v[:-1], np.diff(v)
    return bool(np.std(np.log(ratios)) / abs(np.mean(np.log(ratios))) <= np.std(steps) / np.mean(steps))


def step_beyond(values: list[float], side: str) -> float:
    """One step of the grid's own spacing past its lowest (`low`) or highest (`high`) value."""
    v = sorted(values)
    a, b = (v[1], v[0]) if side == LOW else (v[-2], v[-1])
    nxt = b * (b / a) if is_geometric(v) else b + (b - a)
    return float(f"{nxt:.6g}")  # 0.1 * 3 is 0.30000000000000004; an override and a run name want 0.3


def _outside(value: float, bound: list | None) -> bool:
    if not bound:
        return False
    low, high = float(bound[0]), float(bound[1])
    return (value < low and not np.isclose(value, low)) or (value > high and not np.isclose(value, high))


def _side(values: list, trained: list, i: int, side: str, bound: list | None) -> tuple[str | None, float | None]:
    """(why the selection at values[i] is an edge on this side, or None; the next value to train, if any)."""
    last = 0 if side == LOW else len(values) - 1
    if i != last:
        beyond = i - 1 if side == LOW else i + 1
        return (REASON_FAILED, None) if trained[beyond] == 0 else (None, None)
    if len(values) < 2:
        return REASON_SINGLE, None
    nxt = step_beyond(values, side)
    if not _outside(nxt, bound):
        return REASON_OPEN, nxt
    limit = float(bound[0] if side == LOW else bound[1])
    return (REASON_BOUND, None) if np.isclose(float(values[i]), limit) else (REASON_OPEN, limit)


def none_trained_reason(key: str, searched: list) -> str:
    numbers = [v for v in searched if isinstance(v, (int, float))]
    where = f" in [{min(numbers):g}, {max(numbers):g}]" if numbers else ""
    return f"no {key}{where} trained"


def _edge_along(candidates: pd.DataFrame, arm: dict, key: str, bound: list | None) -> ArmEdge:
    values = pd.to_numeric(candidates[key], errors="coerce")
    order = values.sort_values(kind="stable").index
    searched = [native(v) for v in candidates.loc[order, key]]
    if not candidates["selected"].any():
        return ArmEdge(arm, key, searched, None, NONE_TRAINED, none_trained_reason(key, searched))
    selected = native(candidates.loc[candidates["selected"], key].iloc[0])
    out = ArmEdge(arm, key, searched, selected)
    if values.isna().any():  # a categorical axis has no outside
        return out
    trained = list(candidates.loc[order, "trained"])
    i = searched.index(selected)
    sides = [(side, *_side(searched, trained, i, side, bound)) for side in (HIGH, LOW)]
    found = [s for s in sides if s[1] is not None]
    found.sort(key=lambda s: s[2] is None)  # an edge to extend first, then high before low
    if found:
        out.edge, out.edge_reason, out.next_value = found[0]
    return out


def arm_edges(selection: pd.DataFrame, grid: list[str], select: dict) -> list[ArmEdge]:
    """Per arm and `over` key (the others held at their selected values): searched, selected, edge and why."""
    over = list(select["over"])
    arms = [c for c in grid if c not in over]
    bounds = select.get("bounds") or {}
    out = []
    groups = selection.groupby(arms, sort=True, dropna=False) if arms else [((), selection)]
    for values, table in groups:
        arm = {k: native(v) for k, v in zip(arms, values if isinstance(values, tuple) else (values,))}
        if not table["selected"].any():  # nothing trained: one record per key, nothing held
            out += [_edge_along(table.drop_duplicates(subset=[key]), arm, key, bounds.get(key)) for key in over]
            continue
        chosen = table[table["selected"]].iloc[0]
        for key in over:
            others = [k for k in over if k != key]
            same = np.logical_and.reduce([table[k].eq(chosen[k]) for k in others]) if others else slice(None)
            held = {k: native(chosen[k]) for k in others}
            out.append(_edge_along(table.loc[same], {**arm, **held}, key, bounds.get(key)))
    return out


def pending_extensions(analysis: Analysis) -> list[dict]:
    """The grid values to train next, one per arm whose selection sits at an edge that nothing explains yet:
    {filters: the arm (config key -> value), axis: the key, value: the next value beyond the edge, edge}.
    Empty when every selection is inside its grid, at a failed neighbour, or at the study's bound."""
    return [
        {"filters": dict(e.filters), "axis": e.axis, "value": e.next_value, "edge": e.edge}
        for e in analysis.edges
        if e.next_value is not None
    ]
