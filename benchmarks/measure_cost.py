"""What one call of each new measurement costs, as a ratio to one train step of the same model.

Times single jitted calls of the core (no trainer), one model, the MNIST CNN at batch 128 on random
MNIST-shaped data, round-robin over the repeats (repeat r of every call, then repeat r+1) so that a
change in machine load hits them all alike:

    step           engine.train_step (the reference: ratio 1)
    ics            metrics.ics_probe: the step's gradient, its optimizer update, one more gradient per
                   layer after the first (3 for the CNN)
    smooth         metrics.smoothness_probe with the default 4 step sizes, unrolled (for comparison)
    eval           engine.eval_batch on --eval-batch test images (inference mode)
    eval+units     metrics.eval_batch_with_units on the same images: the same pass, also counting
                   which ReLU units fired (dead units); its ratio to `eval` is the dead-unit overhead
and the train step of the other norm kinds and of flax's own nn.BatchNorm, as ratios to `step`
(bnstudy's BatchNorm, unbiased running variance).

    python benchmarks/measure_cost.py --repeats 7 --out cost.json

With --job, instead the whole default job (bnstudy.core.trainer.PackTrainer, the app's default schedule:
the embedded mnist_t10k digits, batch 128, BN before ReLU, discrepancy on) for --epochs, with each
measurement switched on alone, as a ratio of training + evaluation seconds (compilation excluded) to
the same job without any of them ("plain"), variants interleaved over the repeats:

    python benchmarks/measure_cost.py --job --ics-every 10 --repeats 3 --out job_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import flax.linen as nn
import jax
import jax.numpy as jnp

from bnstudy.core import engine, kernels, metrics, models
from bnstudy.core.engine import ArrayData, HParams, Setup


class _FlaxBatchNormBlock(models.Block):
    """BN before ReLU with flax's own nn.BatchNorm (biased running variance, E[x^2] - E[x]^2 variance)."""

    @nn.compact
    def __call__(self, h, train):
        bn = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon, name="bn")
        out = nn.relu(bn(kernels.computed(h)))  # flax's BN takes only a computed activation, not a deferred conv
        return kernels.max_pool_2x2(out) if self.pool else out


class _FlaxBatchNormNet(models._Net):
    """The CNN with `_FlaxBatchNormBlock`s: what bnstudy's BN was before its own BatchNorm."""

    def _block(self, h, name, train, pool=False):
        block = _FlaxBatchNormBlock(self.norm, self.bn_momentum, self.bn_epsilon, pool=pool, name=f"{name}_norm")
        return block(h, train)


def program_for(norm_kind: str, batch_size: int) -> Setup:
    return common.setup(common.build_model(norm_kind=norm_kind), batch_size=batch_size)


def calls(args, data: ArrayData) -> dict:
    """name -> a no-argument function running one call (compiled on first use)."""
    hp = HParams(
        lr=jnp.float32(0.05),
        weight_decay=jnp.float32(0.0),
        init_scale=jnp.float32(1.0),
        dropout_rate=jnp.float32(0.0),
        seed=jnp.int32(0),
    )
    perm = engine.epoch_permutation(hp.seed, 0, data.train_images.shape[0])
    images, labels = data.test_images[: args.eval_batch], data.test_labels[: args.eval_batch]
    mask = jnp.ones(args.eval_batch)
    out = {}

    def stepper(setup):
        state = jax.jit(partial(engine.init_state, setup, (28, 28, 1)))(hp)
        step = jax.jit(partial(engine.train_step, setup))
        return state, lambda: step(state, hp, data, perm, jnp.int32(0))

    setup = program_for("batch", args.batch_size)
    state, out["step"] = stepper(setup)
    ics = jax.jit(partial(metrics.ics_probe, setup))
    out["ics"] = lambda: ics(state, hp, data, perm, jnp.int32(0))
    smooth = jax.jit(partial(metrics.smoothness_probe, setup, (0.5, 1.0, 2.0, 4.0), False))
    out["smooth"] = lambda: smooth(state, hp, data, perm, jnp.int32(0))
    ev = jax.jit(partial(engine.eval_batch, setup))
    out["eval"] = lambda: ev(state.params, state.batch_stats, images, labels, mask)
    units = jax.jit(partial(metrics.eval_batch_with_units, setup))
    out["eval+units"] = lambda: units(state.params, state.batch_stats, images, labels, mask)
    for kind in ("layer", "group"):
        out[f"step[{kind}]"] = stepper(program_for(kind, args.batch_size))[1]
    m = setup.model
    flax_net = _FlaxBatchNormNet(
        conv_blocks=m.conv_blocks,
        dense_widths=m.dense_widths,
        num_classes=m.num_classes,
        norm=m.norm,
        dropout_placement=m.dropout_placement,
        bn_momentum=m.bn_momentum,
        bn_epsilon=m.bn_epsilon,
    )
    out["step[flax BatchNorm]"] = stepper(dataclasses.replace(setup, model=flax_net))[1]
    return out


