"""The Hydra app: validate the config, load data, train each pack, write run folders and wandb runs.

    python -m bnstudy.train [overrides]           # one job (a list in a packable key = a pack)
    python -m bnstudy.train -m model.norm=a,b,c   # one job per value
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
import jax
from omegaconf import DictConfig

from bnstudy import config as config_lib
from bnstudy import config_tree
from bnstudy import data as data_lib
from bnstudy.config import Config, ConfigError
from bnstudy.engine import HParams, Program
from bnstudy.models import build_model
from bnstudy.pack_size import resolve_pack_size
from bnstudy.provenance import provenance
from bnstudy.sinks import RunFolder, RunSinks, WandbRun
from bnstudy.trainer import PackTrainer, Schedule, summarize_final

log = logging.getLogger("bnstudy")

# Metric families that a diverged run has no final value for (its weights are frozen pre-divergence).
RESULT_PREFIXES = ("train/", "test/", "train_subset/", "smooth/", "disc/", "bn/")


def quiet_jax() -> None:
    # "Unable to initialize backend 'tpu'" and the like are expected on CPU-only machines.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def enable_compile_cache(cache_dir: str | None) -> None:
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_program(cfg: Config, dataset: data_lib.Dataset) -> Program:
    m = cfg.model
    model = build_model(
        m.name,
        norm=m.norm,
        num_classes=dataset.num_classes,
        dropout_placement=m.dropout.placement,
        bn_momentum=m.bn_momentum,
        bn_epsilon=m.bn_epsilon,
        width=m.width,
    )
    return Program(
        model=model,
        optimizer=cfg.optimizer.name,
        momentum=cfg.optimizer.momentum,
        batch_size=cfg.train.batch_size,
        input_mean=dataset.mean,
        input_std=dataset.std,
        augment=dataset.augment,
    )


def schedule_from(cfg: Config) -> Schedule:
    t = cfg.train
    return Schedule(
        epochs=t.epochs,
        eval_every=t.eval_every,
        log_every=t.log_every,
        eval_batch_size=t.eval_batch_size,
        loop=t.loop,
        max_steps_per_epoch=t.max_steps_per_epoch,
        probe_every=cfg.probe.every,
        probe_multipliers=tuple(cfg.probe.step_multipliers),
        discrepancy=cfg.discrepancy.enabled,
        population_batches=cfg.discrepancy.population_batches,
        discrepancy_train_subset=cfg.discrepancy.train_subset,
    )


def check_against_data(cfg: Config, dataset: data_lib.Dataset) -> None:
    if cfg.train.batch_size > dataset.num_train:
        raise ConfigError(
            f"Invalid config: `train.batch_size` must be at most the training split size "
            f"({dataset.num_train} examples of {dataset.name}); got {cfg.train.batch_size}."
        )


def group_name(cfg: Config) -> str:
    return cfg.logger.wandb.group or cfg.study or "default"


def progress_factory(cfg: Config):
    if not cfg.logger.progress:
        return None
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in CI logs or files.
    return lambda total, desc: tqdm(total=total, desc=desc, disable=None, leave=False, dynamic_ncols=True)


def open_sinks(run: Config, pack_info: dict, prov: dict) -> RunSinks:
    rid = config_lib.run_id(run)
    folder_path = Path(run.out_dir) / (run.study or "default") / rid
    resolved = config_lib.to_dict(run)
    summary = {
        "run_id": rid,
        "name": config_lib.run_name(run),
        "config_hash": config_lib.config_hash(run),
        "study": run.study,
        "pack": pack_info,
        "path": str(folder_path),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **prov,
    }
    folder = RunFolder(folder_path, resolved, summary)
    wandb_run = WandbRun(run.logger.wandb, folder.path, config_lib.run_name(run), group_name(run), resolved)
    return RunSinks(folder, wandb_run)


class PackLogger:
    """Splits the trainer's [K]-array logs into per-model records, silencing a model once it diverged."""

    def __init__(self, sinks: list[RunSinks]):
        self.sinks = sinks
        self.stopped = [False] * len(sinks)

    def __call__(self, step: int, epoch: float, metrics: dict) -> None:
        diverged = metrics.pop("train/diverged", None)
        for k, sink in enumerate(self.sinks):
            if self.stopped[k]:
                continue
            sink.log(step, {"epoch": epoch, **{key: value[k] for key, value in metrics.items()}})
            if diverged is not None and diverged[k] > 0:
                self.stopped[k] = True


