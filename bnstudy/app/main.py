"""The Hydra app: validate the config, load data, train each pack, write run folders and wandb runs.

Started by the launcher bnstudy/train.py, which makes the process settings first.

python -m bnstudy.train [overrides]           # one job (a list in a packable key = a pack)
python -m bnstudy.train -m model.norm=a,b,c   # one job per value
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import jax
from omegaconf import DictConfig

from bnstudy.analysis import stats
from bnstudy.analysis.convergence import steps_to_target
from bnstudy.app import checkpoints, config_tree
from bnstudy.app import config as config_lib
from bnstudy.app import data as data_lib
from bnstudy.app import runs as runs_lib
from bnstudy.app.config import Config, ConfigError
from bnstudy.app.provenance import provenance
from bnstudy.app.sinks import RunSinks, WandbJob, WandbRun
from bnstudy.core import sharding
from bnstudy.core.engine import HParams, Setup
from bnstudy.core.models import build_model
from bnstudy.core.pack_size import resolve_pack_size
from bnstudy.core.trainer import PackTrainer, Schedule, summarize_final
from bnstudy.perf.timing import TimeBreakdown, breakdown_line

log = logging.getLogger("bnstudy")

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


def quiet_libraries() -> None:
    # "Unable to initialize backend 'tpu'" and the like are expected on CPU-only machines.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    # orbax (and TFDS) log through absl, and Hydra's INFO root level let orbax print ~30 lines per checkpoint.
    logging.getLogger("absl").setLevel(logging.WARNING)


def enable_compile_cache(cache_dir: str | None) -> None:
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        # Every program, however quick to compile: a job compiles dozens of small ones (~0.1 s each on a
        # 2-core CPU), which together cost seconds of every run's start.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def build_program(cfg: Config, dataset: data_lib.Dataset) -> Setup:
    m = cfg.model
    model = build_model(
        m.name,
        norm=m.norm,
        num_classes=dataset.num_classes,
        dropout_placement=m.dropout.placement,
        bn_momentum=m.bn_momentum,
        bn_epsilon=m.bn_epsilon,
        width=m.width,
        norm_kind=m.norm_kind,
        norm_groups=m.norm_groups,
        bn_running_var=m.bn_running_var,
    )
    return Setup(
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


def population_batches(cfg: Config) -> int:
    """Batches for the population statistics: enough for `discrepancy.population_examples` examples when set,
    so that every batch size pools over the same number of examples; else `discrepancy.population_batches`."""
    d = cfg.discrepancy
    return -(-d.population_examples // cfg.train.batch_size) if d.population_examples else d.population_batches


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


def open_sinks(
    claim: runs_lib.Claim,
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


def learned(final: dict, folder: Path, num_classes: int) -> dict:
    """`trained` (bnstudy.analysis.stats.is_trained on the first and last logged train/loss and the final test/acc;
    false for a diverged run) and `gen_gap` (train_subset/acc - test/acc, both in inference mode; None
    without either). The losses are read back from the run's metrics.jsonl, which a resumed run continues."""
    if final["status"] == "diverged":
        return {"trained": False, "gen_gap": None}
    losses = [r["train/loss"] for r in runs_lib.read_jsonl(folder / "metrics.jsonl") if r.get("train/loss") is not None]
    first, last = (losses[0], losses[-1]) if losses else (None, None)
    trained = stats.is_trained(first, last, final.get("test/acc"), num_classes)
    train_acc, test_acc = final.get("train_subset/acc"), final.get("test/acc")
    gap = None if train_acc is None or test_acc is None else float(stats.gen_gap(train_acc, test_acc))
    return {"trained": bool(trained), "gen_gap": gap}


def checkpoint_due(cfg: Config, epoch: int) -> bool:
    """After epoch index `epoch`? Never after the last one: the finished result follows at once."""
    every = cfg.train.checkpoint_every
    return bool(every) and (epoch + 1) % every == 0 and epoch + 1 < cfg.train.epochs


