"""What the BN measurements cost: smoothness probes and the discrepancy evaluation, as ratios to plain training.

Trains the MNIST CNN (norm=before_relu, batch 128, SGD momentum 0.9) with `PackTrainer` in several
variants, one after another in this one process and round-robin over the repeats (repeat r of every
variant, then repeat r+1), so that a change in machine load hits them all alike:

    base      no probes, no discrepancy (test loss/acc in running mode only)
    probe     loss-smoothness probes every --probe-every steps (default 10)
    disc      discrepancy evaluation at every evaluation (train.eval_every=1) with the config's
              default population_batches=20 and train_subset=2000; with probes off by default this
              is also what a default `python -m bnstudy.train` run does

For each, train_time + eval_time (compile excluded; the persistent compilation cache is pointed at
a temporary folder so that repeats do not recompile) and the ratio to `base`. It also times one
probe call against one train step, with the step sizes vmapped and unrolled.

Only the core is needed. Data: random MNIST-shaped uint8 images (--train/--test examples), or, with
--data-dir, a prepared TFDS `mnist` folder read through bnstudy.app.data (needs tensorflow-datasets).

    python benchmarks/probe_overhead.py --data-dir DATA_DIR --epochs 2 --repeats 2 --out overhead.json
    python benchmarks/probe_overhead.py --train 60000 --test 10000 --epochs 1 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import jax
import jax.numpy as jnp

from bnstudy.core import engine, metrics
from bnstudy.core.engine import ArrayData, HParams, Setup
from bnstudy.core.trainer import PackTrainer, Schedule


def load_data(args) -> tuple[ArrayData, str]:
    if args.data_dir:
        from bnstudy.app import data  # app layer: only for a real TFDS folder

        return data.load("mnist", args.data_dir).arrays, f"TFDS mnist from {args.data_dir}"
    return common.random_data(args.train, args.test), "random"


def variants(args) -> dict[str, dict]:
    disc = dict(
        discrepancy=True, population_batches=args.population_batches, discrepancy_train_subset=args.train_subset
    )
    return {"base": {}, "probe": {"probe_every": args.probe_every}, "disc": disc}


def time_calls(fn, n: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def schedule(**kw) -> Schedule:
    """The app's default schedule with the discrepancy evaluation off (the `disc` variant turns it on)."""
    return common.schedule(**{"discrepancy": False, "discrepancy_train_subset": 0, **kw})


def probe_vs_step(setup: Setup, data: ArrayData, hp: HParams, n: int) -> dict:
    """Seconds of one train step and of one probe (4 step sizes, vmapped and unrolled), pack of one."""
    trainer = PackTrainer(setup, data, schedule(epochs=1))
    state, _ = trainer.compile(hp)
    perm = trainer.permutation(hp, 0)
    step = jax.jit(jax.vmap(partial(engine.train_step, setup), in_axes=(0, 0, None, 0, None)))  # no donation
    out = {"step_s": time_calls(lambda: step(state, hp, data, perm, jnp.int32(0))[1], n)}
    for name, vectorize in (("probe_vmap_s", True), ("probe_unrolled_s", False)):
        probe = partial(metrics.smoothness_probe, setup, (0.5, 1.0, 2.0, 4.0), vectorize)
        fn = jax.jit(jax.vmap(probe, in_axes=(0, 0, None, 0, None)))
        out[name] = time_calls(lambda fn=fn: fn(state, hp, data, perm, jnp.int32(0)), n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="TFDS data_dir holding mnist/ (else random data)")
    ap.add_argument("--train", type=int, default=8000, help="random training examples")
    ap.add_argument("--test", type=int, default=2000, help="random test examples")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--probe-every", type=int, default=10)
    ap.add_argument("--population-batches", type=int, default=20, help="as discrepancy.population_batches")
    ap.add_argument("--train-subset", type=int, default=2000, help="as discrepancy.train_subset")
    ap.add_argument("--variants", default="base,probe,disc")
    ap.add_argument("--calls", type=int, default=10, help="timed calls for the probe-vs-step comparison")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    cache = tempfile.mkdtemp(prefix="bnstudy-bench-cache-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    data, source = load_data(args)
    setup = common.setup()
    hp = common.hparams()
    device = common.machine(extra_packages=())
    common.print_header("bnstudy probe overhead", device)
    print(
        f"data: {source}, {data.train_images.shape[0]} train / {data.test_images.shape[0]} test; "
        f"{args.epochs} epoch(s), eval every epoch, batch 128, repeats {args.repeats}"
    )

    chosen = {k: v for k, v in variants(args).items() if k in args.variants.split(",")}
    trainers = {name: PackTrainer(setup, data, schedule(epochs=args.epochs, **kw)) for name, kw in chosen.items()}
    runs = {name: [] for name in chosen}
    for r in range(args.repeats):
        for name, trainer in trainers.items():
            t = trainer.train(hp, lambda *a: None).timings
            runs[name].append(t)
            print(
                f"  repeat {r} {name:8s} train {t['train_time']:7.2f}s eval {t['eval_time']:6.2f}s "
                f"compile {t['compile_time']:6.2f}s"
            )

    def median(name, key):
        return statistics.median(t[key] for t in runs[name])

    table = {}
    for name in chosen:
        total = median(name, "train_time") + median(name, "eval_time")
        table[name] = {
            "train_time": median(name, "train_time"),
            "eval_time": median(name, "eval_time"),
            "train_plus_eval": total,
            "compile_time_first": runs[name][0]["compile_time"],
            "settings": chosen[name],
        }
    base = table["base"]["train_plus_eval"] if "base" in table else None
    print(f"\n{'variant':10s} {'train s':>9s} {'eval s':>8s} {'total s':>9s} {'ratio':>7s} {'compile s':>10s}")
    for name, row in table.items():
        row["ratio_vs_base"] = row["train_plus_eval"] / base if base else None
        ratio = f"{row['ratio_vs_base']:.3f}" if base else "-"
        print(
            f"{name:10s} {row['train_time']:9.2f} {row['eval_time']:8.2f} {row['train_plus_eval']:9.2f} "
            f"{ratio:>7s} {row['compile_time_first']:10.2f}"
        )

    micro = probe_vs_step(setup, data, hp, args.calls)
    print(
        f"\none call: step {micro['step_s'] * 1e3:.0f} ms, "
        f"probe vmapped over eta {micro['probe_vmap_s'] * 1e3:.0f} ms "
        f"({micro['probe_vmap_s'] / micro['step_s']:.1f} steps), unrolled {micro['probe_unrolled_s'] * 1e3:.0f} ms "
        f"({micro['probe_unrolled_s'] / micro['step_s']:.1f} steps)"
    )

    if args.out:
        result = {
            "device": device,
            "data": source,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "probe_every": args.probe_every,
            "variants": table,
            "runs": runs,
            "one_call": micro,
            "num_train": int(data.train_images.shape[0]),
            "num_test": int(data.test_images.shape[0]),
        }
        common.write_json(args.out, result)


if __name__ == "__main__":
    main()