def train_pack(trainer: PackTrainer, runs: list[Config], pack_size: int, pack_index: int, cfg: Config) -> list[dict]:
    """Train one chunk of runs as one vmapped program (padded to `pack_size` to reuse the compilation)."""
    padded = runs + [runs[-1]] * (pack_size - len(runs))
    prov = provenance()
    sinks = [open_sinks(r, {"size": len(runs), "index": pack_index, "position": k}, prov) for k, r in enumerate(runs)]
    hp = HParams.stack([config_lib.hparams_row(r) for r in padded])
    try:
        result = trainer.train(hp, PackLogger(sinks), progress_factory(cfg))
    except BaseException as e:
        for s in sinks:
            s.finish({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    summaries = []
    for sink, final in zip(sinks, summarize_final(result)):
        if final["status"] == "diverged":
            final = {key: (None if key.startswith(RESULT_PREFIXES) else v) for key, v in final.items()}
        summary = {
            **final,
            "epochs": cfg.train.epochs,
            "steps": cfg.train.epochs * trainer.steps_per_epoch,
            "num_train": trainer.num_train,
            "num_test": int(trainer.data.test_images.shape[0]),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **result.timings,
            "pack_examples_per_s": result.timings["examples_per_s"] * len(padded),
        }
        sink.finish(summary)
        summaries.append(sink.folder.summary)
    return summaries


def train_and_evaluate(cfg: Config) -> list[dict]:
    """Train every run of a validated config; returns each run's summary."""
    runs = config_lib.expand_pack(cfg)
    quiet_jax()
    enable_compile_cache(cfg.compile_cache_dir)
    d = cfg.dataset
    dataset = data_lib.load(d.name, d.data_dir, d.download, d.train_subset, d.test_subset)
    check_against_data(cfg, dataset)
    trainer = PackTrainer(build_program(cfg, dataset), dataset.arrays, schedule_from(cfg))
    pack_size = resolve_pack_size(cfg.train.pack_size, len(runs), trainer)
    chunks = [runs[i : i + pack_size] for i in range(0, len(runs), pack_size)]
    log.info(
        "%d run(s) of %s/%s norm=%s in %d pack(s) of <=%d on %s",
        len(runs), d.name, cfg.model.name, cfg.model.norm, len(chunks), pack_size, jax.default_backend(),
    )
    summaries = []
    for i, chunk in enumerate(chunks):
        summaries += train_pack(trainer, chunk, pack_size, i, cfg)
    for s in summaries:
        log.info(
            "%s: %s test/acc=%s examples/s=%.0f -> %s",
            s["name"], s["status"], _fmt(s.get("test/acc")), s["examples_per_s"], s["path"],
        )
    return summaries


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def run_from_hydra(raw: DictConfig) -> list[dict]:
    """Parse and train; bad input exits non-zero with a one-paragraph message and writes nothing."""
    try:
        cfg = config_lib.parse(raw)
        return train_and_evaluate(cfg)
    except (ConfigError, data_lib.DataUnavailableError) as e:
        print(f"bnstudy: {e}", file=sys.stderr)
        sys.exit(2)


# An absolute path: works for `python -m bnstudy.train`, the console script and in-process calls alike,
# from a checkout or an installed wheel. The schema's defaults and the studies go to Hydra's ConfigStore.
CONFIG_DIR = str(config_tree.config_dir())
config_tree.register()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    run_from_hydra(raw)


if __name__ == "__main__":
    main()
