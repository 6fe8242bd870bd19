"""The core's objects of one job built from its config: the model, the static Setup, the Schedule, HParams.

The config's values (bnstudy.schema, the one home of defaults) are the only source: the model, Setup
and Schedule have no defaults of their own. The app calls these on a validated config; the benchmarks
and tests call them on `schema.Config()`, so they build what a default run of the app trains.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn

from bnstudy import schema
from bnstudy.core import engine, models
from bnstudy.core.lr_schedule import LrSchedule
from bnstudy.core.trainer import Schedule


def model_kwargs(m: schema.ModelConfig, num_classes: int) -> dict[str, Any]:
    """`models.build_model`'s keyword arguments from the `model` config group."""
    return dict(
        norm=m.norm,
        num_classes=num_classes,
        dropout_placement=m.dropout.placement,
        bn_momentum=m.bn_momentum,
        bn_epsilon=m.bn_epsilon,
        width=m.width,
        depth=m.depth,
        norm_kind=m.norm_kind,
        norm_groups=m.norm_groups,
        bn_running_var=m.bn_running_var,
    )


def model_from_config(cfg: schema.Config, num_classes: int) -> nn.Module:
    return models.build_model(cfg.model.name, **model_kwargs(cfg.model, num_classes))


def lr_schedule_from_config(cfg: schema.Config) -> LrSchedule:
    """The `optimizer.schedule` group, not yet over a number of steps (the trainer sets them)."""
    s = cfg.optimizer.schedule
    return LrSchedule(
        name=s.name,
        warmup=float(s.warmup),
        floor=float(s.floor),
        milestones=tuple(float(m) for m in s.milestones),
        factor=float(s.factor),
        total_steps=None,
    )


def setup_from_config(
    cfg: schema.Config,
    num_classes: int,
    input_mean: tuple[float, ...],
    input_std: tuple[float, ...],
    augment: bool,
) -> engine.Setup:
    """The static part of the job: its model, optimizer kind, lr schedule, batch size and the dataset's
    normalization. The schedule's total steps are set by the trainer, which knows the data."""
    return engine.Setup(
        model=model_from_config(cfg, num_classes),
        optimizer=cfg.optimizer.name,
        momentum=cfg.optimizer.momentum,
        lr_schedule=lr_schedule_from_config(cfg),
        batch_size=cfg.train.batch_size,
        input_mean=tuple(input_mean),
        input_std=tuple(input_std),
        augment=augment,
    )


def population_batches(cfg: schema.Config) -> int:
    """Batches for the population statistics: enough for `discrepancy.population_examples` examples when set,
    so that every batch size pools over the same number of examples; else `discrepancy.population_batches`."""
    d = cfg.discrepancy
    return -(-d.population_examples // cfg.train.batch_size) if d.population_examples else d.population_batches


def schedule_from_config(cfg: schema.Config) -> Schedule:
    t = cfg.train
    return Schedule(
        epochs=t.epochs,
        eval_every=t.eval_every,
        log_every=t.log_every,
        eval_batch_size=t.eval_batch_size,
        loop=t.loop,
        steps_per_call=t.steps_per_call,
        max_steps_per_epoch=t.max_steps_per_epoch,
        probe_every=cfg.probe.every,
        probe_multipliers=tuple(cfg.probe.step_multipliers),
        discrepancy=cfg.discrepancy.enabled,
        discrepancy_every_eval=cfg.discrepancy.every_eval,
        population_batches=population_batches(cfg),
        discrepancy_train_subset=cfg.discrepancy.train_subset,
        ics_every=cfg.ics.every,
        eval_every_steps=t.eval_every_steps,
        dead_units=cfg.dead_units.enabled,
    )


def hparams_row(run: schema.Config) -> dict[str, Any]:
    """The engine.HParams fields of a resolved (scalar) run config."""
    return {field_name: schema.get(run, key) for key, field_name in schema.PACKABLE.items()}


def hparams_from_config(cfg: schema.Config, rows: list[dict[str, Any]] | None = None) -> engine.HParams:
    """A pack of runs: each row's HParams values over those of the (scalar) config (default: one run)."""
    base = hparams_row(cfg)
    return engine.HParams.stack([{**base, **row} for row in (rows or [{}])])
