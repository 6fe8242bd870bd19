"""The config schema: every config key with its type and default, the one home of default values.

Plain dataclasses with no Hydra or OmegaConf import, so the core can read a config as well as the app:
the app merges Hydra's config onto them and validates it (bnstudy.app.config); the core builds a run's
static setup, schedule and hyperparameters from them (bnstudy.core.from_config). A new knob is one
field here and its use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# OmegaConf's marker of a required value (omegaconf.MISSING): the structured schema treats it as missing.
MISSING = "???"

# Packable key -> the engine.HParams field it feeds: a list in one of these keys trains each value.
PACKABLE = {
    "optimizer.lr": "lr",
    "optimizer.weight_decay": "weight_decay",
    "model.init_scale": "init_scale",
    "model.dropout.rate": "dropout_rate",
    "seed": "seed",
}


# model.name -> the depth `model.depth: null` means: the depth-2 CNN (conv32-conv64), VGG-11, ResNet-20.
STANDARD_DEPTHS = {"cnn": 2, "vgg": 11, "resnet": 20}


def get(cfg: Any, key: str) -> Any:
    """The value of a dotted key, e.g. `get(cfg, "model.dropout.rate")`."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@dataclass
class DatasetConfig:
    name: str = MISSING  # chosen by the defaults list: dataset=mnist_t10k (embedded), mnist or cifar10
    data_dir: str | None = None  # TFDS data_dir; None = TFDS's default (~/tensorflow_datasets)
    download: bool = False
    # Held out of the training split for choices (select on val/acc), the same examples in every arm and seed:
    # a fraction in (0, 1) of the training split, or a count of examples; 0 = no validation split.
    val_size: Any = 0.1
    train_subset: int | None = None  # then use only the first N remaining training examples (quick runs, tests)
    test_subset: int | None = None


@dataclass
class DropoutConfig:
    placement: str = "none"
    rate: Any = 0.0  # packable


@dataclass
class ModelConfig:
    name: str = "cnn"
    norm: str = "before_relu"  # placement: none | before_relu | after_relu
    norm_kind: str = "batch"  # batch | layer | group; layer and group norm keep no running statistics
    norm_groups: int = 8  # group norm's groups; must divide every block's channels (dense: features)
    bn_momentum: float = 0.9  # running = momentum * running + (1 - momentum) * batch (PyTorch's 0.1)
    bn_epsilon: float = 1e-5  # also layer and group norm's epsilon
    # What BN's running variance averages: unbiased = batch variance x n/(n-1) (PyTorch's BatchNorm),
    # biased = the batch variance (flax.linen.BatchNorm); n = values per channel in the batch.
    bn_running_var: str = "unbiased"
    init_scale: Any = 1.0  # packable
    width: float = 1.0  # vgg channel multiplier
    # cnn: conv blocks (>= 2); vgg: 11, 13, 16 or 19; resnet: 6n+2. null = STANDARD_DEPTHS[name]; a run's
    # identity drops it when it is the standard depth, so the ids from before this key stay the same.
    depth: int | None = None
    dropout: DropoutConfig = field(default_factory=DropoutConfig)


@dataclass
class LrScheduleConfig:
    """The lr over training as a multiple of the peak `optimizer.lr` (bnstudy.core.lr_schedule), its shape in
    fractions of the run's training steps. A run's identity drops it while it is constant without warmup,
    so the ids from before this key stay the same."""

    name: str = "constant"  # constant | cosine (to `floor` x the peak) | step (x `factor` at each milestone)
    warmup: float = 0.0  # fraction of the training steps with a linear rise from 0 to the peak; 0 = none
    floor: float = 0.0  # cosine: the final lr as a fraction of the peak
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training
    factor: float = 0.1  # step: the lr is multiplied by this at each milestone


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: Any = 0.1  # packable: the peak lr of the schedule
    momentum: float = 0.9
    weight_decay: Any = 0.0  # packable
    schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)


@dataclass
class TrainConfig:
    batch_size: int = 128
    epochs: int = 3
    eval_every: int = 1  # epochs; 0 = only at the end
    eval_every_steps: int = 0  # steps between evaluations (convergence speed); 0 = use eval_every (epochs)
    # steps_to_target in summary.json: the first evaluated step whose val/acc (test/acc without a
    # validation split) reaches this accuracy; null = not computed
    target_acc: float | None = None
    log_every: int = 50  # steps
    eval_batch_size: int = 1000
    max_steps_per_epoch: int | None = None
    pack_size: Any = "auto"  # models per compiled program: an int, or "auto"
    devices: Any = "auto"  # local devices a pack is split over: an int, or "auto" (all on accelerators, 1 on CPU)
    loop: str = "auto"
    steps_per_call: Any = "auto"  # python loop: steps unrolled into one compiled call (int; "auto": 1 on CPU, 8 else)
    rerun: bool = False  # retrain runs whose folder already holds a finished result of the same config
    checkpoint_every: int = 1  # epochs between checkpoints (the last one kept; a re-run resumes from it); 0 = off


@dataclass
class ProbeConfig:
    every: int = 0  # steps between loss-smoothness probes (docs/design.md §4.1); 0 = off
    step_multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # x lr


@dataclass
class IcsConfig:
    every: int = 0  # steps between internal-covariate-shift probes (Santurkar et al. 2018 sec. 2.2); 0 = off


@dataclass
class DeadUnitsConfig:
    enabled: bool = True  # relu/<layer>/dead_frac at each evaluation (docs/design.md §4.5)


@dataclass
class DiscrepancyConfig:
    enabled: bool = True  # train/inference discrepancy (docs/design.md §4.2); BN models only
    # Measured at every evaluation, or (false) only at the last one of training: the three BN modes and the
    # population pass cost about three times a plain evaluation, and the studies decide on final values.
    every_eval: bool = False
    population_batches: int = 20  # training batches for the population statistics (capped at one epoch)
    # When > 0: pool the population statistics over this many training examples instead, i.e.
    # ceil(population_examples / batch size) batches (capped at one epoch), the same for every batch size.
    population_examples: int = 0
    train_subset: int = 2000  # first N training examples, also evaluated in the three modes; 0 = none


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "bnstudy"
    entity: str | None = None
    group: str | None = None  # default: the study name
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 15.0  # seconds an online wandb.init may take before the run falls back to offline


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # progress bar on a terminal (never in non-interactive logs)


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    ics: IcsConfig = field(default_factory=IcsConfig)
    dead_units: DeadUnitsConfig = field(default_factory=DeadUnitsConfig)
    discrepancy: DiscrepancyConfig = field(default_factory=DiscrepancyConfig)
    seed: Any = 0  # packable
    out_dir: str = "outputs"
    study: str | None = None
    report: Any = None  # free-form study description (claim, decision rule) read by bnstudy.report
    compile_cache_dir: str | None = "~/.cache/bnstudy/jax"
