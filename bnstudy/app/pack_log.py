"""A pack's logs per model: its records into each run's sinks, and the result fields read from them."""

from __future__ import annotations

from pathlib import Path

from bnstudy.analysis import trained as run_rules
from bnstudy.analysis.convergence import steps_to_target
from bnstudy.app import runs as runs_lib
from bnstudy.app.sinks import RunSinks
from bnstudy.perf.timing import TimeBreakdown

# Metric families that a diverged run has no final value for (its weights are frozen pre-divergence).
RESULT_PREFIXES = ("train/", "test/", "val/", "train_subset/", "smooth/", "disc/", "bn/", "ics/", "relu/")


# What steps_to_target reads: validation accuracy when the data has a validation split, else test accuracy.
TARGET_KEYS = ("val/acc", "test/acc")


def convergence(evaluations: list[dict], target: float | None) -> dict:
    """`steps_to_target` (null if never reached) and the key it was read from, or {} without a target."""
    if target is None:
        return {}
    key = next((k for k in TARGET_KEYS if any(k in r for r in evaluations)), TARGET_KEYS[0])
    return {"steps_to_target": steps_to_target(evaluations, target, key), "steps_to_target_key": key}


class PackLogger:
    """Splits the trainer's [K]-array logs into per-model records, silencing a model once it diverged;
    keeps each model's accuracy history (`evaluations`) for `steps_to_target`; its time goes to the
    `logging` bucket of `times`."""

    def __init__(self, sinks: list[RunSinks], times: TimeBreakdown, stopped: list[bool] | None = None):
        self.sinks = sinks
        self.stopped = list(stopped) if stopped is not None else [False] * len(sinks)
        self.evaluations: list[list[dict]] = [[] for _ in sinks]
        self.times = times

    def __call__(self, step: int, epoch: float, metrics: dict) -> None:
        with self.times.measure("logging"):
            self._log(step, epoch, metrics)

    def _log(self, step: int, epoch: float, metrics: dict) -> None:
        diverged = metrics.pop("train/diverged", None)
        for k, sink in enumerate(self.sinks):
            if self.stopped[k]:
                continue
            sink.log(step, {"epoch": epoch, **{key: value[k] for key, value in metrics.items()}})
            accuracies = {key: float(metrics[key][k]) for key in TARGET_KEYS if key in metrics}
            if accuracies:
                self.evaluations[k].append({"step": step, **accuracies})
            if diverged is not None and diverged[k] > 0:
                self.stopped[k] = True


def without_results_if_diverged(final: dict) -> dict:
    """A diverged run's result metrics are null: its weights are frozen pre-divergence."""
    if final["status"] != "diverged":
        return final
    return {key: (None if key.startswith(RESULT_PREFIXES) else v) for key, v in final.items()}


def learned(final: dict, folder: Path, num_classes: int) -> dict:
    """`trained` (bnstudy.analysis.trained.is_trained on the first and last logged train/loss and the final test/acc;
    false for a diverged run) and `gen_gap` (train_subset/acc - test/acc, both in inference mode; None
    without either). The losses are read back from the run's metrics.jsonl, which a resumed run continues."""
    if final["status"] == "diverged":
        return {"trained": False, "gen_gap": None}
    losses = [r["train/loss"] for r in runs_lib.read_jsonl(folder / "metrics.jsonl") if r.get("train/loss") is not None]
    first, last = (losses[0], losses[-1]) if losses else (None, None)
    trained = run_rules.is_trained(first, last, final.get("test/acc"), num_classes)
    train_acc, test_acc = final.get("train_subset/acc"), final.get("test/acc")
    gap = None if train_acc is None or test_acc is None else float(run_rules.gen_gap(train_acc, test_acc))
    return {"trained": bool(trained), "gen_gap": gap}
