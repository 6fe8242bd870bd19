"""When a pack trains, evaluates and probes: the `Schedule`, the loop and chunk choices, the evaluation
points, the probe steps and the splits evaluated. Pure host-side arithmetic, no compiled programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from bnstudy.core.engine import ArrayData

Split = tuple[jax.Array, jax.Array]  # uint8 images [N, ...], int32 labels [N]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """How long to train and how often to look. No defaults here: the app fills every field from the
    config schema (bnstudy/schema.py), the one home of default values."""

    epochs: int
    eval_every: int  # epochs; 0 = only at the end
    log_every: int  # steps
    eval_batch_size: int
    loop: str  # python | scan | auto (scan on accelerators, python on CPU)
    steps_per_call: int | str  # python loop: train steps per compiled call (unrolled), or "auto"
    max_steps_per_epoch: int | None  # cap for quick runs and tests
    probe_every: int  # steps between loss-smoothness probes; 0 = off
    probe_multipliers: tuple[float, ...]  # probe step sizes, multiples of the lr
    discrepancy: bool  # evaluate in the three BN modes (models with BN only)
    discrepancy_every_eval: bool  # at every evaluation; False = at the last evaluation of training only
    population_batches: int  # training batches for the population statistics (at most one epoch's)
    discrepancy_train_subset: int  # first N training examples, also evaluated in the three modes
    ics_every: int  # steps between internal-covariate-shift probes; 0 = off
    eval_every_steps: int  # steps between evaluations; 0 = every `eval_every` epochs instead
    dead_units: bool  # relu/<layer>/dead_frac at each evaluation (on `units_split`)


def resolve_loop(loop: str) -> str:
    if loop != "auto":
        return loop
    return "python" if jax.default_backend() == "cpu" else "scan"


# Steps per call that `steps_per_call=auto` picks, per backend. On CPU a chunk of unrolled steps buys
# almost nothing per step (the allocator settings of bnstudy.perf.allocator already keep calls cheap) while
# each unrolled step adds cold XLA compilation and tracing to every start (docs/design.md has the numbers);
# an accelerator pays a dispatch per call instead, which chunks amortize.
AUTO_STEPS_PER_CALL_CPU = 1
AUTO_STEPS_PER_CALL_ACCELERATOR = 8


def auto_steps_per_call(backend: str) -> int:
    return AUTO_STEPS_PER_CALL_CPU if backend == "cpu" else AUTO_STEPS_PER_CALL_ACCELERATOR


def resolve_steps_per_call(steps_per_call: int | str, steps_per_epoch: int, backend: str | None = None) -> int:
    """`steps_per_call` (an int >= 1, or "auto": `auto_steps_per_call` of `backend`, default JAX's) as a
    chunk length in 1..steps_per_epoch."""
    if steps_per_call == "auto":
        k = auto_steps_per_call(backend or jax.default_backend())
    else:
        k = int(steps_per_call)
    return max(1, min(k, steps_per_epoch))


def chunk_plan(start: int, stop: int, k: int, starts_chunk: Callable[[int], bool]) -> list[tuple[int, int]]:
    """The python loop's calls over the steps [start, stop): (first step, number of steps), each k or 1.

    A chunk of k runs only where none of its steps but the first must start a call (`starts_chunk`:
    a probe looks before that step, so the step before it ends a call); elsewhere, and for an epoch's
    tail shorter than k, single steps run. Two programs (k steps and 1 step) cover every epoch length.
    """
    plan, i = [], start
    while i < stop:
        n = k if i + k <= stop and not any(starts_chunk(j) for j in range(i + 1, i + k)) else 1
        plan.append((i, n))
        i += n
    return plan


def evaluation_points(schedule: Schedule, steps_per_epoch: int, epoch: int) -> tuple[int, ...]:
    """Steps into `epoch` (1..steps_per_epoch) after which the pack is evaluated: whenever the run's
    step count is a multiple of `eval_every_steps` when that is set (then `eval_every` is not used),
    else at the end of every `eval_every`-th epoch; always at the end of training."""
    s, n = schedule, steps_per_epoch
    if s.eval_every_steps:
        points = {i for i in range(1, n + 1) if (epoch * n + i) % s.eval_every_steps == 0}
    else:
        points = {n} if s.eval_every and (epoch + 1) % s.eval_every == 0 else set()
    if epoch + 1 == s.epochs:
        points.add(n)
    return tuple(sorted(points))


def probe_due(schedule: Schedule, step: int, prefix: str = "smooth/") -> bool:
    """Whether the probe of `prefix` ("smooth/" or "ics/") looks before step `step` (counted over the run)."""
    every = schedule.ics_every if prefix == "ics/" else schedule.probe_every
    return bool(every) and step % every == 0


def evaluation_splits(data: ArrayData, schedule: Schedule) -> tuple[dict[str, Split], dict[str, Split]]:
    """(splits evaluated with BN on running averages, splits also evaluated in BN's three modes).

    Every model gets `test`, `val` (when the data holds one out) and `train_subset` (the first
    `discrepancy_train_subset` training examples, all of them trained on, for the generalization gap)
    in inference mode; with `discrepancy`, `test` and `train_subset` also get BN's three modes."""
    test = (data.test_images, data.test_labels)
    splits = {"test": test}
    if data.val_images is not None:
        splits["val"] = (data.val_images, data.val_labels)
    n_subset = min(schedule.discrepancy_train_subset, int(data.train_images.shape[0]))
    if n_subset:
        splits["train_subset"] = (data.train_images[:n_subset], data.train_labels[:n_subset])
    bn_mode_names = ("test", "train_subset") if schedule.discrepancy else ()
    return splits, {name: splits[name] for name in bn_mode_names if name in splits}


def units_split(splits: dict[str, Split]) -> str:
    """The split whose inference pass counts dead units: the validation split when there is one (it is
    evaluated in running mode only, so the counts ride on a pass made anyway), else the test split."""
    return "val" if "val" in splits else "test"
