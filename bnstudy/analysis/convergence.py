"""Convergence speed from a run's logged history: the first step at which a metric reaches a target.

Plain Python on the records of `metrics.jsonl` (one dict per logged step, each with its `step`), so the
training app and the report's analysis use the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def steps_to_target(history: Iterable[Mapping], target: float, key: str = "val/acc") -> int | None:
    """The smallest `step` whose record has `key` >= `target`, or None if no record reaches it.

    Records without `key` (training-only records) and non-finite values (a diverged run) are
    skipped; records need not be in step order. The answer is only as fine as the evaluation
    cadence: with evaluations every k steps the true first crossing lies in (answer - k, answer].
    """
    reached = []
    for i, record in enumerate(history):
        value = record.get(key)
        if value is None or not math.isfinite(value):
            continue
        if "step" not in record:
            raise ValueError(f"history record {i} has {key!r} but no 'step': {dict(record)!r}")
        if value >= target:
            reached.append(int(record["step"]))
    return min(reached, default=None)
