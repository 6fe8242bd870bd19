"""The reference MNIST CNN program and schedule that the benchmarks and tests build.

Each value is written out here, and equals the config schema's default (bnstudy/config.py, the one
home of defaults; a test checks that they agree), so that code without Hydra (the benchmarks, the
core tests) builds the same model, optimizer and schedule that a default run of the app trains.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn

from bnstudy.core import engine, models
from bnstudy.core.trainer import Schedule

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)

# models.build_model's keyword arguments: the `model` config group's defaults (num_classes: MNIST's).
MODEL: dict[str, Any] = dict(
    norm="before_relu",
    num_classes=NUM_CLASSES,
    dropout_placement="none",
    bn_momentum=0.9,
    bn_epsilon=1e-5,
    width=1.0,
    norm_kind="batch",
    norm_groups=8,
    bn_running_var="unbiased",
)

# engine.Setup's fields from the `optimizer` and `train` groups.
OPTIMIZER, MOMENTUM, BATCH_SIZE = "sgd", 0.9, 128

# One run's hyperparameters (engine.HParams): optimizer.lr, optimizer.weight_decay, model.init_scale,
# model.dropout.rate, seed.
HPARAMS: dict[str, Any] = dict(lr=0.1, weight_decay=0.0, init_scale=1.0, dropout_rate=0.0, seed=0)

# trainer.Schedule's fields: what `bnstudy.train.schedule_from` makes of the default config.
SCHEDULE: dict[str, Any] = dict(
    epochs=3,
    eval_every=1,
    log_every=50,
    eval_batch_size=1000,
    loop="auto",
    steps_per_call="auto",
    max_steps_per_epoch=None,
    probe_every=0,
    probe_multipliers=(0.5, 1.0, 2.0, 4.0),
    discrepancy=True,
    discrepancy_every_eval=False,
    population_batches=20,
    discrepancy_train_subset=2000,
    ics_every=0,
    eval_every_steps=0,
    dead_units=True,
)


def build_model(name: str = "cnn", **overrides: Any) -> nn.Module:
    """`models.build_model(name)` with the reference settings, `overrides` replacing some."""
    return models.build_model(name, **{**MODEL, **overrides})


def setup(model: nn.Module | None = None, **overrides: Any) -> engine.Setup:
    """The reference CNN (or `model`) with SGD momentum 0.9, batch 128 and MNIST's normalization."""
    fields = dict(
        optimizer=OPTIMIZER, momentum=MOMENTUM, batch_size=BATCH_SIZE, input_mean=MNIST_MEAN, input_std=MNIST_STD
    )
    return engine.Setup(model=build_model() if model is None else model, **{**fields, **overrides})


def hparams(rows: list[dict[str, Any]] | None = None) -> engine.HParams:
    """A pack of runs: each row's values over the reference hyperparameters (default: one run)."""
    return engine.HParams.stack([{**HPARAMS, **row} for row in (rows or [{}])])


def schedule(**overrides: Any) -> Schedule:
    """The default run's schedule, `overrides` replacing some fields."""
    return Schedule(**{**SCHEDULE, **overrides})
