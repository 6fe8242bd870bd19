"""The config's validation (before any compute), parsing onto the schema, and pack expansion.

A config arrives from Hydra (or a plain dict in tests), is merged onto the dataclass schema
(bnstudy.schema, the one home of defaults), checked value by value, and expanded into one fully
resolved config per trained model: a list in a packable key (seed, lr, init scale, dropout rate,
weight decay) means "train each of these", and the pack is the Cartesian product of those lists.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from bnstudy.core.datasets import FACTS
from bnstudy.core.from_config import hparams_row  # noqa: F401  (re-exported: the app stacks a pack's HParams)
from bnstudy.core.lr_schedule import LR_SCHEDULES
from bnstudy.core.models import (
    BN_RUNNING_VARS,
    DROPOUT_PLACEMENTS,
    MODELS,
    NORM_KINDS,
    NORMS,
    depth_problem,
    norm_groups_problem,
)
from bnstudy.schema import PACKABLE, Config, get  # Config re-exported: the app's modules type with it

DATASETS = tuple(FACTS)
OPTIMIZERS = ("sgd", "adam")
WANDB_MODES = ("offline", "online", "disabled")
LOOPS = ("auto", "python", "scan")

# Keys that change the compiled program: a list here is a mistake, Hydra's -m is the way.
STRUCTURAL = (
    "dataset.name",
    "model.name",
    "model.norm",
    "model.norm_kind",
    "model.norm_groups",
    "model.bn_running_var",
    "model.width",
    "model.depth",
    "model.bn_momentum",
    "model.dropout.placement",
    "optimizer.name",
    "optimizer.momentum",
    "optimizer.schedule.name",
    "optimizer.schedule.warmup",
    "optimizer.schedule.floor",
    "optimizer.schedule.factor",
    "train.batch_size",
    "probe.every",
    "ics.every",
    "dead_units.enabled",
    "discrepancy.enabled",
    "discrepancy.population_batches",
    "discrepancy.population_examples",
    "discrepancy.train_subset",
)


class ConfigError(ValueError):
    """A config value that cannot be trained; the message says which key, what is expected, what was given."""


def _fail(key: str, expected: str, given: Any, hint: str = "") -> None:
    msg = f"Invalid config: `{key}` must be {expected}; got {given!r} ({type(given).__name__})."
    raise ConfigError(msg + (" " + hint if hint else ""))


def _set(cfg: Config, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    target = cfg
    for part in parents:
        target = getattr(target, part)
    setattr(target, last, value)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_choice(cfg, key, choices):
    value = get(cfg, key)
    if isinstance(value, (list, tuple)):
        _fail(key, f"a single value from {list(choices)}", value, _SWEEP_HINT.format(key=key))
    if value not in choices:
        _fail(key, f"one of {list(choices)}", value)


_SWEEP_HINT = (
    "It changes the compiled program, so it cannot be packed: sweep it as separate jobs with "
    "Hydra's multirun, e.g. `python -m bnstudy.train -m {key}=a,b,c`."
)

# Packable key -> (predicate on one value, what is expected).
_PACKABLE_RULES = {
    "optimizer.lr": (lambda v: _number(v) and v > 0, "a positive number"),
    "optimizer.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "model.init_scale": (lambda v: _number(v) and v > 0, "a positive number"),
    "model.dropout.rate": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31, "an integer >= 0"),
}

# Scalar key -> (predicate, what is expected).
_SCALAR_RULES = {
    "model.bn_momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.bn_epsilon": (lambda v: _number(v) and v > 0, "a positive number"),
    "model.width": (lambda v: _number(v) and v > 0, "a positive number"),
    "model.norm_groups": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "optimizer.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optimizer.schedule.warmup": (
        lambda v: _number(v) and 0 <= v < 1,
        "a fraction of the training steps in [0, 1) (0 = no warmup)",
    ),
    "optimizer.schedule.floor": (lambda v: _number(v) and 0 <= v <= 1, "a fraction of the peak lr in [0, 1]"),
    "optimizer.schedule.factor": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "optimizer.schedule.milestones": (
        lambda v: (
            isinstance(v, (list, tuple)) and all(_number(m) and 0 < m < 1 for m in v) and list(v) == sorted(set(v))
        ),
        "a list of increasing fractions of the training steps, each in (0, 1)",
    ),
    "train.batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "train.epochs": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "train.eval_every": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = only at the end)"),
    "train.eval_every_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = use train.eval_every)"),
    "train.log_every": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "train.eval_batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "train.max_steps_per_epoch": (lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
    "train.checkpoint_every": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "an integer >= 0 (epochs between checkpoints; 0 = off)",
    ),
    "train.pack_size": (lambda v: v == "auto" or (isinstance(v, int) and v >= 1), "'auto' or an integer >= 1"),
    "train.steps_per_call": (
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "'auto' or an integer >= 1",
    ),
    "dataset.val_size": (
        lambda v: not isinstance(v, bool) and ((isinstance(v, int) and v >= 0) or (_number(v) and 0 < v < 1)),
        "a fraction of the training split in (0, 1), or a number of examples >= 0 (0 = no validation split)",
    ),
    "train.devices": (
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "'auto' or an integer >= 1 (local devices to split a pack over)",
    ),
    "dataset.train_subset": (lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
    "dataset.test_subset": (lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
    "probe.every": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (steps between probes; 0 = off)"),
    "train.target_acc": (lambda v: v is None or (_number(v) and 0 < v <= 1), "null or an accuracy in (0, 1]"),
    "ics.every": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (steps between ICS probes; 0 = off)"),
    "probe.step_multipliers": (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_number(m) and m > 0 for m in v),
        "a non-empty list of positive numbers (multiples of the learning rate)",
    ),
    "discrepancy.population_batches": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "discrepancy.population_examples": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "an integer >= 0 (training examples for the population statistics; 0 = use population_batches)",
    ),
    "discrepancy.train_subset": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = no training subset)"),
    "logger.wandb.init_timeout": (lambda v: _number(v) and v > 0, "a positive number of seconds"),
}


def _check_packable(cfg: Config, key: str) -> None:
    ok, expected = _PACKABLE_RULES[key]
    value = get(cfg, key)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        _fail(key, f"{expected}, or a non-empty list of them to pack", value)
    for v in values:
        if not ok(v):
            _fail(key, f"{expected} (or a list of them to pack)", v)
    if len(set(values)) != len(values):
        _fail(key, "a list without repeated values", value)


def validate(cfg: Config) -> Config:
    """Check every value of a schema-typed config; raises ConfigError naming the first bad key."""
    if cfg.dataset is None:
        _fail("dataset", "a dataset (dataset=mnist_t10k, dataset=mnist or dataset=cifar10)", None)
    _check_choice(cfg, "dataset.name", DATASETS)
    _check_choice(cfg, "model.name", MODELS)
    _check_choice(cfg, "model.norm", NORMS)
    _check_choice(cfg, "model.norm_kind", NORM_KINDS)
    _check_choice(cfg, "model.bn_running_var", BN_RUNNING_VARS)
    _check_choice(cfg, "model.dropout.placement", DROPOUT_PLACEMENTS)
    _check_choice(cfg, "optimizer.name", OPTIMIZERS)
    _check_choice(cfg, "optimizer.schedule.name", LR_SCHEDULES)
    _check_choice(cfg, "logger.wandb.mode", WANDB_MODES)
    _check_choice(cfg, "train.loop", LOOPS)
    for key, (ok, expected) in _SCALAR_RULES.items():
        if not ok(get(cfg, key)):
            _fail(key, expected, get(cfg, key))
    for key in PACKABLE:
        _check_packable(cfg, key)
    _check_dropout_has_a_placement(cfg)
    if cfg.model.depth is not None and (expected := depth_problem(cfg.model.name, cfg.model.depth)):
        _fail("model.depth", expected, cfg.model.depth, "Leave it unset (null) for the model's standard depth.")
    _check_norm(cfg)
    return cfg


def _check_dropout_has_a_placement(cfg: Config) -> None:
    """A dropout rate without a placement would train the same model under a different run id: refuse it."""
    rate = cfg.model.dropout.rate
    rates = list(rate) if isinstance(rate, (list, tuple)) else [rate]
    if cfg.model.dropout.placement == "none" and any(r > 0 for r in rates):
        _fail(
            "model.dropout.rate",
            "0 while `model.dropout.placement` is 'none' (no dropout layer to apply it to)",
            rate,
            f"Choose a placement with `model.dropout.placement=` one of "
            f"{[p for p in DROPOUT_PLACEMENTS if p != 'none']}, or leave the rate at 0.",
        )


def _check_norm(cfg: Config) -> None:
    """What the norm kind needs of the model and the batch, checked before anything is built."""
    m = cfg.model
    if m.norm == "none":
        return
    if m.norm_kind == "group" and (problem := norm_groups_problem(m.name, m.width, m.norm_groups, m.depth)):
        _fail("model.norm_groups", f"a number of groups that fits model {m.name!r}", m.norm_groups, problem + ".")
    if m.norm_kind == "batch" and m.bn_running_var == "unbiased" and cfg.train.batch_size < 2:
        _fail(
            "train.batch_size",
            "at least 2 with batch norm and model.bn_running_var=unbiased",
            cfg.train.batch_size,
            "A dense block's BN then sees one value per channel, whose unbiased variance is undefined "
            "(PyTorch refuses it too); use a larger batch, model.bn_running_var=biased, or another norm kind.",
        )


@functools.cache
def typed_schema() -> DictConfig:
    """The schema as a typed OmegaConf tree, built once: building it from the dataclasses is a large part
    of a parse. `OmegaConf.merge` copies its first argument, so merges never change it."""
    return OmegaConf.structured(Config)


def parse(raw: DictConfig | dict) -> Config:
    """Merge a raw config onto the schema (types, unknown keys) and validate its values."""
    if isinstance(raw, dict):
        raw = OmegaConf.create(raw)
    for key in STRUCTURAL:  # before the typed merge, whose type error would hide the real advice
        value = OmegaConf.select(raw, key, default=None)
        if OmegaConf.is_list(value):
            _fail(key, "a single value", OmegaConf.to_container(value), _SWEEP_HINT.format(key=key))
    try:
        merged = OmegaConf.merge(typed_schema(), raw)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        raise ConfigError(
            f"Invalid config: unknown key `{e.full_key}`. Check its spelling; the known keys are in "
            f"configs/ and in the README's config table."
        ) from None
    except ValidationError as e:
        given = getattr(e, "value", None)
        raise ConfigError(
            f"Invalid config: `{e.full_key}` has the wrong type: {e.msg.splitlines()[0]} (got {given!r})."
        ) from None
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"Invalid config: `{e.full_key}` is required and was not given. For the dataset choose one with "
            f"`dataset=mnist_t10k`, `dataset=mnist` or `dataset=cifar10`."
        ) from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "?")
        raise ConfigError(f"Invalid config at `{key}`: {e.msg.splitlines()[0] if e.msg else e}.") from None
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def pack_axes(cfg: Config) -> dict[str, list]:
    """Packable key -> the list of values it takes in this job (a scalar is a list of one)."""
    axes = {}
    for key in PACKABLE:
        value = get(cfg, key)
        axes[key] = list(value) if isinstance(value, (list, tuple)) else [value]
    return axes


def expand_pack(cfg: Config) -> list[Config]:
    """One fully resolved config per model: the Cartesian product of the packable lists."""
    axes = pack_axes(cfg)
    runs = []
    for combo in itertools.product(*axes.values()):
        run = from_dict(to_dict(cfg))
        for key, value in zip(axes, combo):
            _set(run, key, int(value) if key == "seed" else float(value))
        runs.append(run)
    return runs


def from_dict(d: dict) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(typed_schema(), d))
