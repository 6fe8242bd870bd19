"""Where a number came from: the command that trained it, git SHA, the code fingerprint, package versions, device,
host."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import subprocess
from importlib import metadata
from pathlib import Path

COMMAND_ENV = "BNSTUDY_COMMAND"  # set by bnstudy-study for its training children: the user's command, not theirs
_command: list[str] = []  # the training command of this process, as the user typed it (set_command)

PACKAGES = ("bnstudy", "jax", "jaxlib", "flax", "optax", "numpy", "tensorflow-datasets", "hydra-core", "wandb")


# What a `-dirty` SHA speaks of: uncommitted changes to these decide a run's numbers. A study writes its own
# report and raw runs into results/ as it goes, which must not mark the runs after it as uncommitted code.
CODE_PATHS = ("bnstudy", "configs", "experiments", "pyproject.toml")


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """This checkout's commit, with `-dirty` when its code (CODE_PATHS) has uncommitted changes; None outside git."""
    return checkout_sha(Path(__file__).resolve().parents[2])


def checkout_sha(repo: Path) -> str | None:
    """The commit of the git checkout at `repo`, with `-dirty` when a tracked file under CODE_PATHS differs from
    it (results/, docs/ and tests/ do not count); None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info() -> dict:
    import jax

    from bnstudy.perf import allocator

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "host": platform.node(),
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc": allocator.applied(),  # bnstudy/allocator.py: what the app set before JAX started
    }


def set_command(program: str, arguments: list[str]) -> None:
    """Remember the command line as typed (`python -m bnstudy.train -m experiment=placement +preset=quick`)."""
    _command[:] = [shlex.join(["python", "-m", program, *arguments])]


def command() -> str | None:
    """The command that trained this process's runs: bnstudy-study's when it started them, else set_command's."""
    return os.environ.get(COMMAND_ENV) or (_command[0] if _command else None)


# The analysis modules a training run's numbers depend on (the `trained` rule and steps to a target in its
# summary); the rest of bnstudy/analysis only reads finished runs, so editing it changes no run.
TRAINING_ANALYSIS = ("trained.py", "convergence.py")
# Modules that run, resume, record or read studies but never enter a training program or a run's config: a change
# to them must not set a study's later runs apart from its earlier ones (tests/test_records.py checks the list).
ORCHESTRATION = (
    "bnstudy/app/study_runner.py",
    "bnstudy/app/landing.py",
    "bnstudy/app/provenance.py",
    "bnstudy/app/sweep_dirs.py",
    "bnstudy/app/download_checks.py",
    "bnstudy/records.py",
    "bnstudy/report.py",
    "bnstudy/study.py",
)


def fingerprinted_files() -> list[tuple[str, Path]]:
    """(name, path) of every file whose content decides a run's numbers: the package's Python source (less the
    report side of bnstudy/analysis and the ORCHESTRATION modules), configs/ and experiments/; named as in a
    checkout, so a wheel and a checkout of the same code agree. Not results/, docs/, tests/ or benchmarks/."""
    from bnstudy.app import config_tree

    package = Path(__file__).resolve().parents[1]
    files = [
        (f"bnstudy/{p.relative_to(package).as_posix()}", p)
        for p in package.rglob("*.py")
        if "__pycache__" not in p.parts
        and not (p.parent.name == "analysis" and p.parent.parent == package and p.name not in TRAINING_ANALYSIS)
        and p.parent.name not in ("configs", "experiments")
    ]
    for root, prefix in ((config_tree.config_dir(), "configs"), (config_tree.experiments_dir(), "experiments")):
        files += [(f"{prefix}/{p.relative_to(root).as_posix()}", p) for p in Path(root).rglob("*.yaml")]
    return sorted((name, path) for name, path in files if name not in ORCHESTRATION)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A short hash of what decides a run's numbers (`fingerprinted_files`): unlike the git SHA, it does not
    change when results/ or docs are committed, so one study's landing does not set the next study's runs
    apart; a change to numerics changes it."""
    digest = hashlib.sha256()
    for name, path in fingerprinted_files():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def provenance() -> dict:
    return {
        "git_sha": git_sha(),
        "code_fingerprint": code_fingerprint(),
        "packages": package_versions(),
        "device": device_info(),
        "command": command(),
    }
