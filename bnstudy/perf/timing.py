"""Where a training process's wall time went: one bucket per kind of work, the rest is `other`.

The app adds seconds to named buckets as it goes (`TimeBreakdown.measure`), and the trainer's own
timings (compile, train steps, evaluations) are added per pack. `startup` runs from the process's
creation (interpreter start, imports, config composition) to the first bucketed work; when a shell ran
something else in that process first (`sleep 10 && python ...`), from bnstudy's first import instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

# In the order of the printed line.
BUCKETS = ("startup", "data", "compile", "train_steps", "evaluation", "logging", "checkpoints", "other")


def process_start_time() -> float:
    """When this process was created, in seconds since the epoch (time.time's clock), to ~10 ms.

    On Linux, from the process's start in clock ticks since boot and the boot-time clock now. psutil's
    `create_time` adds those ticks to the boot time, which Linux gives in whole seconds (/proc/stat
    btime): up to a second early, and the startup bucket as much too long.
    """
    try:
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - linux_start_ticks() / os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):  # not Linux
        return psutil.Process().create_time()
    return time.time() - age


NOT_PYTHON_AFTER_S = 3.0  # far longer than an interpreter start, creation to bnstudy's first import (~0.2 s)


def python_start_time(created: float | None = None, imported: float | None = None) -> float:
    """When this process's Python started: its creation, unless bnstudy's first import came more than
    NOT_PYTHON_AFTER_S later. A shell ending a chain (`sleep 10 && python ...`, `pip install ... && python`)
    execs Python in its own process, created when the chain began; then the clock starts at that first
    import (the interpreter's own fraction of a second before it is not counted)."""
    import bnstudy

    created = process_start_time() if created is None else created
    imported = bnstudy.IMPORTED_AT if imported is None else imported
    return imported if imported - created > NOT_PYTHON_AFTER_S else created


def linux_start_ticks(stat_path: str = "/proc/self/stat") -> int:
    """The process's start in clock ticks since boot: field 22 of /proc/<pid>/stat (proc(5))."""
    with open(stat_path) as f:
        after_name = f.read().rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces and ')'
    return int(after_name[19])


class TimeBreakdown:
    """Seconds per bucket since the process began; `other` is the wall time no bucket claims."""

    def __init__(self, started_at: float | None = None):
        self.started_at = python_start_time() if started_at is None else started_at
        self.seconds = dict.fromkeys(BUCKETS, 0.0)

    def add(self, bucket: str, seconds: float) -> None:
        if bucket not in self.seconds or bucket == "other":
            raise KeyError(f"unknown time bucket {bucket!r}; expected one of {BUCKETS[:-1]}")
        self.seconds[bucket] += seconds

    def mark_startup_done(self) -> None:
        """Everything from process creation to now is startup (call once, before any other bucket)."""
        self.seconds["startup"] = time.time() - self.started_at

    @contextmanager
    def measure(self, bucket: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(bucket, time.perf_counter() - t0)

    def snapshot(self) -> dict[str, float]:
        """Seconds per bucket and `wall` (process creation to now); `other` = wall - the named buckets."""
        wall = time.time() - self.started_at
        named = {k: v for k, v in self.seconds.items() if k != "other"}
        return {**named, "other": max(0.0, wall - sum(named.values())), "wall": wall}


def overhead_ratio(snapshot: dict[str, float]) -> float:
    """Seconds that are not train steps, per second of train steps."""
    steps = snapshot["train_steps"]
    return (snapshot["wall"] - steps) / steps if steps > 0 else float("inf")


def breakdown_line(snapshot: dict[str, float]) -> str:
    """One line: wall time and each bucket's seconds, e.g. 'time 21.3 s: startup 6.1, data 0.2, ...'."""
    parts = ", ".join(f"{k} {snapshot[k]:.1f}" for k in BUCKETS)
    return (
        f"time {snapshot['wall']:.1f} s: {parts} (not train steps: {snapshot['wall'] - snapshot['train_steps']:.1f} s)"
    )
