"""The default run the tests and benchmarks build from `schema.Config()` is the one the app trains by default.

The app composes configs/ with Hydra and builds its Setup, Schedule and HParams through bnstudy.app.main;
the tests (tests/conftest.py) and the benchmarks (benchmarks/common.py) build them from the schema's
defaults with bnstudy.core.from_config. Both must give the same objects, and the config tree must
restate no default of the schema.
"""

import dataclasses

import numpy as np
from hydra import compose, initialize_config_dir

from bnstudy import schema
from bnstudy.app import config as config_lib
from bnstudy.app import config_tree, data
from bnstudy.app import main as app
from bnstudy.core import from_config
from bnstudy.core.datasets import DIGITS, FACTS
from bnstudy.core.engine import HParams

config_tree.register()
DEFAULT = schema.Config(dataset=schema.DatasetConfig(name="mnist_t10k"))


def app_config(*overrides: str) -> schema.Config:
    """What the app trains: configs/ composed by Hydra, parsed onto the schema and validated."""
    with initialize_config_dir(config_dir=str(config_tree.config_dir()), version_base="1.3"):
        return config_lib.parse(compose("config", overrides=list(overrides)))


def app_setup(cfg: schema.Config):
    facts = FACTS[cfg.dataset.name]
    dataset = data.Dataset(cfg.dataset.name, None, facts.num_classes, facts.mean, facts.std, facts.augment)
    return app.build_program(cfg, dataset)


def core_setup(cfg: schema.Config):
    return from_config.setup_from_config(cfg, DIGITS.num_classes, DIGITS.mean, DIGITS.std, DIGITS.augment)


def test_the_composed_default_config_is_the_schemas_default():
    assert app_config() == DEFAULT
    assert app_config("optimizer.momentum=0.5") != DEFAULT


def test_the_app_and_the_core_build_the_same_default_setup():
    assert app_setup(app_config()) == core_setup(DEFAULT)
    # Module equality compares every setting: one model setting or one Setup field apart is told apart.
    assert app_setup(app_config("model.bn_epsilon=1e-3")) != core_setup(DEFAULT)
    assert app_setup(app_config("train.batch_size=32")) != core_setup(DEFAULT)
    changed = dataclasses.replace(DEFAULT, model=dataclasses.replace(DEFAULT.model, bn_epsilon=1e-3))
    assert app_setup(app_config("model.bn_epsilon=1e-3")) == core_setup(changed)


def test_the_app_and_the_core_build_the_same_default_schedule():
    assert app.schedule_from(app_config()) == from_config.schedule_from_config(DEFAULT)
    assert app.schedule_from(app_config("train.epochs=1")) != from_config.schedule_from_config(DEFAULT)


def test_a_runs_hyperparameters_are_the_packable_keys_values():
    (run,) = config_lib.expand_pack(app_config())
    assert config_lib.hparams_row(run) == from_config.hparams_row(DEFAULT)
    runs = config_lib.expand_pack(app_config("seed=[1,2]", "optimizer.lr=0.5"))
    app_pack = HParams.stack([config_lib.hparams_row(r) for r in runs])  # as bnstudy.app.main stacks a pack
    core_pack = from_config.hparams_from_config(DEFAULT, [{"seed": 1, "lr": 0.5}, {"seed": 2, "lr": 0.5}])
    for ours, theirs in zip(app_pack, core_pack, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert core_pack.seed.tolist() == [1, 2]


def test_population_batches_cover_population_examples_at_any_batch_size():
    cfg = app_config("discrepancy.population_examples=1000", "train.batch_size=128")
    assert app.population_batches(cfg) == from_config.population_batches(cfg) == 8  # ceil(1000 / 128)
    assert from_config.population_batches(DEFAULT) == DEFAULT.discrepancy.population_batches
