"""What every benchmark script shares: provenance header, generated data, timing loops and JSON output.

Needs only jax, flax, optax and numpy (bnstudy's core, `bnstudy.schema` and `bnstudy.app.provenance`), so that the benchmarks run on a bare JAX GPU machine: nothing here imports Hydra, wandb, TFDS,
omegaconf, orbax, pandas or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bnstudy import schema
from bnstudy.app import provenance
from bnstudy.core import from_config, models
from bnstudy.core.datasets import DIGITS
from bnstudy.core.engine import ArrayData, HParams, Setup
from bnstudy.core.trainer import Schedule

# The default run: the schema's defaults on the embedded digits, what the app trains without overrides.
DEFAULT = schema.Config(dataset=schema.DatasetConfig(name="mnist_t10k"))
BATCH = DEFAULT.train.batch_size


def build_model(name: str = "cnn", **overrides: Any) -> nn.Module:
    """`models.build_model(name)` with the default run's settings, `overrides` replacing some."""
    return models.build_model(name, **{**from_config.model_kwargs(DEFAULT.model, DIGITS.num_classes), **overrides})


def setup(model: nn.Module | None = None, **overrides: Any) -> Setup:
    """The default run's Setup (the CNN, SGD momentum 0.9, batch 128, MNIST's normalization) around `model`
    (default: the default CNN), `overrides` replacing some fields."""
    default = from_config.setup_from_config(DEFAULT, DIGITS.num_classes, DIGITS.mean, DIGITS.std, DIGITS.augment)
    return dataclasses.replace(default, **({} if model is None else {"model": model}), **overrides)


def schedule(**overrides: Any) -> Schedule:
    """The default run's schedule, `overrides` replacing some fields."""
    return dataclasses.replace(from_config.schedule_from_config(DEFAULT), **overrides)


def hparams(rows: list[dict[str, Any]] | None = None) -> HParams:
    """A pack of runs: each row's values over the default run's hyperparameters (default: one run)."""
    return from_config.hparams_from_config(DEFAULT, rows)


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (NaN where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else [float("nan")] * 3


def cpus_usable() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine(extra_packages: tuple[str, ...] = ("torch",)) -> dict[str, Any]:
    """Device, versions, git state, CPUs, load and XLA flags: where the numbers of this run came from."""
    versions = dict(provenance.package_versions())
    for name in extra_packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        **provenance.device_info(),
        "git_sha": provenance.git_sha(),
        "versions": versions,
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus_usable(),
        "load_start": load(),
    }


def print_header(title: str, info: dict[str, Any]) -> None:
    v, ld = info["versions"], info["load_start"]
    print(f"{title} on {info['backend']} / {info['device_kind']} (x{info['device_count']}), git {info['git_sha']}")
    print(
        "  "
        + "  ".join(f"{k} {v[k]}" for k in ("python", "jax", "jaxlib", "flax", "optax", "numpy", "torch") if k in v)
    )
    print(
        f"  {info['platform']}, {info['cpus_usable']}/{info['cpu_count']} CPUs usable, "
        f"load {ld[0]:.2f} {ld[1]:.2f} {ld[2]:.2f}, XLA_FLAGS={info['xla_flags']!r}, malloc {info['malloc']}"
    )
    if ld[0] > 0.5 * info["cpus_usable"]:
        print(f"  WARNING: load {ld[0]:.2f} on {info['cpus_usable']} CPUs: other jobs compete; re-run when idle")


def random_data(num_train: int, num_test: int = BATCH, seed: int = 0) -> ArrayData:
    """Random uint8 MNIST-shaped images and labels, generated on the default device (speed, not accuracy)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    shape = DIGITS.image_shape

    def images(k, n):
        return jax.random.randint(k, (n, *shape), 0, 256, jnp.int32).astype(jnp.uint8)

    def labels(k, n):
        return jax.random.randint(k, (n,), 0, DIGITS.num_classes, jnp.int32)

    data = ArrayData(images(k1, num_train), labels(k2, num_train), images(k3, num_test), labels(k4, num_test))
    return jax.block_until_ready(data)


def timing_schedule(
    steps: int, loop: str = "auto", steps_per_call: int | str = "auto", eval_batch: int = BATCH
) -> Schedule:
    """One epoch of `steps` train steps with every measurement off: `train_time` is train steps alone."""
    return schedule(
        epochs=1,
        eval_every=0,
        log_every=steps,
        eval_batch_size=eval_batch,
        loop=loop,
        steps_per_call=steps_per_call,
        max_steps_per_epoch=steps,
        probe_multipliers=(),
        discrepancy=False,
        population_batches=1,
        discrepancy_train_subset=0,
        dead_units=False,
    )


def hparam_rows(k: int, offset: int = 0) -> list[dict]:
    """K distinct runs: seeds offset.., learning rates log-spaced in [0.01, 0.1]."""
    lrs = np.geomspace(0.01, 0.1, max(k, 2))
    return [{**from_config.hparams_row(DEFAULT), "lr": float(lrs[i]), "seed": offset + i} for i in range(k)]


def no_log(*_) -> None:
    pass


def round_robin(runs: dict[str, Callable[[], float]], repeats: int, report: bool = True) -> dict[str, list[float]]:
    """Repeat r of every run, then repeat r+1, ...: a change in machine load hits every run alike.
    Each run returns its own measured seconds; warm-up is the caller's job."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            seconds[name].append(run())
        if report:
            print(f"  round {r + 1}/{repeats} done, load {load()[0]:.2f}", flush=True)
    return seconds


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den within a round: robust to load drifting between rounds."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call of `fn`, its result waited for."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def write_json(path: str | Path | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


def quiet_logging() -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
