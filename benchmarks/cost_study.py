"""The `cost` study's runs: BN's step time measured in interleaved rounds in one process.

Training jobs run one after another, so a change in machine load between them would show up as a
difference between norms. Here every (norm, batch size, seed) of the grid is compiled once (with the
persistent compilation cache off, so `compile_time` is a real compile), warmed up, and then timed in
rounds: in each round every configuration takes `--steps` train steps, in an order rotated from round to
round; a configuration's `step_time` is the median over rounds of its mean step time in a round. One run
folder per configuration is written in the training app's layout (config.yaml with the study's report
block, summary.json), so that `bnstudy-report cost` reads them like any study's runs:

    python benchmarks/cost_study.py                      # the default grid of experiments/cost.yaml
    python benchmarks/cost_study.py --quick              # minutes; folders under outputs/quick/cost
    python -m bnstudy.report cost [--out-dir outputs/quick]

The step is `engine.train_step` on random MNIST- (or CIFAR-) shaped data: its time does not depend on the
pixel values. Every folder records the machine (backend, device, CPU count, load average at the start).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp

from bnstudy import schema
from bnstudy.analysis.spec import experiment_spec
from bnstudy.app import claims as claims_lib
from bnstudy.app import config as config_lib
from bnstudy.app import provenance
from bnstudy.app import runs as runs_lib
from bnstudy.core import engine, from_config
from bnstudy.core.datasets import FACTS
from bnstudy.core.engine import ArrayData, HParams, Setup

MODEL_OF = {"mnist_t10k": "cnn", "mnist": "cnn", "cifar10": "vgg"}  # each dataset's model (configs/dataset/)


def run_config(dataset: str, norm: str, batch_size: int, seed: int, out_dir: str, variant: str | None) -> dict:
    """The run's config as the training app would store it (schema defaults + this study's settings)."""
    report = dict(experiment_spec("cost"))
    if variant:
        report["variant"] = variant
    model = MODEL_OF[dataset]
    raw = {
        "dataset": {"name": dataset},
        "model": {"name": model, "norm": norm},
        "train": {"batch_size": batch_size, "epochs": 1, "eval_every": 0, "pack_size": 1},
        "probe": {"every": 0},
        "discrepancy": {"enabled": False},
        "seed": seed,
        "out_dir": out_dir,
        "study": "cost",
        "report": report,
        "compile_cache_dir": None,
    }
    return config_lib.to_dict(config_lib.parse(raw))


def program_for(dataset: str, norm: str, batch_size: int) -> Setup:
    """The schema's defaults with this dataset, norm and batch size. Without augmentation: the study times
    the train step of each norm, and cifar10's crop and flip would add the same cost to every arm."""
    cfg = schema.Config(
        dataset=schema.DatasetConfig(name=dataset),
        model=schema.ModelConfig(name=MODEL_OF[dataset], norm=norm),
        train=schema.TrainConfig(batch_size=batch_size),
    )
    facts = FACTS[dataset]
    return from_config.setup_from_config(cfg, facts.num_classes, facts.mean, facts.std, augment=False)


def stepper(dataset: str, norm: str, batch_size: int, seed: int):
    """(compile seconds, a no-argument function running one train step)."""
    shape = FACTS[dataset].image_shape
    setup = program_for(dataset, norm, batch_size)
    rng = np.random.default_rng(seed)
    n = 4 * batch_size
    data = ArrayData(
        jnp.asarray(rng.integers(0, 256, (n, *shape), dtype=np.uint8)),
        jnp.asarray(rng.integers(0, 10, n, dtype=np.int32)),
        jnp.asarray(rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8)),
        jnp.asarray(rng.integers(0, 10, batch_size, dtype=np.int32)),
    )
    hp = HParams(
        lr=jnp.float32(0.01),
        weight_decay=jnp.float32(0.0),
        init_scale=jnp.float32(1.0),
        dropout_rate=jnp.float32(0.0),
        seed=jnp.int32(seed),
    )
    state = jax.jit(partial(engine.init_state, setup, shape))(hp)
    perm = engine.epoch_permutation(hp.seed, 0, n)
    args = (state, hp, data, perm, jnp.int32(0))
    t0 = time.perf_counter()
    compiled = jax.jit(partial(engine.train_step, setup)).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, lambda: compiled(*args)


def measure(configs: list[tuple], dataset: str, rounds: int, steps: int, warmup: int) -> dict:
    """config -> (compile seconds, median over rounds of the mean step time in a round)."""
    steppers = {c: stepper(dataset, *c) for c in configs}
    for _, fn in steppers.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {c: [] for c in configs}
    for r in range(rounds):
        for c in configs[r % len(configs) :] + configs[: r % len(configs)]:  # rotated order
            fn = steppers[c][1]
            t0 = time.perf_counter()
            for _ in range(steps):
                out = fn()
            jax.block_until_ready(out)
            times[c].append((time.perf_counter() - t0) / steps)
    return {c: (steppers[c][0], statistics.median(times[c]), times[c]) for c in configs}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist_t10k", choices=sorted(MODEL_OF))
    p.add_argument("--norms", default="none,before_relu,after_relu")
    p.add_argument("--batch-sizes", default="32,128,512")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5, help="train steps per configuration per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out-dir", default="outputs")
    p.add_argument("--quick", action="store_true", help="2 seeds, 5 rounds of 2 steps, under <out-dir>/quick")
    p.add_argument("--rerun", action="store_true", help="measure again even if every folder is finished")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # compile_time is a real compile
    variant = None
    if args.quick:
        args.seeds, args.rounds, args.steps, args.warmup = "0,1", 5, 2, 1
        args.out_dir = str(Path(args.out_dir) / "quick")
        variant = "quick (2 seeds, 5 interleaved rounds of 2 steps)"
    configs = [
        (norm, int(b), int(s))
        for norm in args.norms.split(",")
        for b in args.batch_sizes.split(",")
        for s in args.seeds.split(",")
    ]
    runs = {c: run_config(args.dataset, *c, args.out_dir, variant) for c in configs}
    root = Path(args.out_dir) / "cost"
    folders = {c: root / runs_lib.run_id(cfg) for c, cfg in runs.items()}
    if not args.rerun and all(
        claims_lib.finished_status(f, runs_lib.config_hash(runs[c])) == "done" for c, f in folders.items()
    ):
        print(f"cost: all {len(configs)} runs already finished in {root} (--rerun to measure again)")
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": load,
    }
    start = provenance.provenance()
    print(
        f"cost: {len(configs)} configurations, {args.rounds} interleaved rounds of {args.steps} steps "
        f"({jax.default_backend()}, {machine['cpu_count']} CPUs, load {load:.1f})"
    )
    results = measure(configs, args.dataset, args.rounds, args.steps, args.warmup)
    for c, (compile_s, step_s, per_round) in results.items():
        cfg = runs[c]
        summary = {
            "run_id": folders[c].name,
            "config_hash": runs_lib.config_hash(cfg),
            "study": "cost",
            **start,
            "machine": machine,
        }
        folder = runs_lib.RunFolder(folders[c], cfg, summary)
        folder.finish(
            {
                "status": "done",
                "step_time": step_s,
                "examples_per_s": c[1] / step_s,
                "compile_time": compile_s,
                "step_time_rounds": per_round,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "trained": True,
            }
        )
        print(f"  {c[0]:12s} batch {c[1]:4d} seed {c[2]}: {1e3 * step_s:8.2f} ms/step, compile {compile_s:.2f} s")


if __name__ == "__main__":
    main()
