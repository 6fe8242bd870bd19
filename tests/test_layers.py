"""The import contract between bnstudy's subpackages, checked on every module each subpackage holds.

- core and perf run on a bare JAX machine: they import none of the app or analysis libraries, nor
  bnstudy.app or bnstudy.analysis;
- analysis reads run folders with pandas, scipy and matplotlib only: no jax, flax, Hydra, TFDS, wandb,
  nor bnstudy.core, nor the app's run folders (the record format is bnstudy.records, shared by both).
Each check imports every module of a subpackage in a fresh interpreter and looks at `sys.modules`.
"""

import pkgutil
import subprocess
import sys

import pytest

import bnstudy

APP_LIBRARIES = {"hydra", "omegaconf", "wandb", "tensorflow_datasets", "tensorflow", "pandas", "scipy", "matplotlib"}
TRAINING_LIBRARIES = {"jax", "jaxlib", "flax", "optax", "orbax", "hydra", "tensorflow_datasets", "tensorflow", "wandb"}
FORBIDDEN = {
    "core": APP_LIBRARIES | {"bnstudy.app", "bnstudy.analysis"},
    "perf": APP_LIBRARIES | {"bnstudy.app", "bnstudy.analysis", "bnstudy.core"},
    # the run-record format is bnstudy.records, shared with the app: the analysis never reaches into bnstudy.app.runs
    "analysis": TRAINING_LIBRARIES | {"bnstudy.core", "bnstudy.app.main", "bnstudy.app.runs", "bnstudy.perf"},
}


def modules_of(subpackage: str) -> list[str]:
    package = __import__(f"bnstudy.{subpackage}", fromlist=["_"])
    return [f"bnstudy.{subpackage}"] + [
        m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"bnstudy.{subpackage}.")
    ]


def imported_after(modules: list[str]) -> set[str]:
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    return set(out.stdout.split())


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_a_subpackage_imports_none_of_what_its_layer_forbids(subpackage):
    modules = modules_of(subpackage)
    assert len(modules) > 1, f"bnstudy.{subpackage} holds no modules"
    loaded = imported_after(modules)
    bad = {name for name in loaded for f in FORBIDDEN[subpackage] if name == f or name.startswith(f + ".")}
    assert not bad, f"bnstudy.{subpackage} imports {sorted(bad)}"


def test_the_top_level_holds_at_most_six_modules_the_launchers_among_them():
    top = sorted(m.name for m in pkgutil.iter_modules(bnstudy.__path__) if not m.ispkg)
    assert len(top) <= 6, top
    assert {"train", "report"} <= set(top)