class PackCheckpointer:
    """`on_epoch_end` hook of a pack: each model's slice of the state into its own run folder's checkpoint."""

    def __init__(self, cfg: Config, sinks: list[RunSinks], steps_per_epoch: int):
        self.cfg, self.sinks, self.steps_per_epoch = cfg, sinks, steps_per_epoch
        self.writers: list[checkpoints.Writer] = []
        self.seconds = 0.0

    def __call__(self, state, epoch: int) -> None:
        if not checkpoint_due(self.cfg, epoch):
            return
        t0 = time.perf_counter()
        for sink in self.sinks:  # the wandb id is in each summary before a checkpoint can resume the run
            sink.wandb_ready()
        host = jax.device_get(state)  # a copy: the next epoch donates the state's buffers
        with signals_deferred():  # a signal now waits for the checkpoint to be complete (milliseconds)
            self.writers = self.writers or [checkpoints.Writer(s.folder.path) for s in self.sinks]
            for k, (sink, writer) in enumerate(zip(self.sinks, self.writers)):
                done = epoch + 1
                writer.save(
                    checkpoints.model_slice(host, k),
                    checkpoints.Progress(done, done * self.steps_per_epoch, sink.folder.records),
                )
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def restored_pack(trainer: PackTrainer, hp: HParams, claims: list[runs_lib.Claim], pack_size: int):
    """The pack's state stacked from each claimed run's checkpoint (padding repeats the last run, as `hp` does)."""
    target = checkpoints.model_shape(jax.eval_shape(trainer.programs.init, hp))
    states = [checkpoints.restore(c.work_dir, target)[0] for c in claims]
    return checkpoints.stack(states + [states[-1]] * (pack_size - len(states)))


