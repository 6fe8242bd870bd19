"""`bnstudy-study STUDY [overrides]`: one resumable command per study. It trains the study's plan, then what the
analysis asks for next (an arm's grid extended past an edge, the seeds of the next sequential look), round after
round until nothing is pending, and writes the report.

Every round trains through the real app in a subprocess (`python -m bnstudy.train -m experiment=STUDY ...`), so a
finished run is skipped and an interrupted one resumes: re-running the same command continues where it stopped.
An extension trains only its arm: the arm's keys and the new value are overrides after the study's own, and a
command-line value of a key in `hydra.sweeper.params` replaces that sweep. A SIGTERM or SIGINT is passed on to the
training in progress, which marks its runs interrupted; the command then exits 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnstudy.app import config_tree, landing, provenance
from bnstudy.schema import PACKABLE

PROG = "bnstudy-study"
BAD_INPUT = 2  # the train app's exit status for bad input (bnstudy.app.cli.EXIT_BAD_INPUT)
MAX_ROUNDS = 100  # each round moves an edge or adds a look; a study needs a handful


class StudyError(Exception):
    """Bad input or a round that could not make progress: one line, then exit `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Interrupted(BaseException):
    """SIGTERM or SIGINT: the training in progress has stopped; exit 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class Study:
    """The study as the command line sets it: its name, the user's overrides, where its runs go, its dataset."""

    name: str
    overrides: list[str]
    out_dir: Path
    dataset: str
    out: Path | None = None  # report folder (None: bnstudy-report's default)
    wandb_mode: str = "offline"  # the report's wandb run: logger.wandb.mode of the training runs

    @property
    def runs_dir(self) -> Path:
        return self.out_dir / self.name

    def command(self) -> str:
        """This study's command as typed: what its runs record as the command that trained them."""
        out = ["--out", str(self.out)] if self.out else []
        return shlex.join(["python", "-m", "bnstudy.study", self.name, *out, *self.overrides])


@dataclass
class Round:
    """What one round trains (override lists, each one training job) and why, in one line."""

    why: str
    jobs: list[list[str]] = field(default_factory=list)

    def key(self) -> tuple:
        return tuple(map(tuple, self.jobs))


# ------------------------------------------------------------------------------------------- the command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a study until its edges are searched and its looks decided, then write its report.",
    )
    p.add_argument("study", help="study name, e.g. placement (experiments/<study>.yaml)")
    p.add_argument(
        "--out",
        type=Path,
        help="report folder (default: as bnstudy-report's); the runs kept there (runs.jsonl.gz) are restored "
        "before training, so a study landed in results/ continues from a fresh clone",
    )
    p.add_argument(
        "--allow-mixed-fingerprints",
        action="store_true",
        help="train and report on top of runs of another code fingerprint (refused by default)",
    )
    p.add_argument("-m", "--multirun", action="store_true", help="accepted and implied: every round is a sweep")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every round, e.g. +preset=quick")
    return p.parse_intermixed_args(argv)


def compose_settings(study: str, overrides: list[str]) -> tuple[Path, str, str]:
    """(out_dir, dataset name, logger.wandb.mode) of the study under these overrides, from Hydra's compose; a
    sweep's first value stands for it (a sweep of the dataset is refused: each dataset is its own report)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bnstudy.app import cli  # the train app's checks and messages (imports the training stack)

    cli.check_group_choices(overrides, config_tree.config_dir())  # unknown keys and options: ConfigError
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise StudyError(f"bad override: {e}".splitlines()[0]) from None
    plain = []
    for text, o in zip(overrides, parsed):
        if o.is_sweep_override():
            if o.key_or_group == "dataset":
                raise StudyError(f"{text}: one dataset per command (each dataset is its own report)")
            text = f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        plain.append(text)
    config_tree.register(studies=[study])
    try:
        with initialize_config_dir(config_dir=str(config_tree.config_dir()), version_base="1.3"):
            overrides = [f"experiment={study}", *plain]
            axes = compose("config", overrides=overrides, return_hydra_config=True).hydra.sweeper.params or {}
            given = {o.key_or_group for o in parsed}
            # The study's structural axes are set in every job it trains; checked without them, a value that
            # needs one (a dropout rate needs a placement) would read as invalid.
            first_values = [first_value(str(k), str(v)) for k, v in axes.items() if str(k) not in given]
            cfg = compose("config", overrides=[*overrides, *first_values])
    except (HydraException, OmegaConfBaseException) as e:
        raise StudyError(str(e).splitlines()[0]) from None
    check_values(cfg)
    return Path(str(cfg.out_dir)), str(cfg.dataset.name), str(cfg.logger.wandb.mode)


def first_value(key: str, sweep: str) -> str:
    """`key=v` for the first value `v` of a sweep written as Hydra's override grammar (`a,b`, `choice(a,b)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (o,) = OverridesParser.create().parse_overrides([f"{key}={sweep}"])
    return f"{key}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else f"{key}={sweep}"


