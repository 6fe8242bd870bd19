"""Training one pack: its runs' sinks opened, the vmapped program trained, each run's summary written."""

from __future__ import annotations

import logging
import time

import jax

from bnstudy.app import checkpoints
from bnstudy.app import claims as claims_lib
from bnstudy.app import config as config_lib
from bnstudy.app import data as data_lib
from bnstudy.app import runs as runs_lib
from bnstudy.app.cli import os_error_in
from bnstudy.app.config import Config
from bnstudy.app.pack_checkpoints import DamagedCheckpoints, PackCheckpointer, restored_pack
from bnstudy.app.pack_log import PackLogger, convergence, learned, without_results_if_diverged
from bnstudy.app.provenance import provenance
from bnstudy.app.signals import RunInterrupted
from bnstudy.app.sinks import RunSinks, WandbJob, WandbRun
from bnstudy.core.engine import HParams
from bnstudy.core.trainer import PackTrainer, summarize_final
from bnstudy.perf.timing import TimeBreakdown, breakdown_line

log = logging.getLogger("bnstudy")


def train_pack(
    trainer: PackTrainer,
    claims: list[claims_lib.Claim],
    pack_size: int,
    pack_index: int,
    cfg: Config,
    wandb_job: WandbJob,
    times: TimeBreakdown,
    progress: list[checkpoints.Progress | None] | None = None,
) -> list[dict]:
    """Train one chunk of runs as one vmapped program (padded to `pack_size` to reuse the compilation);
    with `progress` (every run's checkpoint, all of one epoch), continue them from their checkpoints."""
    runs = [c.run for c in claims]
    progress = progress or [None] * len(claims)
    start_epoch = progress[0].epoch if progress[0] else 0
    padded = runs + [runs[-1]] * (pack_size - len(runs))
    hp = HParams.stack([config_lib.hparams_row(r) for r in padded])
    try:
        state = restored_pack(trainer, hp, claims, pack_size) if start_epoch else None
    except DamagedCheckpoints as e:
        args = (trainer, pack_size, pack_index, cfg, wandb_job, times)
        return train_without_damaged(claims, progress, e.damaged, *args)
    prov = provenance()
    with times.measure("logging"):
        sinks = [
            open_sinks(c, {"size": len(runs), "index": pack_index, "position": k}, prov, wandb_job, progress[k])
            for k, c in enumerate(claims)
        ]
    saver = PackCheckpointer(cfg, sinks, trainer.steps_per_epoch)
    try:
        # A model that diverged before the checkpoint logged its last record then: it stays silent.
        stopped = None if state is None else [bool(d) for d in jax.device_get(state.diverged)[: len(claims)]]
        pack_logger = PackLogger(sinks, times, stopped)
        result = trainer.train(
            hp, pack_logger, progress_factory(cfg), state=state, start_epoch=start_epoch, on_epoch_end=saver
        )
    except RunInterrupted as e:
        e.folders += mark(sinks, {"status": runs_lib.INTERRUPTED, "error": f"interrupted by {e.name}"})
        raise
    except BaseException as e:
        failed = mark(sinks, {"status": runs_lib.FAILED, "error": f"{type(e).__name__}: {e}"})
        write_error = os_error_in(e)
        if write_error is None:
            raise
        raise runs_lib.WriteFailed(write_error, failed) from None
    finally:
        saver.close()
    for bucket, key in (("compile", "compile_time"), ("train_steps", "train_time"), ("evaluation", "eval_time")):
        times.add(bucket, result.timings[key])
    times.add("checkpoints", saver.seconds)
    breakdown = times.snapshot()  # the process so far; the summaries' own writing is not in it
    pack_facts = {
        "epochs": cfg.train.epochs,
        "steps": cfg.train.epochs * trainer.steps_per_epoch,
        "epochs_trained": result.epochs_trained,  # fewer than `epochs` when every run of the pack diverged
        "lr_schedule": trainer.setup.lr_schedule.describe(),  # its shape; the peak is optimizer.lr
        "num_train": trainer.num_train,
        "num_val": 0 if trainer.data.val_labels is None else int(trainer.data.val_labels.shape[0]),
        "num_test": int(trainer.data.test_images.shape[0]),
    }
    summaries = []
    for sink, final, evaluations in zip(sinks, summarize_final(result), pack_logger.evaluations):
        final = without_results_if_diverged(final)
        final |= learned(final, sink.folder.path, data_lib.NUM_CLASSES[cfg.dataset.name])
        summary = {
            **final,
            **convergence(evaluations, cfg.train.target_acc),
            **pack_facts,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **result.timings,
            "pack_examples_per_s": result.timings["examples_per_s"] * len(padded),
            "checkpoint_time": saver.seconds,
            "time_breakdown": breakdown,
        }
        checkpoints.remove(sink.folder.path)  # finished: nothing will resume from it
        with times.measure("logging"):
            sink.finish(summary)
        summaries.append(sink.folder.summary)
    log.debug("%s", breakdown_line(times.snapshot()))  # so far; the job prints its own once, at its end
    return summaries


