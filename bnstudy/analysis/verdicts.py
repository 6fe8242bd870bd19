"""A study's comparisons as decided, in words: `along:` comparisons expanded into one comparison per axis value,
and the study's verdict, one word and one sentence that names the regions of a claim that depends on an axis
(bnstudy.analysis.axis)."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from bnstudy.analysis import axis, stats
from bnstudy.analysis.compare import matches
from bnstudy.analysis.edges import native


def expand_along(comp: dict, frame: pd.DataFrame, index: int) -> list[tuple[dict, dict]]:
    """(comparison, its along-fields) per value of the comparison's `along` axis among the runs it selects;
    a comparison without `along` stays one, with empty along-fields."""
    if "along" not in comp:
        return [(comp, {})]
    key, where = comp["along"], comp.get("where") or {}
    if key not in frame:
        return [(comp, {})]
    part = frame[matches(frame, where)] if where else frame
    values = sorted(native(v) for v in pd.to_numeric(part[key], errors="coerce").dropna().unique())
    base = {k: v for k, v in comp.items() if k != "along"}
    return [
        ({**base, "where": {**where, key: v}}, {"along_group": index, "along_axis": key, "along_value": v})
        for v in values
    ]


def _label(rows: pd.DataFrame) -> str:
    first = rows.iloc[0]
    return f"{first['comparison']} on `{first['metric']}`"


def along_groups(c: pd.DataFrame) -> list[pd.DataFrame]:
    """The rows of each `along:` comparison, one frame per declared comparison."""
    if c.empty or "along_group" not in c:
        return []
    return [g for _, g in c.dropna(subset=["along_group"]).groupby("along_group", sort=True)]


def study_verdict(c: pd.DataFrame) -> str:
    """The claim's one word: an along-comparison counts once, with `axis.overall_along` (which may say
    "depends"); then the rule of `stats.overall` over the counted words: contradicted if any is, negligible if
    any is, "depends" if an axis decides it, supported when all are, otherwise inconclusive."""
    if c.empty:
        return "inconclusive"
    plain = c[c["along_group"].isna()] if "along_group" in c else c
    words = list(plain["verdict"]) + [axis.overall_along(list(g["verdict"])) for g in along_groups(c)]
    return stats.overall(words)


def _counts(verdicts) -> str:
    """ "3 of 3 comparisons supported", or "2 supported, 1 inconclusive (of 3 comparisons)"."""
    counts, m = Counter(verdicts), len(verdicts)
    noun = "comparison" if m == 1 else "comparisons"
    if len(counts) == 1:
        return f"{m} of {m} {noun} {verdicts[0]}" if m > 1 else f"1 {noun}, {verdicts[0]}"
    parts = [f"{counts[v]} {v}" for v in stats.VERDICTS if counts[v]]
    return f"{', '.join(parts)} (of {m} {noun})"


def verdict_sentence(c: pd.DataFrame, verdict: str) -> str:
    """The study's verdict in one sentence: each along-comparison's regions, then the other comparisons' count."""
    if c.empty:
        return f"{verdict}: no comparison declared"
    groups = along_groups(c)
    plain = c[c["along_group"].isna()] if "along_group" in c else c
    parts = [along_sentence(g) for g in groups]
    if len(plain):
        tail = _counts(list(plain["verdict"]))
        parts.append(f"other {tail}" if groups else tail)
    return f"{verdict}: " + "; ".join(parts)


def along_sentence(g: pd.DataFrame) -> str:
    """One along-comparison's verdicts in words: per context beyond the axis (another grid column that varies),
    that context named and its own regions, so values of different contexts never share a region."""
    key = g["along_context"].fillna("") if "along_context" in g else pd.Series("", index=g.index)
    texts = []
    for context, part in g.groupby(key, sort=True):
        text = axis.sentence(part["along_axis"].iloc[0], list(part["along_value"]), list(part["verdict"]))
        texts.append(f"at {context}: {text}" if context else text)
    return f"{_label(g)}: " + "; ".join(texts)
