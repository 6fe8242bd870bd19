"""The learning rate over training: constant, cosine decay or step decay, each with an optional linear warmup.

A schedule is a static part of the program (`engine.Setup.lr_schedule`), its shape in fractions of the run's
training steps, so the same study keeps its shape in a quick and a full variant. The peak lr is not part of
it: `multiplier(step)` is optax's schedule built on a peak of 1.0, and the step's lr is the run's (traced,
packable) `hp.lr` times it, so a pack of different peak lrs still compiles once. The step is the training
state's own counter, so a resumed run continues its schedule exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULES = ("constant", "cosine", "step")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LrSchedule:
    """No defaults here: bnstudy.core.from_config fills every field from the config schema."""

    name: str  # constant | cosine | step
    warmup: float  # fraction of the training steps over which the lr rises linearly from 0 to its peak
    floor: float  # cosine: the lr at the end, a fraction of the peak
    milestones: tuple[float, ...]  # step: fractions of training after which the lr is multiplied by `factor`
    factor: float  # step: the multiplier at each milestone
    # The run's training steps (epochs x steps per epoch): set by the trainer, which knows the data
    # (`over`); None until then. A constant schedule without warmup needs none.
    total_steps: int | None

    @property
    def is_constant(self) -> bool:
        """The lr is the peak at every step (the program is the one from before schedules existed)."""
        return self.name == "constant" and self.warmup_steps() == 0

    def over(self, total_steps: int) -> LrSchedule:
        """This schedule over a run of `total_steps` training steps. A constant lr without warmup needs no
        steps and stays as it is, so runs of different lengths share one program."""
        if self.name == "constant" and not self.warmup:
            return self
        return dataclasses.replace(self, total_steps=int(total_steps))

    def warmup_steps(self) -> int:
        if not self.warmup:
            return 0
        return max(1, round(self.warmup * self._total()))

    def milestone_steps(self) -> tuple[int, ...]:
        return tuple(round(m * self._total()) for m in self.milestones)

    def _total(self) -> int:
        if self.total_steps is None:
            raise ValueError(f"lr schedule {self.name!r} needs the run's total steps: call .over(total_steps)")
        return self.total_steps

    def optax_schedule(self) -> optax.Schedule:
        """optax's schedule of this shape with a peak of 1.0 (the multiplier of the run's peak lr)."""
        if self.name not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.name!r}; expected one of {list(LR_SCHEDULES)}")
        if self.is_constant:
            return optax.constant_schedule(1.0)
        total, warmup = self._total(), self.warmup_steps()
        if self.name == "cosine":
            if warmup:
                return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total, warmup + 1), self.floor)
            return optax.cosine_decay_schedule(1.0, max(total, 1), alpha=self.floor)
        if self.name == "constant":
            return optax.linear_schedule(0.0, 1.0, warmup)  # holds 1.0 after the warmup
        boundaries: dict[int, float] = {}
        for m in self.milestone_steps():  # milestones that round to one step (a short run) multiply there
            boundaries[m] = boundaries.get(m, 1.0) * self.factor
        steps = optax.piecewise_constant_schedule(1.0, boundaries)
        if not warmup:
            return steps
        # The warmup times the steps: the milestones stay where they are in the run, even inside the warmup.
        rise = optax.linear_schedule(0.0, 1.0, warmup)
        return lambda count: rise(count) * steps(count)

    def multiplier(self, step: jax.Array) -> jax.Array:
        """The lr at `step` (the number of steps already taken) as a fraction of the peak."""
        return jnp.asarray(self.optax_schedule()(step), jnp.float32)

    def describe(self) -> str:
        """One line for a run's summary, e.g. `cosine(warmup 0.05, floor 0)`."""
        warmup = f"warmup {self.warmup:g}" if self.warmup else ""
        if self.name == "cosine":
            parts = [warmup, f"floor {self.floor:g}"]
        elif self.name == "step":
            parts = [warmup, f"x{self.factor:g} at {', '.join(f'{m:g}' for m in self.milestones)}"]
        else:
            parts = [warmup]
        inner = ", ".join(p for p in parts if p)
        return f"{self.name}({inner})" if inner else self.name


def learning_rate(schedule: LrSchedule, peak, step) -> jax.Array:
    """The lr of the step taken from a state of `step` steps: the (traced) peak times the schedule's multiplier.
    A constant schedule returns the peak itself (no multiply), the program of a run without a schedule."""
    if schedule.is_constant:
        return peak
    return peak * schedule.multiplier(step)
