"""wandb in a child process: the training process never imports wandb, and wandb never runs on its threads.

wandb's import, each run's `wandb.init` and `finish` (seconds of a job on a CPU host; docs/design.md §7) run in
one child process per job, beside the training process's compilation and steps. A
wandb crash, hang or outage reaches training only as a warning.

`WandbProcess` is the training process's side: requests go out in order through a writer thread (a
pack of hundreds of runs never blocks the trainer on a full pipe), replies come back through a
reader thread as resolved futures. The child (`python -m bnstudy.app.wandb_process FD`) reads pickled
requests from its stdin and writes pickled replies to file descriptor FD (not stdout, which wandb may
print to):

    (n, "init", key, kwargs)                 -> (n, {"id": str | None, "warning": str | None,
                                                     "offline_because": str | None})
    (n, "log", key, step, metrics)           -> no reply; a failure is reported by the run's finish
    (n, "finish", key, summary, exit_code)   -> (n, {"warning": str | None}); the summary's nulls are
                                                removed from the run's wandb summary (`split_nulls`)

`offline_because` is set once per job: the first online init that failed, after which this and every
later run of the job is offline. The child ignores SIGINT and SIGTERM (the training process marks its
runs interrupted and finishes them); at the end of its input (the training process closed it, or died)
it finishes every run still open with exit code 1 and exits.
"""

from __future__ import annotations

import itertools
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

CHILD_GONE = "the wandb process ended"
_exiting: list[subprocess.Popen] = []  # closed children not waited for, reaped once they have exited


class WandbProcess:
    """One job's wandb child process, started at construction; `close` finishes it."""

    def __init__(self, mode: str, init_timeout: float, env: dict[str, str] | None = None):
        _exiting[:] = [p for p in _exiting if p.poll() is None]
        replies_r, replies_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bnstudy.app.wandb_process", str(replies_w), mode, repr(float(init_timeout))],
            stdin=subprocess.PIPE,
            pass_fds=(replies_w,),
            env=env,
        )
        os.close(replies_w)
        self.pid = self._proc.pid
        self._replies = os.fdopen(replies_r, "rb")
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._outbox: queue.Queue = queue.Queue()
        self.open_runs = 0  # inits sent whose run has not yet been answered finished (or failed to open)
        self._writer = threading.Thread(target=self._write, name="bnstudy-wandb-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, name="bnstudy-wandb-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    def request(self, op: str, *args, reply: bool = True) -> Future | None:
        """Send `(n, op, *args)`; with `reply`, a future of the child's answer (an exception if the child
        ended first)."""
        future = Future() if reply else None
        with self._lock:
            n = next(self._numbers)
            self.open_runs += op == "init"
            if future is not None:
                if not self._reader.is_alive() and self._proc.poll() is not None:
                    future.set_exception(RuntimeError(CHILD_GONE))
                    return future
                self._pending[n] = future
        self._outbox.put((n, op, *args))
        return future

    def close(self, timeout: float = 60.0) -> None:
        """End the child's input. With a run still open, wait until the child has finished it and exited
        (killed after `timeout`); once every run's finish was answered, its files are complete, and
        wandb's own teardown in the child (~0.4 s) is not waited for."""
        self._outbox.put(None)
        self._writer.join()
        if self.open_runs == 0:
            _exiting.append(self._proc)
            return
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)

    def _write(self) -> None:
        stream = self._proc.stdin
        try:
            while (message := self._outbox.get()) is not None:
                pickle.dump(message, stream)
                stream.flush()
        except OSError:  # the child is gone: the reader fails what waits on it
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _read(self) -> None:
        try:
            while True:
                n, answer = pickle.load(self._replies)
                with self._lock:
                    future = self._pending.pop(n, None)
                    self.open_runs -= "id" not in answer or answer["id"] is None  # finished, or never opened
                if future is not None:
                    future.set_result(answer)
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        finally:
            self._replies.close()
            with self._lock:
                pending, self._pending = list(self._pending.values()), {}
            for future in pending:
                future.set_exception(RuntimeError(CHILD_GONE))


