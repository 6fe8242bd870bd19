"""Where a number came from: git SHA, package versions, device, host."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("bnstudy", "jax", "jaxlib", "flax", "optax", "numpy", "tensorflow-datasets", "hydra-core", "wandb")


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The checkout's commit, with `-dirty` when it has uncommitted changes; None outside git."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
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


def provenance() -> dict:
    return {"git_sha": git_sha(), "packages": package_versions(), "device": device_info()}
