"""Where the shipped Hydra configs and studies live, and how Hydra finds them.

`configs/` (groups and the main config) and `experiments/` (one file per study) sit at the top of a
checkout; an installed wheel carries them as `bnstudy/configs/` and `bnstudy/experiments/`
(pyproject's `package-dir`). `register()` puts two things in Hydra's ConfigStore before composing:
the typed schema's defaults (`bnstudy_schema`, the only home of every default value) and each study
(or only those a command line chooses) as option `experiment=<study>` (so `experiment=NAME` selects
`experiments/NAME.yaml` in both layouts).
Hydra is imported only inside `register()`, so the report can locate the studies without it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # bnstudy/
SCHEMA_NAME = "bnstudy_schema"  # the first entry of configs/config.yaml's defaults list
EXPERIMENT_GROUP = "experiment"


def shipped_dir(name: str) -> Path:
    """`configs` or `experiments`: inside the installed package, else beside it in a checkout."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bnstudy's {name}/ folder is missing: looked in {PACKAGE_DIR} and {PACKAGE_DIR.parent}")


def config_dir() -> Path:
    return shipped_dir("configs")


def experiments_dir() -> Path:
    return shipped_dir("experiments")


def study_files(directory: Path | None = None) -> dict[str, Path]:
    """Study name -> its experiment file."""
    directory = directory or experiments_dir()
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))}


def known_studies(directory: Path | None = None) -> list[str]:
    """The study names, sorted: the stems of the experiment files."""
    return sorted(study_files(directory))


def schema_defaults() -> dict:
    """Every key of the typed schema with its default, untyped, so that `bnstudy.app.config.parse` (not
    Hydra's merge) is what checks the values and words the errors."""
    from omegaconf import OmegaConf

    from bnstudy.app.config import Config

    return OmegaConf.to_container(OmegaConf.structured(Config))


def linear_lr(base, reference_batch, batch_size):
    """The linear scaling rule (Goyal et al. 2017): `base` (a learning rate or a list of them, packable) is
    the rate at batch `reference_batch`; at `batch_size` it is multiplied by batch_size / reference_batch.
    Used in study files as `${linear_lr:0.05,128,${train.batch_size}}`."""
    scale = float(batch_size) / float(reference_batch)
    if isinstance(base, (list, tuple)) or hasattr(base, "__iter__"):
        return [float(b) * scale for b in base]
    return float(base) * scale


def register(studies: list[str] | None = None) -> None:
    """Store the schema's defaults and the `studies` (default: every study) in Hydra's ConfigStore, and the
    `linear_lr` resolver that study files use (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("linear_lr", linear_lr, replace=True)
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=schema_defaults())
    files = study_files()
    for study in files if studies is None else studies:
        path = files[study]
        # The files start with `# @package _global_`; a stored node states its package here instead.
        store.store(group=EXPERIMENT_GROUP, name=study, node=OmegaConf.load(path), package="_global_")
