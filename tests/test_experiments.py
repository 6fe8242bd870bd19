"""Every study file composes with Hydra for each dataset it declares, with and without the quick preset,
and every job of its sweep passes validation; one quick study runs end to end through train and report."""

from __future__ import annotations

import itertools
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from bnstudy.analysis import cli
from bnstudy.analysis.spec import experiment_spec, validate_spec
from bnstudy.app import config as config_lib
from bnstudy.app import config_tree

CONFIGS = config_tree.config_dir()
config_tree.register()
STUDIES = (
    "placement",
    "learning_rate",
    "init_scale",
    "dropout",
    "batch_size",
    "small_batch_norms",
    "smoothness",
    "ics",
    "dead_units",
    "convergence",
    "regularization",
    "cost",
)


def compose_study(study: str, *overrides: str, hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=[f"experiment={study}", *overrides], return_hydra_config=hydra_config)


def sweep_jobs(params) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of `hydra.sweeper.params`: one override list per combination."""
    parser = OverridesParser.create()
    axes = [
        [f"{key}={v}" for v in parser.parse_override(f"{key}={value}").sweep_string_iterator()]
        for key, value in params.items()
    ]
    return [list(job) for job in itertools.product(*axes)]


def job_configs(study: str, base: list[str], composed, jobs: list[list[str]], check_first: bool = True):
    """Each job's config, as `compose_study(study, *base, *job)` gives it, from the study's `composed` config
    (with or without Hydra's own) and, with `check_first`, one more Hydra compose.

    A compose costs ~0.2 s (Hydra deep-copies the whole tree at every merge), and the sweeps hold ~350 jobs.
    A sweep axis is a plain key, which Hydra sets on the composed tree after the defaults list; so each job
    sets its values on a copy of the study's config, and the first job, composed by Hydra, must be equal.
    """
    parser = OverridesParser.create()
    configs = []
    for job in jobs:
        cfg = composed.copy()
        with open_dict(cfg):
            cfg.pop("hydra", None)
        for override in map(parser.parse_override, job):
            assert override.package is None and override.type.name == "CHANGE", override
            assert OmegaConf.is_dict(cfg) and not OmegaConf.is_dict(OmegaConf.select(cfg, override.key_or_group))
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
        configs.append(cfg)
    if check_first:
        by_hydra = compose_study(study, *base, *jobs[0])
        assert OmegaConf.to_container(configs[0], resolve=True) == OmegaConf.to_container(by_hydra, resolve=True)
    return configs


def cases():
    for study in STUDIES:
        spec = experiment_spec(study)
        for dataset in spec["datasets"]:
            for preset in ([], ["+preset=quick"]):
                yield pytest.param(study, dataset, preset, id=f"{study}-{dataset}{'-quick' if preset else ''}")
        if study != "cost":  # the deep replication (results/<network>/<study>/); cost times the 2-conv CNN only
            for network in ("cnn6", "resnet20"):
                yield pytest.param(study, spec["datasets"][0], [f"+network={network}"], id=f"{study}-{network}")


def test_there_is_one_experiment_file_per_study():
    assert config_tree.known_studies() == sorted(STUDIES)


@pytest.mark.parametrize("study, dataset, preset", list(cases()))
def test_study_composes_and_every_sweep_job_validates(study, dataset, preset):
    base = [f"dataset={dataset}", *preset]
    study_cfg = compose_study(study, *base, hydra_config=True)
    params = study_cfg.hydra.sweeper.params
    assert params, f"{study}: structural axes belong in hydra.sweeper.params"
    jobs = sweep_jobs(params)
    assert len(jobs) >= 2
    # The shortcut is checked against Hydra once per study and preset: the dataset is a defaults-list choice,
    # made before any sweep value is set, so it cannot change what the shortcut does (a compose is ~0.3 s).
    check = dataset == experiment_spec(study)["datasets"][0]
    for job_cfg in job_configs(study, base, study_cfg, jobs, check_first=check):
        cfg = config_lib.parse(job_cfg)
        assert cfg.study == study and cfg.dataset.name == dataset
        seeds = config_lib.pack_axes(cfg)["seed"]
        assert len(seeds) >= (2 if "+preset=quick" in preset else 3)
        if "+network=cnn6" in preset:
            assert (cfg.model.name, cfg.model.depth, cfg.train.epochs, cfg.out_dir) == ("cnn", 6, 5, "outputs/cnn6")
        elif "+network=resnet20" in preset:
            assert (cfg.model.name, cfg.model.depth, cfg.train.epochs) == ("resnet", 20, 5)
            assert cfg.out_dir == "outputs/resnet20"
        elif preset:
            assert cfg.train.epochs == 1 and cfg.train.max_steps_per_epoch and cfg.dataset.train_subset
            assert cfg.out_dir == "outputs/quick" and "quick" in cfg.report["variant"]


@pytest.mark.parametrize("study", STUDIES)
def test_report_block_is_complete_and_names_real_axes(study):
    cfg = compose_study(study)
    spec = validate_spec(OmegaConf.to_container(cfg.report), study)
    assert spec == experiment_spec(study)  # what the runs carry equals what the file says
    assert spec["claim"].endswith(".") and spec.get("source")
    assert spec["compare"], f"{study}: a study needs at least one deciding comparison"
    params = compose_study(study, hydra_config=True).hydra.sweeper.params
    job = config_lib.parse(compose_study(study, *sweep_jobs(params)[0]))
    packed = {key for key, values in config_lib.pack_axes(job).items() if len(values) > 1}
    axes = set(params) | packed
    for comp in spec["compare"]:
        for filters in (
            comp.get("a") or {},
            comp.get("b") or {},
            comp.get("where") or {},
            comp.get("relative_to") or {},
        ):
            assert set(filters) <= axes, f"{study}: comparison filters {set(filters) - axes} are not grid axes"
        assert comp.get("trend", "seed") in axes | {"seed"}, f"{study}: trend axis {comp['trend']} is not a grid axis"
    if spec.get("select"):
        assert set(spec["select"]["over"]) <= packed, f"{study}: selection must run over a packed axis"
    for name, d in (spec.get("derived") or {}).items():
        assert d["over"] in packed, f"{study}: derived {name} runs over {d['over']}, which is not packed"
    for fig in spec.get("figures") or []:
        assert {"name"} <= set(fig) and ("y" in fig or "curve" in fig)


def test_quick_placement_runs_end_to_end_through_train_and_report(small_data, run_app, tmp_path):
    # Two steps on generated data teach nothing, so the report is told not to require learning (the trained rule
    # is tested in test_stats.py); the pipeline from train to report is what this test checks, on small images
    # (24 models train and evaluate; the TFDS read is tested in tests/test_train.py).
    out = run_app(
        "-m",
        "experiment=placement",
        "+preset=quick",
        "train.max_steps_per_epoch=2",
        "discrepancy.enabled=false",
        "train.pack_size=1",  # one compiled program per placement, reused by its 8 runs (packs are slower on CPU)
        "+report.require_trained=false",
    )
    runs_dir = out / "placement"
    summaries = [json.loads(p.read_text()) for p in runs_dir.glob("*/summary.json")]
    assert len(summaries) == 24  # 3 placements x 4 lrs x 2 seeds
    for s in summaries:  # what the selection and the decision read, written by every run, BN or not
        assert {"val/acc", "train_subset/acc", "test/acc", "trained", "gen_gap"} <= set(s)
        assert s["num_val"] == round(0.1 * 256)
    results = tmp_path / "results"
    cli.main(["placement", "--runs", str(runs_dir), "--out", str(results)])
    text = (results / "README.md").read_text()
    assert "## Verdict: **" in text and "quick (2 seeds" in text and "Runs by status: done 24" in text
    assert "Per-arm selection of optimizer.lr (on `val/acc`" in text
    assert text.count("**selected**") == 3  # one lr per placement
    assert "margin_reason" not in text and "binomial standard error" in text  # margins are stated with reasons
    assert (results / "test_acc_by_norm.svg").is_file()
    # Two steps of one epoch log train/loss once per run: no curve to draw, and the report says so.
    assert "`learning_curves_train_loss` not drawn: one logged value of `train/loss` per run" in text
    assert not (results / "learning_curves_train_loss.png").exists()
    comparisons = (results / "comparisons.csv").read_text()
    # The grid is the selection phase (seeds 0 and 1): no run of it decides; each arm's selected lr waits for
    # its confirmation seeds (bnstudy-study trains them; tests/test_study_runner.py runs the whole study).
    assert comparisons.count("0 paired seeds (first of 0)") == 3 and "within +-0.005" in comparisons
    assert comparisons.count("open: the next look needs 2 seeds") == 3  # the quick schedule's first look
    assert "Two phases on disjoint seeds" in text and "seeds [0, 1]" in text


def test_batch_size_study_scales_the_lr_and_pools_a_fixed_number_of_examples():
    from bnstudy.app.main import population_batches

    for bs in (2, 8, 32, 128, 512):
        cfg = config_lib.parse(compose_study("batch_size", f"train.batch_size={bs}"))
        assert cfg.optimizer.lr == pytest.approx(0.05 * bs / 128)  # Goyal et al.'s linear rule, reference 128
        assert population_batches(cfg) * bs == 4096  # the same examples for every batch size
    cfg = config_lib.parse(compose_study("small_batch_norms", "train.batch_size=8"))
    assert cfg.optimizer.lr == pytest.approx([0.025 / 16, 0.05 / 16, 0.1 / 16])
    with pytest.raises(config_lib.ConfigError, match="discrepancy.population_examples"):
        config_lib.parse(compose_study("batch_size", "discrepancy.population_examples=-1"))


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_declares_its_lr_schedule_and_epochs_with_a_reason(study):
    """Each study file names its schedule and its epochs itself (not the schema's defaults), each with a comment."""
    lines = (config_tree.experiments_dir() / f"{study}.yaml").read_text().splitlines()
    for key in ("  schedule: {name: ", "  epochs: "):
        declared = [line for line in lines if line.startswith(key)]
        assert len(declared) == 1, f"{study}: no `{key.strip()}` line"
        assert "#" in declared[0] and len(declared[0].split("#", 1)[1].strip()) > 10, f"{study}: no reason given"
    cfg = config_lib.parse(
        compose_study(study, *sweep_jobs(compose_study(study, hydra_config=True).hydra.sweeper.params)[0])
    )
    assert cfg.optimizer.schedule.name in ("constant", "cosine", "step")