def train_pack(
    trainer: PackTrainer,
    claims: list[runs_lib.Claim],
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
    prov = provenance()
    with times.measure("logging"):
        sinks = [
            open_sinks(c, {"size": len(runs), "index": pack_index, "position": k}, prov, wandb_job, progress[k])
            for k, c in enumerate(claims)
        ]
    hp = HParams.stack([config_lib.hparams_row(r) for r in padded])
    saver = PackCheckpointer(cfg, sinks, trainer.steps_per_epoch)
    try:
        state = restored_pack(trainer, hp, claims, pack_size) if start_epoch else None
        # A model that diverged before the checkpoint logged its last record then: it stays silent.
        stopped = None if state is None else [bool(d) for d in jax.device_get(state.diverged)[: len(claims)]]
        pack_logger = PackLogger(sinks, times, stopped)
        result = trainer.train(
            hp, pack_logger, progress_factory(cfg), state=state, start_epoch=start_epoch, on_epoch_end=saver
        )
    except RunInterrupted as e:
        for s in sinks:
            s.finish({"status": runs_lib.INTERRUPTED, "error": f"interrupted by {e.name}"})
            e.folders.append(str(s.folder.path))
        raise
    except BaseException as e:
        for s in sinks:
            s.finish({"status": runs_lib.FAILED, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        saver.close()
    for bucket, key in (("compile", "compile_time"), ("train_steps", "train_time"), ("evaluation", "eval_time")):
        times.add(bucket, result.timings[key])
    times.add("checkpoints", saver.seconds)
    breakdown = times.snapshot()  # the process so far; the summaries' own writing is not in it
    summaries = []
    for sink, final, evaluations in zip(sinks, summarize_final(result), pack_logger.evaluations):
        if final["status"] == "diverged":
            final = {key: (None if key.startswith(RESULT_PREFIXES) else v) for key, v in final.items()}
        final |= learned(final, sink.folder.path, data_lib.NUM_CLASSES[cfg.dataset.name])
        summary = {
            **final,
            **convergence(evaluations, cfg.train.target_acc),
            "epochs": cfg.train.epochs,
            "steps": cfg.train.epochs * trainer.steps_per_epoch,
            "num_train": trainer.num_train,
            "num_val": 0 if trainer.data.val_labels is None else int(trainer.data.val_labels.shape[0]),
            "num_test": int(trainer.data.test_images.shape[0]),
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
    log.info("%s", breakdown_line(times.snapshot()))
    return summaries


# ------------------------------------------------------------------------------------ which runs to train


def unfinished_runs(runs: list[Config], rerun: bool) -> tuple[list[Config], list[dict]]:
    """Runs still to train, and a line for each run whose folder already holds its finished result."""
    todo, skipped = [], []
    for run in runs:
        status = None if rerun else runs_lib.finished_status(runs_lib.run_dir(run), runs_lib.config_hash(run))
        if status:
            skipped.append(skipped_row(run, status))
        else:
            todo.append(run)
    return todo, skipped


def skipped_row(run: Config, why: str) -> dict:
    folder = runs_lib.run_dir(run)
    try:
        summary = runs_lib.read_run_folder(folder)[1]
    except (OSError, ValueError):
        summary = {}
    line = {"name": runs_lib.run_name(run), "path": str(folder), "test/acc": summary.get("test/acc")}
    if why == "locked":
        line["status"] = "skipped: another process is training it"
    else:
        line["status"] = f"skipped: already {why} (train.rerun=true retrains)"
    log.info("%s: %s", line["name"], line["status"])
    return line


def resume_progress(run: Config, rerun: bool) -> checkpoints.Progress | None:
    """The checkpoint an unfinished run would resume from (None: it trains from the start). Under the run's
    lock this decides; before it, a hint for grouping runs into packs."""
    folder = runs_lib.run_dir(run)
    if rerun or not runs_lib.resumable(folder, runs_lib.config_hash(run)):
        return None
    try:
        return checkpoints.latest(folder)
    except Exception as e:  # an unreadable checkpoint: train from the start rather than stop the sweep
        log.warning("%s: checkpoint unreadable (%s: %s); training from the start", folder, type(e).__name__, e)
        return None


def start_epoch(progress: checkpoints.Progress | None) -> int:
    return progress.epoch if progress else 0


def claim_chunk(pending: list[Config], size: int, rerun: bool, skipped: list[dict]) -> list[runs_lib.Claim]:
    """Lock up to `size` runs from the front of `pending` (removing them); locked or meanwhile finished
    runs are skipped with a line."""
    claims = []
    while pending and len(claims) < size:
        c = runs_lib.claim(pending.pop(0), rerun=rerun)
        if c.skip:
            skipped.append(skipped_row(c.run, c.skip))
        else:
            claims.append(c)
    return claims


def sync_hint(cfg: Config) -> str:
    return f"wandb sync {Path(cfg.out_dir) / (cfg.study or 'default')}/*/wandb/offline-run-*"


def train_and_evaluate(cfg: Config) -> list[dict]:
    """Train every unfinished run of a validated config; returns the summaries of the runs it trained."""
    runs = config_lib.expand_pack(cfg)
    quiet_libraries()
    pending, skipped = unfinished_runs(runs, cfg.train.rerun)
    summaries = []
    if pending:
        summaries = train_pending(cfg, pending, skipped)
    for s in summaries:
        log.info(
            "%s: %s test/acc=%s examples/s=%.0f -> %s",
            s["name"],
            s["status"],
            _fmt(s.get("test/acc")),
            s["examples_per_s"],
            s["path"],
        )
    for s in skipped:
        log.info("%s: %s test/acc=%s -> %s", s["name"], s["status"], _fmt(s.get("test/acc")), s["path"])
    return summaries


def resolve_devices(cfg: Config) -> int:
    try:
        return sharding.resolve_devices(cfg.train.devices)
    except ValueError as e:
        raise ConfigError(
            f"Invalid config: `train.devices` must be 'auto' or at most the local devices; {e}."
        ) from None


def train_pending(cfg: Config, pending: list[Config], skipped: list[dict]) -> list[dict]:
    # A job's time starts at process creation, or where the previous job of this process (a -m sweep) ended.
    times = TimeBreakdown(started_at=_job_ends[-1] if _job_ends else None)
    times.mark_startup_done()
    try:
        return train_job(cfg, pending, skipped, times)
    finally:
        _job_ends.append(time.time())


_job_ends: list[float] = []  # wall-clock end of each job this process ran


def train_job(cfg: Config, pending: list[Config], skipped: list[dict], times: TimeBreakdown) -> list[dict]:
    devices = min(resolve_devices(cfg), len(pending))  # no device left without a model of its own
    mesh = sharding.pack_mesh(devices) if devices > 1 else None
    enable_compile_cache(cfg.compile_cache_dir)
    d = cfg.dataset
    with times.measure("data"):
        dataset = data_lib.load(d.name, d.data_dir, d.download, d.train_subset, d.test_subset, d.val_size)
    check_against_data(cfg, dataset)
    traced_dir = os.path.join(os.path.expanduser(cfg.compile_cache_dir), "traced") if cfg.compile_cache_dir else None
    trainer = PackTrainer(
        build_program(cfg, dataset), dataset.arrays, schedule_from(cfg), mesh=mesh, traced_dir=traced_dir
    )
    # Memory is measured on one device; a pack is padded to a multiple of the devices, as chunks are padded.
    pack_size = resolve_pack_size(cfg.train.pack_size, len(pending), trainer)
    if cfg.train.pack_size == "auto":  # what fits one device, on each device
        pack_size = min(pack_size * devices, len(pending))
    pack_size = sharding.multiple_of(pack_size, devices)
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
    rerun = cfg.train.rerun
    # A pack shares one start epoch: runs are grouped by the epoch of their checkpoint (0: none).
    groups: dict[int, list[Config]] = {}
    for run in pending:
        groups.setdefault(start_epoch(resume_progress(run, rerun)), []).append(run)
    summaries, index = [], 0
    try:
        while groups:
            epoch = next(iter(groups))
            claims = claim_chunk(groups[epoch], pack_size, rerun, skipped)
            if not groups[epoch]:
                del groups[epoch]
            progress = [resume_progress(c.run, rerun) if c.resume else None for c in claims]
            for c, p in zip(list(claims), progress):  # another process moved it on since: to its own group
                if start_epoch(p) != epoch:
                    c.release()
                    claims.remove(c)
                    groups.setdefault(start_epoch(p), []).append(c.run)
            progress = [p for p in progress if start_epoch(p) == epoch]
            if not claims:
                continue
            for c, p in zip(claims, progress):
                if p:
                    log.info("%s: resuming from its checkpoint after epoch %d", runs_lib.run_name(c.run), p.epoch)
            try:
                summaries += train_pack(trainer, claims, pack_size, index, cfg, wandb_job, times, progress)
            finally:
                for c in claims:
                    c.release()
            index += 1
    finally:
        wandb_job.close()  # its wandb process: finishes any run left open (a failed pack) and exits
    return summaries


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def check_out_dir(out_dir: str) -> None:
    """`out_dir` must be (or be creatable in) a writable folder; checked without creating anything."""
    path = Path(out_dir).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"Invalid config: `out_dir` must be a folder bnstudy can write run folders in; got {out_dir!r}, "
            f"but {existing} is a file, not a folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"Invalid config: `out_dir` must be a folder bnstudy can write run folders in; got {out_dir!r}, "
            f"but {existing} is not writable by this user. Choose another `out_dir=`."
        )


def run_from_hydra(raw: DictConfig) -> list[dict]:
    """Parse and train; bad input exits non-zero with a one-paragraph message and writes nothing."""
    try:
        cfg = config_lib.parse(raw)
        check_out_dir(cfg.out_dir)
        return train_and_evaluate(cfg)
    except (ConfigError, data_lib.DataUnavailableError) as e:
        print(f"bnstudy: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------- command line


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT arrived: the runs in progress are marked `interrupted`, the process exits 128+signal.
    A BaseException, so that no library's `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name
        self.folders: list[str] = []


_deferred = {"active": False, "signum": None}  # see signals_deferred


@contextmanager
def signals_deferred():
    """A signal arriving inside this block raises RunInterrupted only when the block is done (a checkpoint
    being written is completed first; it takes milliseconds)."""
    _deferred["active"] = True
    try:
        yield
    finally:
        _deferred["active"] = False
    signum, _deferred["signum"] = _deferred["signum"], None
    if signum is not None:
        raise RunInterrupted(signum)


@contextmanager
def interrupts_as_exceptions():
    """SIGTERM (what SLURM sends on timeout or preemption) and SIGINT (Ctrl-C) raise RunInterrupted once
    (deferred while a checkpoint is written); a second signal gets the default action (end now)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)
        if _deferred["active"]:
            _deferred["signum"] = signum
            return
        raise RunInterrupted(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def check_group_choices(overrides: list[str], config_dir: Path) -> dict[str, list[str]]:
    """`group=option` overrides (optimizer=rmsprop, experiment=placment) name an existing option; checked
    before Hydra composes, whose own error would exit 1, or for the optional experiment not at all.
    Returns the options chosen per group (a sweep's values too)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name != "hydra")
    groups.append(config_tree.EXPERIMENT_GROUP)
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except HydraException:
        return {}  # bad syntax: Hydra's own message says where
    chosen: dict[str, list[str]] = {}
    for o in parsed:
        if o.key_or_group not in groups or o.is_delete() or o.package is not None:
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        known = group_options(o.key_or_group, config_dir)
        for value in values:
            if str(value) not in known:
                what = "study" if o.key_or_group == "experiment" else "option"
                raise ConfigError(
                    f"Invalid config: `{o.key_or_group}` must be one of the known {what}s {known}; got {value!r}."
                )
            chosen.setdefault(o.key_or_group, []).append(str(value))
    return chosen


def group_options(group: str, config_dir: Path) -> list[str]:
    if group == "experiment":
        return known_studies()
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def known_studies() -> list[str]:
    """The study names `experiment=` accepts (bnstudy.app.config_tree knows where the study files live)."""
    return sorted(config_tree.study_files())


# An absolute path: works for `python -m bnstudy.train`, the console script and in-process calls alike,
# from a checkout or an installed wheel. `main` puts the schema's defaults and the chosen studies in
# Hydra's ConfigStore.
CONFIG_DIR = str(config_tree.config_dir())


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> None:
    run_from_hydra(raw)


def main() -> None:
    """`bnstudy-train`: group options checked first (exit 2), then Hydra; a signal ends it with one line."""
    try:
        chosen = check_group_choices(sys.argv[1:], Path(CONFIG_DIR))
    except ConfigError as e:
        print(f"bnstudy: {e}", file=sys.stderr)
        sys.exit(2)
    # Only the studies named: loading all of them is ~0.5 s of every start. A submitit job gets the
    # ConfigStore from this process.
    config_tree.register(studies=chosen.get(config_tree.EXPERIMENT_GROUP, []))
    try:
        with interrupts_as_exceptions():
            hydra_main()
    except RunInterrupted as e:
        marked = f"; marked interrupted: {', '.join(e.folders)}" if e.folders else ""
        print(f"bnstudy: stopped by {e.name}{marked}", file=sys.stderr)
        sys.exit(128 + e.signum)