def job_variants(ics_every: int) -> dict[str, dict]:
    """name -> the Schedule fields that differ from the plain default job."""
    return {
        "plain": {},
        "dead_units": {"dead_units": True},
        f"ics.every={ics_every}": {"ics_every": ics_every},
        "eval_every_steps=10": {"eval_every_steps": 10},  # ~6 evaluations per epoch instead of 1
    }


def job_cost(args) -> dict:
    """Train the default job once per variant and repeat, round-robin; seconds are train + eval time."""
    from bnstudy.app import data as data_lib
    from bnstudy.core.trainer import PackTrainer

    dataset = data_lib.load("mnist_t10k")
    setup = common.setup(batch_size=args.batch_size, input_mean=dataset.mean, input_std=dataset.std)
    base = common.schedule(epochs=args.epochs, dead_units=False)  # the default job, new measurements off
    trainers = {
        name: PackTrainer(setup, dataset.arrays, dataclasses.replace(base, **kw))
        for name, kw in job_variants(args.ics_every).items()
    }
    hp = common.hparams([{"lr": 0.01}])
    seconds = {name: [] for name in trainers}
    cpu_seconds = {name: [] for name in trainers}  # this process's CPU time: less hit by other jobs' load
    for t in trainers.values():  # compile (and warm up) every variant first
        t.train(hp, lambda *a: None)
    for _ in range(args.repeats):
        for name, t in trainers.items():
            cpu0 = time.process_time()
            timings = t.train(hp, lambda *a: None).timings
            cpu_seconds[name].append(time.process_time() - cpu0)
            seconds[name].append(timings["train_time"] + timings["eval_time"])
    median = {name: statistics.median(v) for name, v in seconds.items()}
    # Ratios within each round (the variants of one round ran back to back), then their median.
    ratio = {n: statistics.median(a / b for a, b in zip(v, seconds["plain"])) for n, v in seconds.items()}
    cpu_ratio = {n: statistics.median(a / b for a, b in zip(v, cpu_seconds["plain"])) for n, v in cpu_seconds.items()}
    return {"median_s": median, "ratio": ratio, "cpu_ratio": cpu_ratio, "times_s": seconds, "cpu_s": cpu_seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--job", action="store_true", help="the default job's overhead per measurement instead")
    parser.add_argument("--epochs", type=int, default=1, help="--job: epochs per training")
    parser.add_argument("--ics-every", type=int, default=10, help="--job: steps between ICS probes")
    args = parser.parse_args(argv)
    if args.job:
        return main_job(args)

    data = common.random_data(4 * args.batch_size, args.eval_batch)

    fns = calls(args, data)
    compile_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: median[name] / median["step"] for name in fns}
    ratio["eval+units"] = median["eval+units"] / median["eval"]  # dead-unit counting vs the plain evaluation

    info = header(f"batch {args.batch_size}, eval batch {args.eval_batch}, {args.repeats} repeats")
    print(f"{'call':22s} {'median ms':>10s} {'ratio':>7s}  (to step; eval+units: to eval)")
    for name in fns:
        print(f"{name:22s} {1e3 * median[name]:10.1f} {ratio[name]:7.2f}")
    fields = {"median_s": median, "ratio": ratio, "first_call_s": compile_s, "times_s": times}
    common.write_json(args.out, {"machine": info, "args": vars(args) | {"out": str(args.out)}, **fields})


def main_job(args) -> None:
    result = job_cost(args)
    info = header(f"default job, {args.epochs} epoch(s), {args.repeats} repeats")
    print(
        f"{'variant':22s} {'median s':>9s} {'ratio':>7s} {'cpu ratio':>9s}  (train + eval seconds; "
        f"median of per-round ratios to plain)"
    )
    for name, sec in result["median_s"].items():
        print(f"{name:22s} {sec:9.2f} {result['ratio'][name]:7.3f} {result['cpu_ratio'][name]:9.3f}")
    common.write_json(args.out, {"machine": info, "args": vars(args) | {"out": str(args.out)}, **result})


def header(settings: str) -> dict:
    """Print the machine and this run's settings; the machine's record for the JSON."""
    info = common.machine(extra_packages=())
    common.print_header("bnstudy measurement cost", info)
    print(f"  {settings}")
    return info


if __name__ == "__main__":
    main()
