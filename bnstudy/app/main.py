"""The Hydra app's job, top to bottom: check the command line, parse the config, plan the runs, train
them pack by pack, print the table.

Started by the launcher bnstudy/train.py, which makes the process settings first.

python -m bnstudy.train [overrides]           # one job (a list in a packable key = a pack)
python -m bnstudy.train -m model.norm=a,b,c   # one job per value
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import jax
from omegaconf import DictConfig

from bnstudy.app import cli, config_tree, plan, provenance, sweep_dirs
from bnstudy.app import config as config_lib
from bnstudy.app import data as data_lib
from bnstudy.app import runs as runs_lib
from bnstudy.app.config import Config, ConfigError
from bnstudy.app.pack_run import train_pack
from bnstudy.app.signals import RunInterrupted, interrupts_as_exceptions
from bnstudy.app.sinks import WandbJob
from bnstudy.core import sharding
from bnstudy.core.engine import Setup
from bnstudy.core.from_config import (
    population_batches,  # noqa: F401  (re-exported)
    setup_from_config,
)
from bnstudy.core.from_config import schedule_from_config as schedule_from
from bnstudy.core.pack_size import resolve_pack_size
from bnstudy.core.trainer import PackTrainer
from bnstudy.perf.timing import TimeBreakdown, breakdown_line

log = logging.getLogger("bnstudy")

# An absolute path: works for `python -m bnstudy.train`, the console script and in-process calls alike,
# from a checkout or an installed wheel. `main` puts the schema's defaults and the chosen studies in
# Hydra's ConfigStore.
CONFIG_DIR = str(config_tree.config_dir())


def main() -> None:
    """`bnstudy-train`: group options checked first (exit 2), then Hydra; a signal ends it with one line."""
    provenance.set_command("bnstudy.train", sys.argv[1:])
    try:
        chosen = cli.check_group_choices(sys.argv[1:], Path(CONFIG_DIR))
    except ConfigError as e:
        cli.exit_bad_input(e)
    # Only the studies named: loading all of them would slow every start. A submitit job gets the
    # ConfigStore from this process.
    config_tree.register(studies=chosen.get(config_tree.EXPERIMENT_GROUP, []))
    sys.argv[1:] = cli.hydra_arguments(sys.argv[1:])
    try:
        with interrupts_as_exceptions():
            hydra_main()
    except RunInterrupted as e:
        cli.exit_interrupted(e)
    finally:
        sweep_dirs.remove_unused()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> None:
    run_from_hydra(raw)


def run_from_hydra(raw: DictConfig) -> list[dict]:
    """Parse and train; bad input exits non-zero with a one-paragraph message and writes nothing."""
    out_dir = None
    sweep_dirs.note()
    try:
        cfg = config_lib.parse(raw)
        out_dir = cfg.out_dir
        cli.check_paths(out_dir, cfg.compile_cache_dir)
        say_if_one_arm(cfg)
        return run_job(cfg)
    except (ConfigError, data_lib.DataUnavailableError) as e:
        cli.exit_bad_input(e)
    except runs_lib.WriteFailed as e:
        cli.exit_write_failed(e.error, e.folders, out_dir)
    except OSError as e:  # a run folder that could not be made or started (nothing to mark)
        cli.exit_write_failed(e, [], out_dir)


def unswept_axes() -> dict[str, str]:
    """The study's structural axes (`hydra.sweeper.params`) when this job runs without `-m`, which ignores
    them; {} in a sweep or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.MULTIRUN:
        return {}
    return {str(k): str(v) for k, v in (HydraConfig.get().sweeper.get("params") or {}).items()}


def say_if_one_arm(cfg: Config) -> None:
    """One line when a study's grid is run without `-m`: what this job trains, what it leaves out and the
    commands that train the whole grid."""
    axes = unswept_axes()
    if not axes:
        return
    this = ", ".join(f"{k}={value_or_group(cfg, k)}" for k in axes)
    left = "; ".join(f"{k} over {v}" for k, v in axes.items())
    study = cfg.study or "STUDY"
    log.warning(
        "without -m this job trains %s only, not the study's sweep of %s; the whole study: `bnstudy-study %s` "
        "(or the grid: `bnstudy-train -m experiment=%s ...`)",
        this,
        left,
        study,
        study,
    )


def value_or_group(cfg: Config, key: str) -> str:
    """The config's value of a swept key (`model.norm`); for a swept group (`model`), its `name`."""
    try:
        value = config_lib.get(cfg, key)
    except AttributeError:
        return "its default"
    return str(getattr(value, "name", value))


def run_job(cfg: Config) -> list[dict]:
    """Train every unfinished run of a validated config and print the table; returns the summaries of
    the runs it trained."""
    runs = config_lib.expand_pack(cfg)
    quiet_libraries()
    pending, skipped = plan.unfinished_runs(runs, cfg.train.rerun)
    summaries = train_pending(cfg, pending, skipped) if pending else []
    print_table(summaries, skipped)
    return summaries


