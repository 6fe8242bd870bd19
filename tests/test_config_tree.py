"""Hydra finds the main config, the schema's defaults and every study, in a checkout and in an installed wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from hydra import compose, initialize_config_dir

from bnstudy.app import config_tree

config_tree.register()


def test_the_shipped_folders_are_found_and_hold_the_studies():
    assert (config_tree.config_dir() / "config.yaml").is_file()
    studies = config_tree.study_files()
    assert "placement" in studies and all(p.parent == config_tree.experiments_dir() for p in studies.values())
    assert not (config_tree.config_dir() / "experiment").exists()  # one home: experiments/


def test_experiment_name_selects_its_file_through_the_search_path():
    with initialize_config_dir(config_dir=str(config_tree.config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=placement"], return_hydra_config=True)
    assert cfg.study == "placement" and list(cfg.seed) == [0, 1, 2]
    assert cfg.hydra.sweeper.params["model.norm"] == "none,before_relu,after_relu"


def test_defaults_come_from_the_schema_alone():
    from bnstudy.app.config import Config

    with initialize_config_dir(config_dir=str(config_tree.config_dir()), version_base="1.3"):
        cfg = compose("config")
    schema = Config()
    assert cfg.train.epochs == schema.train.epochs and cfg.discrepancy.enabled == schema.discrepancy.enabled
    assert cfg.optimizer.lr == schema.optimizer.lr and cfg.model.bn_momentum == schema.model.bn_momentum


@pytest.mark.slow
def test_an_installed_wheel_carries_the_configs_and_studies(tmp_path):
    root = config_tree.PACKAGE_DIR.parent
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root), "-w"]
    subprocess.run([*build, str(tmp_path / "wheel")], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("bnstudy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bnstudy/configs/config.yaml" in names and "bnstudy/experiments/placement.yaml" in names
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    code = (
        "import bnstudy.app.main as t; from bnstudy.app import config_tree\n"
        "from hydra import compose, initialize_config_dir\n"
        "config_tree.register(studies=['dropout'])\n"
        "with initialize_config_dir(config_dir=t.CONFIG_DIR, version_base='1.3'):\n"
        "    c = compose('config', overrides=['experiment=dropout'])\n"
        f"assert t.CONFIG_DIR.startswith({str(target)!r}) and c.study == 'dropout', t.CONFIG_DIR"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=tmp_path, env=env)
