"""Which runs a job trains: the unfinished ones, claimed in packs of runs that resume at the same epoch."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from bnstudy.app import checkpoints
from bnstudy.app import claims as claims_lib
from bnstudy.app import runs as runs_lib
from bnstudy.app.config import Config

log = logging.getLogger("bnstudy")


def unfinished_runs(runs: list[Config], rerun: bool) -> tuple[list[Config], list[dict]]:
    """Runs still to train, and a line for each run whose folder already holds its finished result."""
    todo, skipped = [], []
    for run in runs:
        folder, expected = runs_lib.run_dir(run), runs_lib.config_hash(run)
        status = None if rerun else claims_lib.finished_status(folder, expected)
        if status:
            claims_lib.tidy_finished(folder)
            skipped.append(skipped_row(run, status))
            continue
        if not rerun:
            say_why_trained_again(folder, expected)
        todo.append(run)
    return todo, skipped


def say_why_trained_again(folder, expected_hash: str) -> None:
    """A warning when an existing folder is trained again: a file missing, or one that cannot be read."""
    missing = claims_lib.finished_but_missing(folder, expected_hash)
    why = f"finished, but {', '.join(missing)} is missing" if missing else claims_lib.unreadable(folder)
    if why:
        log.warning("%s: %s; training it again", folder, why)


def skipped_row(run: Config, why: str) -> dict:
    folder = runs_lib.run_dir(run)
    try:
        summary = runs_lib.read_run_folder(folder)[1]
    except (OSError, ValueError):
        summary = {}
    line = {"name": runs_lib.run_name(run), "path": str(folder), "test/acc": summary.get("test/acc")}
    line["trained"] = summary.get("trained")
    if why == "locked":
        line["status"] = "skipped: another process is training it"
    else:
        line["status"] = f"skipped: already {why} (train.rerun=true retrains)"
    return line  # printed once, in the job's closing table


def claimed_packs(
    pending: list[Config], pack_size: int, rerun: bool, skipped: list[dict]
) -> Iterator[tuple[list[claims_lib.Claim], list[checkpoints.Progress | None]]]:
    """Each pack's claimed runs (locked; the caller releases them) and their checkpoints, until none is left.
    A pack shares one start epoch: runs are grouped by the epoch of their checkpoint (0: none). Runs locked
    or finished by another process meanwhile are skipped with a line in `skipped`."""
    groups = by_start_epoch(pending, rerun)
    while groups:
        epoch = next(iter(groups))
        claims = claim_chunk(groups[epoch], pack_size, rerun, skipped)
        if not groups[epoch]:
            del groups[epoch]
        progress = [resume_progress(c.run, rerun) if c.resume else None for c in claims]
        for c, p in zip(list(claims), progress):  # another process moved it on since: to its own group
            if start_epoch(p) != epoch:
                c.release()
                claims.remove(c)
                groups.setdefault(start_epoch(p), []).append(c.run)
        progress = [p for p in progress if start_epoch(p) == epoch]
        if not claims:
            continue
        for c, p in zip(claims, progress):
            if p:
                log.info("%s: resuming from its checkpoint after epoch %d", runs_lib.run_name(c.run), p.epoch)
        yield claims, progress


def by_start_epoch(pending: list[Config], rerun: bool) -> dict[int, list[Config]]:
    """The runs grouped by the epoch their checkpoint would resume at, in order of first appearance."""
    groups: dict[int, list[Config]] = {}
    for run in pending:
        groups.setdefault(start_epoch(resume_progress(run, rerun)), []).append(run)
    return groups


def resume_progress(run: Config, rerun: bool) -> checkpoints.Progress | None:
    """The checkpoint an unfinished run would resume from (None: it trains from the start). Under the run's
    lock this decides; before it, a hint for grouping runs into packs."""
    folder = runs_lib.run_dir(run)
    if rerun or not claims_lib.resumable(folder, runs_lib.config_hash(run)):
        return None
    try:
        return checkpoints.latest(folder)
    except Exception as e:  # an unreadable checkpoint: train from the start rather than stop the sweep
        log.warning("%s: checkpoint unreadable (%s: %s); training from the start", folder, type(e).__name__, e)
        return None


def start_epoch(progress: checkpoints.Progress | None) -> int:
    return progress.epoch if progress else 0


def claim_chunk(pending: list[Config], size: int, rerun: bool, skipped: list[dict]) -> list[claims_lib.Claim]:
    """Lock up to `size` runs from the front of `pending` (removing them); locked or meanwhile finished
    runs are skipped with a line."""
    claims = []
    while pending and len(claims) < size:
        c = claims_lib.claim(pending.pop(0), rerun=rerun)
        if c.skip:
            skipped.append(skipped_row(c.run, c.skip))
        else:
            claims.append(c)
    return claims
