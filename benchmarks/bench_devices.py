"""Pack throughput vs the number of devices a pack is split over (bnstudy.core.sharding via PackTrainer(mesh=)).

    python benchmarks/bench_devices.py --fake-cpu-devices 2 --pack 4 --steps 10   # CPU: scaling shape only
    python benchmarks/bench_devices.py --pack 64 --steps 50                        # a multi-GPU machine

For each device count 1, 2, 4, ... up to the local devices, the same pack of K models (K a multiple of the
count) runs `steps` compiled training steps on random MNIST-shaped data; the table gives model-examples/s
(K x steps x batch / seconds) and the speedup over one device. Counts are timed round-robin in one process.
On fake CPU devices (--fake-cpu-devices) every device shares the same cores, so only the shape of the curve
means anything, not the speedup. Needs only jax, flax, optax and numpy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--pack", type=int, default=4, help="models per pack (K)")
parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--fake-cpu-devices", type=int, default=0, help="split the CPU into this many devices")
args = parser.parse_args()
if args.fake_cpu_devices:  # XLA reads it once, before JAX starts its backend
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.fake_cpu_devices}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import jax
import jax.numpy as jnp
import numpy as np

from bnstudy.core import sharding, trainer

STEPS_PER_EPOCH = 4


def pack_trainer(devices: int) -> trainer.PackTrainer:
    data = common.random_data(args.batch * STEPS_PER_EPOCH, args.batch)
    setup = common.setup(batch_size=args.batch)
    schedule = common.timing_schedule(STEPS_PER_EPOCH, loop="python", steps_per_call=1, eval_batch=args.batch)
    mesh = sharding.pack_mesh(devices) if devices > 1 else None
    return trainer.PackTrainer(setup, data, schedule, mesh=mesh)


def timed_steps(pack: trainer.PackTrainer, state, hp, perm) -> tuple[object, float]:
    step = pack.compiled.step(state, hp, perm)
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, _ = step(state, hp, pack.data, perm, jnp.int32(i % pack.steps_per_epoch))
    jax.block_until_ready(state)
    return state, time.perf_counter() - t0


def main() -> None:
    available = jax.local_device_count()
    counts = [n for n in (1, 2, 4, 8, 16) if n <= available and args.pack % n == 0]
    hp = common.hparams([{"lr": 0.01, "seed": k} for k in range(args.pack)])
    runs = {}
    for n in counts:
        pack = pack_trainer(n)
        state, _ = pack.compile(hp)  # placed on the mesh; compiles the step
        placed = sharding.split_models(hp, pack.mesh)
        runs[n] = [pack, state, placed, pack.permutation(placed, 0)]
        runs[n][1], _ = timed_steps(*runs[n])  # warm-up
    seconds = {n: [] for n in counts}
    for _ in range(args.repeats):  # round-robin: each count sees the same machine state
        for n in counts:
            runs[n][1], s = timed_steps(*runs[n])
            seconds[n].append(s)
    print(f"backend={jax.default_backend()} devices={available} pack={args.pack} batch={args.batch} "
          f"steps={args.steps} repeats={args.repeats}")  # fmt: skip
    if jax.default_backend() == "cpu":
        print("fake CPU devices share the same cores: only the scaling shape means anything, not the speedup")
    base = None
    print(f"{'devices':>7} {'models/device':>13} {'median s':>9} {'model-examples/s':>17} {'vs 1':>6}")
    for n in counts:
        median = float(np.median(seconds[n]))
        rate = args.pack * args.steps * args.batch / median
        base = base or rate
        print(f"{n:>7} {args.pack // n:>13} {median:>9.3f} {rate:>17.0f} {rate / base:>6.2f}")


if __name__ == "__main__":
    main()
