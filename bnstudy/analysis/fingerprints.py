"""The code fingerprints a report's runs were trained at (bnstudy.app.provenance.code_fingerprint, recorded in
each run's summary.json): a report states them and refuses runs of several fingerprints, which would mix numbers
of different code, unless told to allow it (then its README says so)."""

from __future__ import annotations

import pandas as pd

from bnstudy.analysis.errors import ReportError

UNRECORDED = "unrecorded"  # runs trained before the fingerprint was recorded


def fingerprint_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Fingerprint -> number of finished runs recorded at it (most common first)."""
    column = runs["code_fingerprint"] if "code_fingerprint" in runs else pd.Series(None, index=runs.index)
    finished = runs["status"].isin(("done", "diverged", "not_trained")) if "status" in runs else slice(None)
    values = column[finished].fillna(UNRECORDED).astype(str)
    return {k: int(v) for k, v in values.value_counts().items()}


def check_fingerprints(runs: pd.DataFrame, allow_mixed: bool) -> dict[str, int]:
    """The fingerprint counts; a ReportError naming them when there are several and mixing is not allowed."""
    counts = fingerprint_counts(runs)
    if len(counts) > 1 and not allow_mixed:
        found = ", ".join(f"{k} ({n} runs)" for k, n in counts.items())
        raise ReportError(
            f"the runs were trained at {len(counts)} code fingerprints: {found}. A change to what decides the "
            f"numbers means the study is trained again (remove the older runs); to report them together anyway, "
            f"pass --allow-mixed-fingerprints (the README then says so)."
        )
    return counts


def fingerprint_line(counts: dict[str, int]) -> str:
    """The README's line: one fingerprint, or the mix it was told to allow."""
    if len(counts) == 1:
        return f"- code fingerprint (bnstudy/, configs/, experiments/): `{next(iter(counts))}`"
    found = ", ".join(f"`{k}` ({n} runs)" for k, n in counts.items())
    return (
        f"- **runs of several code fingerprints, reported together as asked (`--allow-mixed-fingerprints`)**: {found}"
    )