def train_pending(cfg: Config, pending: list[Config], skipped: list[dict]) -> list[dict]:
    """Train the pending runs in packs on the configured devices; a run that another process locked or
    finished meanwhile gets a line in `skipped`."""
    with job_clock() as times:
        devices = min(resolve_devices(cfg), len(pending))  # no device left without a model of its own
        trainer = build_trainer(cfg, devices, times)
        pack_size = packed_size(cfg, len(pending), trainer, devices)
        d = cfg.dataset
        log.info(
            "%d run(s) to train of %s/%s norm=%s in packs of <=%d on %d %s device(s)",
            len(pending),
            d.name,
            cfg.model.name,
            cfg.model.norm,
            pack_size,
            devices,
            jax.default_backend(),
        )
        wandb_job = WandbJob(cfg.logger.wandb, sync_hint(cfg))
        summaries = []
        try:
            packs = plan.claimed_packs(pending, pack_size, cfg.train.rerun, skipped)
            for index, (claims, progress) in enumerate(packs):
                try:
                    summaries += train_pack(trainer, claims, pack_size, index, cfg, wandb_job, times, progress)
                finally:
                    for c in claims:
                        c.release()
        finally:
            wandb_job.close()  # its wandb process: finishes any run left open (a failed pack) and exits
        log.info("job %s", breakdown_line(times.snapshot()))
        return summaries


def print_table(summaries: list[dict], skipped: list[dict]) -> None:
    """One line per run: the trained ones, then the skipped ones; a finished run that did not learn says so."""
    for s in summaries:
        log.info(
            "%s: %s test/acc=%s examples/s=%.0f -> %s",
            s["name"],
            status_text(s),
            _fmt(s.get("test/acc")),
            s["examples_per_s"],
            s["path"],
        )
    for s in skipped:
        log.info("%s: %s test/acc=%s -> %s", s["name"], status_text(s), _fmt(s.get("test/acc")), s["path"])


def status_text(summary: dict) -> str:
    """The status, and `NOT TRAINED` for a run that finished without learning (summary.json's `trained: false`:
    its loss did not fall or its test accuracy is at chance); a diverged run says so already."""
    untrained = summary.get("trained") is False and summary["status"] != runs_lib.DIVERGED
    return summary["status"] + (" (NOT TRAINED: loss did not fall or accuracy at chance)" if untrained else "")


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


_job_ends: list[float] = []  # wall-clock end of each job this process ran


@contextmanager
def job_clock():
    """The job's TimeBreakdown. Its time starts at process creation, or where the previous job of this
    process (a -m sweep) ended."""
    times = TimeBreakdown(started_at=_job_ends[-1] if _job_ends else None)
    times.mark_startup_done()
    try:
        yield times
    finally:
        _job_ends.append(time.time())


def build_trainer(cfg: Config, devices: int, times: TimeBreakdown) -> PackTrainer:
    """The dataset loaded and checked against the config, and the trainer of its packs on `devices`."""
    mesh = sharding.pack_mesh(devices) if devices > 1 else None
    enable_compile_cache(cfg.compile_cache_dir)
    d = cfg.dataset
    with times.measure("data"):
        dataset = data_lib.load(d.name, d.data_dir, d.download, d.train_subset, d.test_subset, d.val_size)
    check_against_data(cfg, dataset)
    traced_dir = os.path.join(os.path.expanduser(cfg.compile_cache_dir), "traced") if cfg.compile_cache_dir else None
    return PackTrainer(
        build_program(cfg, dataset), dataset.arrays, schedule_from(cfg), mesh=mesh, traced_dir=traced_dir
    )


def packed_size(cfg: Config, num_runs: int, trainer: PackTrainer, devices: int) -> int:
    # Memory is measured on one device; a pack is padded to a multiple of the devices, as chunks are padded.
    pack_size = resolve_pack_size(cfg.train.pack_size, num_runs, trainer)
    if cfg.train.pack_size == "auto":  # what fits one device, on each device
        pack_size = min(pack_size * devices, num_runs)
    return sharding.multiple_of(pack_size, devices)


def resolve_devices(cfg: Config) -> int:
    try:
        return sharding.resolve_devices(cfg.train.devices)
    except ValueError as e:
        raise ConfigError(
            f"Invalid config: `train.devices` must be 'auto' or at most the local devices; {e}."
        ) from None


def build_program(cfg: Config, dataset: data_lib.Dataset) -> Setup:
    return setup_from_config(cfg, dataset.num_classes, dataset.mean, dataset.std, dataset.augment)


def check_against_data(cfg: Config, dataset: data_lib.Dataset) -> None:
    if cfg.train.batch_size > dataset.num_train:
        raise ConfigError(
            f"Invalid config: `train.batch_size` must be at most the training split size "
            f"({dataset.num_train} examples of {dataset.name}); got {cfg.train.batch_size}."
        )


def sync_hint(cfg: Config) -> str:
    return f"wandb sync {Path(cfg.out_dir) / (cfg.study or 'default')}/*/wandb/offline-run-*"


def quiet_libraries() -> None:
    # "Unable to initialize backend 'tpu'" and the like are expected on CPU-only machines.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    # orbax (and TFDS) log through absl, and Hydra's INFO root level let orbax print ~30 lines per checkpoint.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # matplotlib (imported by TFDS) logs 'generated new fontManager' at INFO on its first start.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def enable_compile_cache(cache_dir: str | None) -> None:
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        # Every program, however quick to compile: a job compiles dozens of small ones, which together
        # cost seconds of every run's start.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
