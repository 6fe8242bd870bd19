"""Every config composes, bad values are refused with a clear message, packs expand as documented."""

import pytest
from hydra import compose, initialize_config_dir

from bnstudy.app import config as config_lib
from bnstudy.app import config_tree
from bnstudy.app import runs as runs_lib
from bnstudy.app.config import ConfigError

CONFIGS = str(config_tree.config_dir())
config_tree.register()


def composed(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def parse(*overrides):
    return config_lib.parse(composed(*overrides))


def test_defaults_are_embedded_mnist_cnn_bn_before_relu_offline():
    cfg = parse()
    assert (cfg.dataset.name, cfg.model.name, cfg.model.norm) == ("mnist_t10k", "cnn", "before_relu")
    assert cfg.model.bn_momentum == 0.9 and cfg.model.bn_epsilon == 1e-5
    assert cfg.logger.wandb.mode == "offline"


def test_cifar10_defaults_to_vgg_and_model_can_be_overridden():
    assert parse("dataset=cifar10").model.name == "vgg"
    assert parse("dataset=cifar10", "model=cnn").model.name == "cnn"


@pytest.mark.parametrize(
    "override, key, given",
    [
        ("model.norm=middle", "model.norm", "middle"),
        ("optimizer.lr=0", "optimizer.lr", "0"),
        ("optimizer.lr=-0.1", "optimizer.lr", "-0.1"),
        ("optimizer.lr=fast", "optimizer.lr", "fast"),
        ("train.batch_size=0", "train.batch_size", "0"),
        ("model.dropout.rate=1.0", "model.dropout.rate", "1.0"),
        ("model.dropout.rate=-0.2", "model.dropout.rate", "-0.2"),
        ("model.dropout.placement=everywhere", "model.dropout.placement", "everywhere"),
        ("train.epochs=three", "train.epochs", "three"),
        ("logger.wandb.mode=loud", "logger.wandb.mode", "loud"),
        ("seed=-1", "seed", "-1"),
        ("optimizer.lr=[0.1,-1]", "optimizer.lr", "-1"),
        ("train.pack_size=0", "train.pack_size", "0"),
    ],
)
def test_bad_values_name_the_key_and_what_was_given(override, key, given):
    with pytest.raises(ConfigError) as info:
        parse(override)
    message = str(info.value)
    assert f"`{key}`" in message and given in message
    assert "must be" in message or "wrong type" in message


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown key `model.nrom`"):
        parse("+model.nrom=before_relu")


def test_missing_dataset_is_refused():
    with pytest.raises(ConfigError, match="dataset"):
        parse("~dataset")


def test_structural_list_points_to_hydra_multirun():
    with pytest.raises(ConfigError, match=r"-m model.norm=a,b,c"):
        parse("model.norm=[none,before_relu]")
    with pytest.raises(ConfigError, match="train.batch_size"):
        parse("train.batch_size=[32,64]")


def test_parsing_never_changes_the_shared_schema_a_later_parse_starts_from():
    first = parse("seed=7", "optimizer.lr=[0.01,0.1]", "model.norm=none")
    config_lib.expand_pack(first)
    later = parse()
    assert (later.seed, later.optimizer.lr, later.model.norm) == (0, 0.1, "before_relu")  # the defaults
    with pytest.raises(ConfigError, match="unknown key"):  # nor does a refused config
        parse("+model.nrom=1")
    assert config_lib.typed_schema().get("model").get("nrom") is None and parse() == later


def test_pack_is_the_cartesian_product_in_a_stable_order():
    cfg = parse("optimizer.lr=[0.01,0.1,1.0]", "model.init_scale=[0.5,1,2]", "seed=[0,1,2]")
    runs = config_lib.expand_pack(cfg)
    assert len(runs) == 27
    assert {(r.optimizer.lr, r.model.init_scale, r.seed) for r in runs} == {
        (lr, s, seed) for lr in (0.01, 0.1, 1.0) for s in (0.5, 1.0, 2.0) for seed in (0, 1, 2)
    }
    assert [r.seed for r in runs[:3]] == [0, 1, 2]  # seed varies fastest
    assert len({runs_lib.run_id(r) for r in runs}) == 27
    assert all(isinstance(r.seed, int) and isinstance(r.optimizer.lr, float) for r in runs)


def test_run_id_is_readable_and_stable_and_ignores_logging():
    a = config_lib.expand_pack(parse("optimizer.lr=0.05", "seed=3"))[0]
    b = config_lib.expand_pack(parse("optimizer.lr=0.05", "seed=3", "logger.wandb.mode=disabled", "out_dir=x"))[0]
    c = config_lib.expand_pack(parse("optimizer.lr=0.05", "seed=3", "model.bn_momentum=0.99"))[0]
    assert runs_lib.run_id(a) == runs_lib.run_id(b)
    assert runs_lib.run_id(a) != runs_lib.run_id(c)
    assert runs_lib.run_id(a).startswith("mnist_t10k-cnn-before_relu-lr0.05-bs128-s3-")


def test_repeated_pack_values_are_refused():
    with pytest.raises(ConfigError, match="repeated"):
        parse("seed=[1,1]")


def test_group_choices_return_every_chosen_option_so_only_those_studies_are_loaded():
    from bnstudy.app.cli import check_group_choices

    overrides = ["-m", "experiment=placement,ics", "optimizer=adam", "seed=[0,1]"]
    chosen = check_group_choices(overrides, config_tree.config_dir())
    assert chosen == {"experiment": ["placement", "ics"], "optimizer": ["adam"]}
    assert check_group_choices(["seed=1"], config_tree.config_dir()) == {}
