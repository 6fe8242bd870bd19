"""bnstudy.core.reference writes out the config schema's defaults: check that it holds the same values."""

from bnstudy.app import config, data
from bnstudy.app import main as train
from bnstudy.core import reference


def default_config() -> config.Config:
    return config.from_dict({"dataset": {"name": "mnist_t10k"}})


def test_reference_schedule_is_the_default_runs_schedule():
    assert reference.schedule() == train.schedule_from(default_config())
    assert reference.schedule(epochs=1).epochs == 1


def test_reference_hparams_are_the_config_defaults():
    cfg = default_config()
    m = cfg.model
    hp = dict(
        lr=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        init_scale=m.init_scale,
        dropout_rate=m.dropout.rate,
        seed=cfg.seed,
    )
    assert reference.HPARAMS == hp


def test_reference_program_is_what_the_app_builds_by_default():
    mean, std = data.STATS["mnist_t10k"]
    dataset = data.Dataset("mnist_t10k", None, data.NUM_CLASSES["mnist_t10k"], mean, std, data.AUGMENT["mnist_t10k"])
    assert reference.setup() == train.build_program(default_config(), dataset)
    assert reference.setup(batch_size=32) != train.build_program(default_config(), dataset)
    # Module equality compares every setting: a model differing in one of them is told apart.
    assert reference.setup(reference.build_model(bn_epsilon=1e-3)) != train.build_program(default_config(), dataset)
