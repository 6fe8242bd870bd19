"""A study with a selection runs in two phases on disjoint seeds, so that the runs that choose an arm's setting
never decide the claim (the winner's curse: the arm with more near-tied settings gets an optimistic pick when the
same runs choose and decide).

- **Selection**: the study's grid, and the edge extensions it asks for (bnstudy.analysis.edges), on the
  *selection seeds* 0 .. N-1 (`report.selection_seeds`, default DEFAULT_SELECTION_SEEDS). Each arm's setting is
  chosen on these runs alone (bnstudy.analysis.selection), so runs of other seeds cannot move it.
- **Confirmation**: only the selected setting of each arm, on *confirmation seeds*, every other seed (the study
  runner numbers them from CONFIRMATION_SEED_BASE = 100 (bnstudy.analysis.spec), far from any selection seed). The sequential looks use
  these runs alone; no metric of a selection run enters a verdict. Confirmation runs at a setting that is not
  their arm's selection are listed and left out.

Why 3 selection seeds: the mean validation score of a setting over 3 seeds has about 0.58 of one run's spread,
and one diverged run of three lowers its setting's score by a third of the gap to chance rather than deciding
it; a fourth seed would add a quarter to the grid's cost (every setting of every arm) to sharpen a choice whose
errors no longer bias the verdict (fresh seeds decide it), they only leave an arm at a slightly worse setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from bnstudy.analysis.compare import matches
from bnstudy.analysis.edges import native
from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.selection import arm_columns, select_per_arm, untrained_arms

DEFAULT_SELECTION_SEEDS = 3


def selection_seeds(spec: dict) -> list[int]:
    """The seeds the selection phase trains and chooses on: 0 .. report.selection_seeds - 1."""
    return list(range(int(spec.get("selection_seeds", DEFAULT_SELECTION_SEEDS))))


@dataclass
class Phases:
    """A study's runs split into its two phases, and what the selection chose."""

    seeds: list[int]  # the selection seeds
    table: pd.DataFrame  # the selection table (per arm and candidate setting: runs, trained, mean score, selected)
    chosen: pd.DataFrame  # one row per arm with a selection: its arm and `over` columns
    untrained: list[dict]  # arms where no searched setting trained (grid column -> value)
    confirmation: pd.DataFrame  # runs at their arm's selected setting on confirmation seeds
    stray: pd.DataFrame  # confirmation-seed runs at a setting that is not their arm's selection (left out)
    missing: list[dict] = field(default_factory=list)  # {filters, missing}: grid settings lacking selection seeds

    @property
    def confirmation_seeds(self) -> list[int]:
        return sorted(native(s) for s in self.confirmation["seed"].dropna().unique()) if len(self.confirmation) else []

    @property
    def complete(self) -> bool:
        """Every searched setting holds every selection seed (edge extensions are the analysis's to judge)."""
        return not self.missing


def split_phases(finished: pd.DataFrame, grid: list[str], spec: dict, dataset: str) -> Phases:
    """The selection on the selection seeds' runs; the confirmation runs at each arm's chosen setting."""
    seeds = selection_seeds(spec)
    select = spec["select"]
    in_selection = finished["seed"].isin(seeds)
    selecting, confirming = finished[in_selection], finished[~in_selection]
    if selecting.empty:
        raise_no_selection(seeds, finished)
    chosen, table = select_per_arm(selecting, grid, select, dataset)
    keys = [*arm_columns(grid, select), *select["over"]]
    at_choice = pd.Series(False, index=confirming.index)
    for setting in chosen.to_dict("records"):
        at_choice |= matches(confirming, setting)
    return Phases(
        seeds=seeds,
        table=table,
        chosen=chosen,
        untrained=untrained_arms(table, grid, select),
        confirmation=confirming[at_choice].copy(),
        stray=confirming[~at_choice].copy(),
        missing=missing_selection_seeds(selecting, keys, seeds),
    )


def missing_selection_seeds(selecting: pd.DataFrame, keys: list[str], seeds: list[int]) -> list[dict]:
    """Per searched setting (the grid columns `keys`), the selection seeds it has no finished run of."""
    out = []
    groups = selecting.groupby(keys, dropna=False, sort=True) if keys else [((), selecting)]
    for values, part in groups:
        missing = sorted(set(seeds) - {int(s) for s in part["seed"]})
        if missing:
            values = values if isinstance(values, tuple) else (values,)
            out.append({"filters": {k: native(v) for k, v in zip(keys, values)}, "missing": missing})
    return out


def raise_no_selection(seeds: list[int], finished: pd.DataFrame) -> None:
    found = sorted(native(s) for s in finished["seed"].dropna().unique())
    raise ReportError(
        f"the study selects a setting per arm on its selection seeds {seeds}, but no finished run has one "
        f"(the runs' seeds: {found}); train the study's grid with seed={seeds} first (bnstudy-study does)."
    )