def check_values(cfg) -> None:
    """The composed config's values and out_dir, checked as the train app checks them (ConfigError)."""
    from bnstudy.app import cli
    from bnstudy.app import config as config_lib

    parsed = config_lib.parse(cfg)
    cli.check_paths(parsed.out_dir, parsed.compile_cache_dir)


def study_from(args: argparse.Namespace) -> Study:
    known = config_tree.known_studies()
    if args.study not in known:
        raise StudyError(f"unknown study {args.study!r} (known: {', '.join(known)})")
    out_dir, dataset, wandb_mode = compose_settings(args.study, args.overrides)
    return Study(args.study, list(args.overrides), out_dir, dataset, args.out, wandb_mode)


# ------------------------------------------------------------------------------------------- what to train next


def value_text(value) -> str:
    """A config value as Hydra's override grammar reads it back."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


def override(key: str, value) -> str:
    """`key=value`; a packable key as a one-value list (`optimizer.lr=[0.3]`), which trains that value only."""
    if isinstance(value, float) and value.is_integer() and key not in PACKABLE:
        value = int(value)  # a run frame's column with a gap reads as float: train.batch_size=128, not 128.0
    return f"{key}=[{value_text(value)}]" if key in PACKABLE else f"{key}={value_text(value)}"


def seed_list(seeds) -> str:
    return f"seed=[{','.join(str(int(s)) for s in sorted(seeds))}]"


def matching(frame, filters: dict):
    """The rows of `frame` at the arm's setting (numbers compared with a tolerance)."""
    mask = np.ones(len(frame), bool)
    for key, value in filters.items():
        column = frame[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            mask &= np.isclose(column.astype(float), float(value))
        else:
            mask &= column.astype(str).eq(str(value)).to_numpy()
    return frame[mask]


def arm_seeds(analysis, filters: dict) -> list[str]:
    """`seed=[...]` of an extension: the selection seeds in a study with two phases; otherwise the seeds the
    arm's runs were trained with (whatever their outcome), or none when it has none (the study's own seeds)."""
    if analysis.phases is not None:
        return [seed_list(analysis.phases.seeds)]
    seeds = {int(s) for s in matching(analysis.runs, filters)["seed"].dropna()}
    return [seed_list(seeds)] if seeds else []


def merged(jobs: list[list[str]]) -> list[list[str]]:
    """Jobs that differ only in one structural key's value, as one Hydra sweep over it (`model.norm=a,b`):
    one training process instead of one per value."""
    split = [[o.split("=", 1) for o in job] for job in jobs]
    if len(jobs) < 2 or len({tuple(k for k, _ in job) for job in split}) != 1:
        return jobs
    for i, (key, _) in enumerate(split[0]):
        if key in PACKABLE or key == "seed":
            continue
        rest = {tuple(o for j, o in enumerate(job) if j != i) for job in jobs}
        if len(rest) == 1:
            values = ",".join(dict.fromkeys(job[i][1] for job in split))
            return [[*jobs[0][:i], f"{key}={values}", *jobs[0][i + 1 :]]]
    return jobs


def extension_round(analysis, extensions: list[dict]) -> Round:
    jobs, parts = [], []
    for ext in extensions:
        arm = ext["filters"]
        jobs.append([*(override(k, v) for k, v in arm.items()), override(ext["axis"], ext["value"])])
        jobs[-1] += arm_seeds(analysis, arm)
        where = ", ".join(f"{k}={v}" for k, v in arm.items()) or "the study"
        parts.append(f"{where} at {ext['axis']}={ext['value']} (its selection sits at the {ext['edge']} edge)")
    return Round("extend " + "; ".join(parts), merged(jobs))


def seed_round(pending: dict, why: str | None = None) -> Round:
    """One job per setting that lacks seeds; settings that differ only in a packable key and lack the same
    seeds share a job when together they make a full grid of that key (one compiled pack)."""
    batches: dict[tuple, list[dict]] = {}
    for group in pending["groups"]:
        fixed = tuple((k, v) for k, v in group["filters"].items() if k not in PACKABLE)
        batches.setdefault((fixed, tuple(group["missing"])), []).append(group["filters"])
    jobs = []
    for (fixed, missing), settings in batches.items():
        packed = [{k: v for k, v in s.items() if k in PACKABLE} for s in settings]
        keys = sorted(packed[0])
        values = {k: sorted({p[k] for p in packed}) for k in keys}
        full_grid = all(sorted(p) == keys for p in packed) and len(packed) == int(
            np.prod([len(v) for v in values.values()])
        )
        head = [override(k, v) for k, v in fixed]
        if full_grid:
            lists = [f"{k}=[{','.join(value_text(v) for v in values[k])}]" for k in keys]
            jobs.append([*head, *lists, seed_list(missing)])
        else:
            jobs += [[*head, *(override(k, v) for k, v in p.items()), seed_list(missing)] for p in packed]
    if why is None:
        n = pending["seeds"]
        what = "confirmation seeds" if pending.get("confirmation") else "seeds"
        why = f"{what} for {len(pending['groups'])} setting(s): the next look of the open comparisons needs {n}"
    return Round(why, merged(jobs))


def next_round(analysis) -> Round | None:
    """The selection phase first, to its end (a searched setting's missing selection seeds, then the extensions
    past an edge: they change which setting each arm confirms), then the next look's seeds; None when done."""
    from bnstudy.analysis.edges import pending_extensions
    from bnstudy.analysis.looks import pending_seeds

    phases = analysis.phases
    if phases is not None and phases.missing:
        why = f"selection seeds {phases.seeds} for {len(phases.missing)} searched setting(s) that lack some"
        return seed_round({"groups": phases.missing}, why)
    extensions = pending_extensions(analysis)
    if extensions:
        return extension_round(analysis, extensions)
    pending = pending_seeds(analysis)
    if pending and phases is not None:
        pending["confirmation"] = True
    return seed_round(pending) if pending else None


def load_analysis(study: Study):
    from bnstudy.analysis.analyse import analyse
    from bnstudy.analysis.errors import ReportError
    from bnstudy.analysis.load import load_local

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report prints them once, at the end
        try:
            return analyse(study.name, load_local(study.runs_dir), study.dataset)
        except ReportError as e:
            raise StudyError(f"the runs in {study.runs_dir} cannot be analysed: {e}", code=1) from None


# ------------------------------------------------------------------------------------------- training, rounds


class Trainer:
    """Runs the training app in a child process; each SIGTERM or SIGINT is passed on to it once and, when it has
    stopped, ends the study (`Interrupted`).

    While a child is being started or trained the signal handler only records the signal, and the waiting loop
    passes it on: a signal that lands between the fork and `Popen` returning would otherwise find no child to
    pass it to, end the runner, and leave the training running unsignalled (holding the runner's output open)."""

    POLL_S = 0.1  # how soon a recorded signal reaches the child

    def __init__(self, study: Study):
        self.study, self.training, self.received = study, False, []

    def command(self, extra: list[str]) -> list[str]:
        base = [sys.executable, "-m", "bnstudy.train", "-m", f"experiment={self.study.name}"]
        return [*base, *self.study.overrides, *extra]

    def handle(self, signum, frame) -> None:
        self.received.append(signum)  # atomic: the waiting loop reads it
        if not self.training:
            raise Interrupted(signum)

    def train(self, extra: list[str]) -> None:
        if self.received:
            raise Interrupted(self.received[0])
        # Its own session: a Ctrl-C reaches the child only through the runner, once (a second one ends it at once).
        env = {**os.environ, provenance.COMMAND_ENV: self.study.command()}  # what the runs record as their command
        self.training = True
        try:
            rc = self.wait(subprocess.Popen(self.command(extra), start_new_session=True, env=env))
        finally:
            self.training = False
        if self.received:
            raise Interrupted(self.received[0])
        if rc == BAD_INPUT:  # its one paragraph said what was wrong; re-running the same command would not help
            raise StudyError("", code=rc)
        if rc != 0:
            raise StudyError(f"training exited with status {rc}; re-run the same command to continue", code=rc)

    def wait(self, child: subprocess.Popen) -> int:
        """The child's exit status, passing on each recorded signal once while it runs."""
        passed_on = 0
        while True:
            while passed_on < len(self.received):
                child.send_signal(self.received[passed_on])  # a no-op once the child has been reaped
                passed_on += 1
            try:
                return child.wait(timeout=self.POLL_S)
            except subprocess.TimeoutExpired:
                pass


def run_rounds(study: Study, trainer: Trainer) -> int:
    """Train the plan, then every pending round; returns the number of rounds."""
    print(f"{PROG} {study.name} round 1: the study's plan ({study.dataset}, runs in {study.runs_dir})", flush=True)
    trainer.train([])
    landing.keep_raw_runs(study.out, study.runs_dir)
    done: set[tuple] = set()
    for number in range(2, MAX_ROUNDS + 1):
        todo = next_round(load_analysis(study))
        if todo is None:
            return number - 1
        if todo.key() in done:
            raise StudyError(f"round {number} would train again what a past round trained: {todo.why}", code=1)
        done.add(todo.key())
        # A command is one `bnstudy.train -m` sweep: Hydra may launch several jobs from it (one per structural value).
        print(f"{PROG} {study.name} round {number}: {todo.why} ({len(todo.jobs)} training command(s))", flush=True)
        for job in todo.jobs:
            trainer.train(job)
        landing.keep_raw_runs(study.out, study.runs_dir)
    raise StudyError(f"still pending after {MAX_ROUNDS} rounds", code=1)


def write_report(study: Study, allow_mixed: bool = False) -> None:
    from bnstudy.analysis import cli as report_cli

    argv = [study.name, "--out-dir", str(study.out_dir), "--dataset", study.dataset, "--wandb-mode", study.wandb_mode]
    argv += ["--out", str(study.out)] if study.out else []
    report_cli.main(argv + (["--allow-mixed-fingerprints"] if allow_mixed else []))


def land(study: Study, allow_mixed: bool) -> None:
    """Before round 1: the runs kept in the report folder restored, and their code fingerprint checked."""
    restored = landing.restore(study.out, study.runs_dir)
    if restored:
        print(f"{PROG} {study.name}: restored {restored} finished run(s) from {study.out}", flush=True)
    problem = landing.fingerprint_problem(study.runs_dir)
    if problem and not allow_mixed:
        raise StudyError(problem)


def bad_input_as_the_train_app(function, *args):
    """`function(*args)`; a ConfigError (bad key, option or value) exits 2 with the train app's own paragraph."""
    from bnstudy.app.config import ConfigError

    try:
        return function(*args)
    except ConfigError as e:
        from bnstudy.app import cli

        cli.exit_bad_input(e)


def main(argv: list[str] | None = None) -> None:
    """`bnstudy-study`: bad input exits 2 before any compute; a signal exits 128 + its number."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        study = bad_input_as_the_train_app(study_from, args)
        land(study, args.allow_mixed_fingerprints)
        trainer = Trainer(study)
        previous = {s: signal.signal(s, trainer.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        started = time.monotonic()
        try:
            rounds = run_rounds(study, trainer)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            landing.add_training_time(study.out, time.monotonic() - started)
        print(f"{PROG} {study.name}: nothing pending after {rounds} round(s); writing the report", flush=True)
        write_report(study, args.allow_mixed_fingerprints)
    except StudyError as e:
        if str(e):
            print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(e.code)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        print(f"{PROG}: stopped by {name}; re-run the same command to continue", file=sys.stderr)
        sys.exit(128 + e.signum)