def train_without_damaged(claims, progress, damaged: dict[int, str], *args) -> list[dict]:
    """The runs whose checkpoints restore resume as a pack; the damaged ones, their checkpoints dropped, train
    from the start in a pack of their own (the rest of the sweep goes on)."""
    for k, why in damaged.items():
        log.warning("%s: checkpoint unreadable (%s); training it from the start", claims[k].work_dir, why)
        checkpoints.remove(claims[k].work_dir)
    whole = [k for k in range(len(claims)) if k not in damaged]
    summaries = (
        train_pack(args[0], [claims[k] for k in whole], *args[1:], [progress[k] for k in whole]) if whole else []
    )
    return summaries + train_pack(args[0], [claims[k] for k in damaged], *args[1:])


def mark(sinks: list[RunSinks], fields: dict) -> list[str]:
    """Each run's final summary with `fields`; returns the folders marked. A folder whose summary cannot be
    written (a full disk) keeps its last one, `running` (a reader sees it as stale once this process ends)."""
    marked = []
    for s in sinks:
        try:
            s.finish(fields)
        except OSError:
            continue
        marked.append(str(s.folder.path))
    return marked


def open_sinks(
    claim: claims_lib.Claim,
    pack_info: dict,
    prov: dict,
    wandb_job: WandbJob,
    progress: checkpoints.Progress | None = None,
) -> RunSinks:
    """The run folder and wandb run of one claimed run: new ones, or the interrupted ones reopened at
    `progress` (metrics.jsonl cut back to the checkpoint, the same wandb id)."""
    run = claim.run
    resolved = config_lib.to_dict(run)
    note = data_lib.data_note(run.dataset.name)
    summary = {
        "run_id": runs_lib.run_id(run),
        "name": runs_lib.run_name(run),
        "config_hash": runs_lib.config_hash(run),
        "study": run.study,
        "data": {"dataset": run.dataset.name, **({"note": note} if note else {})},
        "pack": pack_info,
        "path": str(claim.final),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **prov,
    }
    resume = None
    if progress is not None:
        summary["resumed_at"] = summary.pop("started_at")  # the first attempt's started_at stays
        summary["resumed_from_epoch"] = progress.epoch
        resume = (progress.step, progress.metrics_records)
    folder = runs_lib.RunFolder(claim.work_dir, resolved, summary, final=claim.final, resume=resume)
    notes = f"dataset {run.dataset.name}: {note}" if note else f"dataset {run.dataset.name}"
    resume_id = folder.summary.get("wandb_id") if progress is not None else None
    wandb_run = WandbRun(
        wandb_job, folder.path, runs_lib.run_name(run), group_name(run), resolved, notes=notes, resume_id=resume_id
    )
    return RunSinks(folder, wandb_run)  # its wandb run opens in the wandb process, while the pack compiles


def group_name(cfg: Config) -> str:
    return cfg.logger.wandb.group or cfg.study or "default"


def progress_factory(cfg: Config):
    if not cfg.logger.progress:
        return None
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in CI logs or files.
    return lambda total, desc: tqdm(total=total, desc=desc, disable=None, leave=False, dynamic_ncols=True)
