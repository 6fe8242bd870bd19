"""Stopping on a signal: SIGTERM and SIGINT become `RunInterrupted`, deferred while a checkpoint is written."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT arrived: the runs in progress are marked `interrupted`, the process exits 128+signal.
    A BaseException, so that no library's `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name
        self.folders: list[str] = []


_deferred = {"active": False, "signum": None}  # see signals_deferred


@contextmanager
def signals_deferred():
    """A signal arriving inside this block raises RunInterrupted only when the block is done (a checkpoint
    being written is completed first; it takes milliseconds)."""
    _deferred["active"] = True
    try:
        yield
    finally:
        _deferred["active"] = False
    signum, _deferred["signum"] = _deferred["signum"], None
    if signum is not None:
        raise RunInterrupted(signum)


@contextmanager
def interrupts_as_exceptions():
    """SIGTERM (what SLURM sends on timeout or preemption) and SIGINT (Ctrl-C) raise RunInterrupted once
    (deferred while a checkpoint is written); a second signal gets the default action (end now)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)
        if _deferred["active"]:
            _deferred["signum"] = signum
            return
        raise RunInterrupted(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