# ------------------------------------------------------------------------------------------ the child


class ChildRuns:
    """The child's wandb runs by key, and the job's mode (online falls back to offline once)."""

    def __init__(self, wandb, mode: str, init_timeout: float):
        self.wandb, self.mode, self.init_timeout = wandb, mode, init_timeout
        self.open: dict[Any, Any] = {}
        self.failed_logs: dict[Any, str] = {}

    def init(self, key, kwargs: dict) -> dict:
        answer = {"id": None, "warning": None, "offline_because": None}
        try:
            try:
                run = self._init(self.mode, kwargs)
            except Exception as e:
                if self.mode != "online":
                    raise
                answer["offline_because"] = f"{type(e).__name__}: {first_line(e)}"
                self.mode = "offline"
                for attempt in Path(kwargs["dir"]).glob("wandb/run-*"):  # the failed online run's empty folder
                    shutil.rmtree(attempt, ignore_errors=True)
                run = self._init("offline", kwargs)
        except Exception as e:  # wandb is optional to the science
            answer["warning"] = f"wandb init failed, continuing without wandb for this run: {e}"
            return answer
        self.open[key] = run
        answer["id"] = run.id
        return answer

    def _init(self, mode: str, kwargs: dict):
        settings = self.wandb.Settings(console="off", silent=True, init_timeout=self.init_timeout)
        return self.wandb.init(mode=mode, reinit="create_new", settings=settings, **kwargs)

    def log(self, key, step: int, metrics: dict) -> None:
        run = self.open.get(key)
        if run is None or key in self.failed_logs:
            return
        try:
            run.log(metrics, step=step)
        except Exception as e:
            self.failed_logs[key] = f"wandb log failed, continuing without wandb for this run: {e}"

    def finish(self, key, summary: dict | None, exit_code: int) -> dict:
        run = self.open.pop(key, None)
        warning = self.failed_logs.pop(key, None)
        if run is None:
            return {"warning": warning}
        try:
            if summary:
                values, nulls = split_nulls(summary)
                run.summary.update(values)
                for key in nulls:  # no value, not even the last one logged (a diverged run's results)
                    del run.summary[key]
            run.finish(exit_code=exit_code)
        except Exception as e:
            warning = f"wandb finish failed: {e}"
        return {"warning": warning}

    def finish_all(self) -> None:
        for key in list(self.open):
            self.finish(key, None, exit_code=1)


def split_nulls(summary: dict) -> tuple[dict, list[str]]:
    """(the summary without its null values, nested ones too; the top-level keys that were null).

    wandb encodes a null by first asking whether it is a pandas DataFrame, which imports pandas and
    pyarrow in the child: 0.45-0.6 s at the end of every job, while the training process waits."""
    values = {k: (split_nulls(v)[0] if isinstance(v, dict) else v) for k, v in summary.items() if v is not None}
    return values, [k for k, v in summary.items() if v is None]


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def serve(requests, replies, runs: ChildRuns) -> None:
    """Answer requests until the end of input, then finish every run still open."""
    try:
        while True:
            try:
                n, op, *args = pickle.load(requests)
            except EOFError:
                break
            if op == "log":
                runs.log(*args)
                continue
            answer = runs.init(*args) if op == "init" else runs.finish(*args)
            pickle.dump((n, answer), replies)
            replies.flush()
    finally:
        runs.finish_all()


def main(argv: list[str]) -> None:
    reply_fd, mode, init_timeout = int(argv[0]), argv[1], float(argv[2])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    import wandb

    with os.fdopen(reply_fd, "wb") as replies:
        serve(sys.stdin.buffer, replies, ChildRuns(wandb, mode, init_timeout))


if __name__ == "__main__":
    main(sys.argv[1:])
