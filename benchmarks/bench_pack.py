"""Benchmark of packed training: the MNIST CNN trained alone, packed K at a time, and in PyTorch.

What it measures, all in one process run so that the ratios share the machine's state:

1. step     per-model train-step time and examples/s of the MNIST CNN (conv32-BN-ReLU-pool,
            conv64-BN-ReLU-pool, dense128-BN-ReLU, dense10; norm=before_relu; batch 128; SGD with
            momentum 0.9) in bnstudy: the plain jitted `engine.train_step` in a Python loop and in a
            `lax.scan` (rolled and unrolled), the vmapped pack-of-1 programs of `PackTrainer`, and the
            whole `PackTrainer.train` with `loop=python` and `loop=scan`; against the same CNN in
            PyTorch eager when torch is importable. Variants are timed round-robin (repeat r of every
            variant, then repeat r+1, ...) so that a change in machine load hits them all alike.
2. pack     K models packed into one vmapped program vs the same K models trained one after another
            (K separate `PackTrainer.train` calls on one pack-of-1 trainer, reusing its compiled
            program: what `train.pack_size=1` does). Aggregate model-examples/s and packed/sequential
            ratio, compile time excluded and included. Packed K and the sequential runs it is compared
            with are measured back to back.
3. compile  compile time of each program (init, step, scan epoch, eval) of a pack, cold and with the
            JAX persistent compilation cache warm: a subprocess compiles against a fresh, empty
            temporary cache directory, then a second subprocess compiles against the same directory.
4. cpu1     (CPU backend only) bnstudy's step loops vs PyTorch eager on one core: a fresh subprocess
            pinned to one CPU (torch with 1 thread, XLA without multi-threaded Eigen), measured as
            process CPU time per step: a comparison that other jobs sharing the machine barely
            disturb, unlike wall time with both frameworks spreading over all cores.

Only the core is needed (jax, flax, optax, numpy; torch optional: `pip install -e '.[bench]'`). The data
are random uint8 MNIST-shaped images (28x28x1, 10 classes) generated on the device: the script
measures speed, not accuracy.

    python benchmarks/bench_pack.py                       # default (10-15 min on a 2-core CPU)
    python benchmarks/bench_pack.py --quick               # about 3 min on a 2-core CPU
    python benchmarks/bench_pack.py --ks 1,4,16,64 --steps 20 --out results.json

Defaults depend on the backend (CPU: 4 steps per measurement, --quick 3 steps and K up to 8;
accelerators: 100 steps); a packed K whose projected run time exceeds --budget is skipped and
reported. Every choice is printed and written to the JSON. On a busy machine wall-clock numbers are
noise: the header prints the load average and the core count, and warns when the load was high.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bnstudy import engine  # noqa: E402
from bnstudy.engine import ArrayData, HParams, Program  # noqa: E402
from bnstudy.models import build_model  # noqa: E402
from bnstudy.trainer import PackTrainer, Schedule, resolve_loop  # noqa: E402

BATCH = 128
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
TEST_EXAMPLES = BATCH  # the end-of-training evaluation is timed apart; keep it small

# (steps per measurement, repeats, Ks, seconds allowed for one packed-K measurement)
DEFAULTS = {
    ("cpu", False): (4, 5, (1, 4, 16, 64), 360.0),
    ("cpu", True): (3, 3, (1, 4, 8), 60.0),
    ("accel", False): (100, 5, (1, 4, 16, 64), 300.0),
    ("accel", True): (30, 3, (1, 4, 16, 64), 60.0),
}


# ----------------------------------------------------------------------------- setup


def noop_log(*_):
    pass


def make_data(num_train: int, seed: int = 0) -> ArrayData:
    """Random uint8 MNIST-shaped images and labels, generated on the default device."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    images = lambda k, n: jax.random.randint(k, (n, *IMAGE_SHAPE), 0, 256, jnp.int32).astype(jnp.uint8)
    labels = lambda k, n: jax.random.randint(k, (n,), 0, NUM_CLASSES, jnp.int32)
    data = ArrayData(images(k1, num_train), labels(k2, num_train), images(k3, TEST_EXAMPLES), labels(k4, TEST_EXAMPLES))
    return jax.block_until_ready(data)


def make_program() -> Program:
    model = build_model(
        "cnn",
        norm="before_relu",
        num_classes=NUM_CLASSES,
        dropout_placement="none",
        bn_momentum=0.9,
        bn_epsilon=1e-5,
        width=1.0,
        norm_kind="batch",
        norm_groups=8,
        bn_running_var="unbiased",
    )
    return Program(
        model=model, optimizer="sgd", momentum=0.9, batch_size=BATCH, input_mean=MNIST_MEAN, input_std=MNIST_STD
    )


def hparam_rows(k: int, offset: int = 0) -> list[dict]:
    """K distinct runs: seeds offset.., learning rates log-spaced in [0.01, 0.1]."""
    lrs = np.geomspace(0.01, 0.1, max(k, 2))
    return [
        {"lr": float(lrs[i]), "weight_decay": 5e-4, "init_scale": 1.0, "dropout_rate": 0.0, "seed": offset + i}
        for i in range(k)
    ]


def make_schedule(steps: int, loop: str) -> Schedule:
    return Schedule(
        epochs=1,
        eval_every=0,
        log_every=steps,
        eval_batch_size=TEST_EXAMPLES,
        loop=loop,
        max_steps_per_epoch=steps,
        probe_every=0,
        probe_multipliers=(),
        discrepancy=False,
        population_batches=1,
        discrepancy_train_subset=0,
        ics_every=0,
        eval_every_steps=0,
        dead_units=False,
        steps_per_call="auto",
    )


def machine_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    info = {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **git_state(),
    }
    return info


def git_state() -> dict[str, Any]:
    """The commit of the measured code and whether bnstudy/ had uncommitted changes (None without git)."""

    def git(*args):
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "bnstudy")
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "bnstudy_dirty": None}
    return {"git_sha": sha, "bnstudy_dirty": None if dirty is None else bool(dirty)}


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


class Section:
    """Wall time, process CPU time and load average around one part of the benchmark."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.load_before = os.getloadavg()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        print(f"\n== {self.name} (load {self.load_before[0]:.2f}) ==", flush=True)
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        self.record = {
            "wall_s": wall,
            "process_cpu_s": time.process_time() - self.cpu0,
            "loadavg_before": list(self.load_before),
            "loadavg_after": list(os.getloadavg()),
        }
        return False


# ----------------------------------------------------------------------------- 1. per-model step time


@dataclasses.dataclass
class Variant:
    """One way of training `steps` steps of the CNN: prepare() compiles and warms up, run() times."""

    name: str
    impl: str  # bnstudy | torch
    prepare: Callable[[], float]  # returns compile seconds
    run: Callable[[], float]  # returns seconds for `steps` steps
    note: str = ""


def plain_state(program: Program, hp_row: dict):
    hp = HParams(**{k: jnp.asarray(v, jnp.int32 if k == "seed" else jnp.float32) for k, v in hp_row.items()})
    state = jax.jit(partial(engine.init_state, program, IMAGE_SHAPE))(hp)
    return state, hp


def plain_step_variant(program, data, steps) -> Variant:
    """The unvmapped jitted `engine.train_step`, one Python call per step (donating the state)."""
    st: dict[str, Any] = {}

    def prepare():
        state, hp = plain_state(program, hparam_rows(1)[0])
        perm = engine.epoch_permutation(hp.seed, 0, data.train_images.shape[0])
        t0 = time.perf_counter()
        fn = jax.jit(partial(engine.train_step, program), donate_argnums=0)
        compiled = fn.lower(state, hp, data, perm, jnp.int32(0)).compile()
        st.update(fn=compiled, state=state, hp=hp, perm=perm)
        return time.perf_counter() - t0

    def run():
        state = st["state"]
        t0 = time.perf_counter()
        for i in range(steps):
            state, _ = st["fn"](state, st["hp"], data, st["perm"], jnp.int32(i))
        jax.block_until_ready(state)
        st["state"] = state
        return time.perf_counter() - t0

    return Variant("plain jit step, python loop", "bnstudy", prepare, run, "engine.train_step, no vmap")


def plain_scan_variant(program, data, steps, unroll: bool) -> Variant:
    """The unvmapped step inside one `lax.scan` over `steps` steps (rolled, or fully unrolled)."""
    st: dict[str, Any] = {}

    def epoch(state, hp, data, perm):
        body = lambda s, i: engine.train_step(program, s, hp, data, perm, i)
        return jax.lax.scan(body, state, jnp.arange(steps), unroll=unroll)

    def prepare():
        state, hp = plain_state(program, hparam_rows(1)[0])
        perm = engine.epoch_permutation(hp.seed, 0, data.train_images.shape[0])
        t0 = time.perf_counter()
        compiled = jax.jit(epoch, donate_argnums=0).lower(state, hp, data, perm).compile()
        st.update(fn=compiled, state=state, hp=hp, perm=perm)
        return time.perf_counter() - t0

    def run():
        t0 = time.perf_counter()
        state, metrics = st["fn"](st["state"], st["hp"], data, st["perm"])
        jax.block_until_ready((state, metrics))
        st["state"] = state
        return time.perf_counter() - t0

    name = f"plain lax.scan{' unroll=True' if unroll else ''}"
    return Variant(name, "bnstudy", prepare, run, "no vmap; one call per measurement")


def pack1_compiled_variant(program, data, steps, loop: str) -> Variant:
    """`PackTrainer`'s own compiled vmapped pack-of-1 program, called without the trainer's host loop."""
    st: dict[str, Any] = {}

    def prepare():
        trainer = PackTrainer(program, data, make_schedule(steps, loop))
        hp = HParams.stack(hparam_rows(1))
        state, compile_s = trainer.compile(hp)
        perm = trainer.permutation(hp, 0)
        program_of_loop = trainer.compiled_epoch if loop == "scan" else trainer.compiled_step
        st.update(trainer=trainer, hp=hp, state=state, perm=perm, compiled=program_of_loop(state, hp, perm))
        return compile_s

    def run():
        compiled, hp, perm = st["compiled"], st["hp"], st["perm"]
        state = st["state"]
        t0 = time.perf_counter()
        if loop == "scan":
            state, metrics = compiled(state, hp, data, perm)
            jax.block_until_ready((state, metrics))
        else:
            for i in range(steps):
                state, _ = compiled(state, hp, data, perm, jnp.int32(i))
            jax.block_until_ready(state)
        st["state"] = state
        return time.perf_counter() - t0

    name = "pack K=1 jit(vmap(step)), python loop" if loop == "python" else "pack K=1 jit(vmap) lax.scan"
    return Variant(name, "bnstudy", prepare, run, "PackTrainer's compiled program (init + compile)")


def trainer_variant(program, data, steps, loop: str) -> Variant:
    """The whole `PackTrainer.train` for K=1 (permutation, steps, metric transfers, logging)."""
    st: dict[str, Any] = {}

    def prepare():
        st["trainer"] = PackTrainer(program, data, make_schedule(steps, loop))
        st["hp"] = HParams.stack(hparam_rows(1))
        return st["trainer"].train(st["hp"], noop_log).timings["compile_time"]

    def run():
        return st["trainer"].train(st["hp"], noop_log).timings["train_time"]

    return Variant(
        f"PackTrainer.train K=1 loop={loop}", "bnstudy", prepare, run, "train_time: excludes compile and eval"
    )


def torch_variant(data, steps) -> Variant | None:
    """The same CNN in PyTorch eager, same batch size, SGD(momentum 0.9), BN momentum 0.1, eps 1e-5."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    st: dict[str, Any] = {}

    def block(layer, bn):
        return [layer, bn, nn.ReLU()]

    def prepare():
        torch.manual_seed(0)
        model = nn.Sequential(
            *block(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32, momentum=0.1, eps=1e-5)),
            nn.MaxPool2d(2),
            *block(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64, momentum=0.1, eps=1e-5)),
            nn.MaxPool2d(2),
            nn.Flatten(),
            *block(nn.Linear(64 * 7 * 7, 128), nn.BatchNorm1d(128, momentum=0.1, eps=1e-5)),
            nn.Linear(128, NUM_CLASSES),
        ).to(device)
        images = torch.from_numpy(np.array(data.train_images)).permute(0, 3, 1, 2).contiguous().to(device)
        labels = torch.from_numpy(np.array(data.train_labels)).long().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        st.update(model=model, images=images, labels=labels, opt=opt, gen=torch.Generator().manual_seed(0))
        run()  # warm-up: allocator, kernels
        return 0.0

    def run():
        model, opt, images, labels = st["model"], st["opt"], st["images"], st["labels"]
        model.train()
        perm = torch.randperm(images.shape[0], generator=st["gen"]).to(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            x = (images[idx].float() / 255.0 - MNIST_MEAN[0]) / MNIST_STD[0]
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()
        sync()
        return time.perf_counter() - t0

    note = f"torch {torch.__version__} eager on {device}, {torch.get_num_threads()} threads"
    return Variant("PyTorch eager", "torch", prepare, run, note)


def measure_step(program, data, steps, repeats, unroll_scan: bool) -> list[dict]:
    # The fast python-loop variants and torch come first and next to each other, so that within a
    # round they see nearly the same machine; the slow scan variants follow.
    variants = [
        plain_step_variant(program, data, steps),
        pack1_compiled_variant(program, data, steps, "python"),
        trainer_variant(program, data, steps, "python"),
    ]
    tv = torch_variant(data, steps)
    if tv is None:
        print("  torch not importable: no PyTorch comparison (pip install -e '.[bench]')")
    else:
        variants.append(tv)
    if unroll_scan:
        variants.append(plain_scan_variant(program, data, steps, unroll=True))
    variants += [
        plain_scan_variant(program, data, steps, unroll=False),
        pack1_compiled_variant(program, data, steps, "scan"),
        trainer_variant(program, data, steps, "scan"),
    ]
    compile_s = {}
    for v in variants:
        compile_s[v.name] = v.prepare()
        v.run()  # warm-up run, untimed
        print(f"  prepared {v.name} (compile {compile_s[v.name]:.2f} s)", flush=True)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(repeats):  # round-robin: repeat r of every variant before repeat r+1
        for v in variants:
            times[v.name].append(v.run() / steps)
    rows = []
    for v in variants:
        med = statistics.median(times[v.name])
        rows.append(
            {
                "name": v.name,
                "impl": v.impl,
                "note": v.note,
                "steps": steps,
                "repeats": repeats,
                "compile_s": compile_s[v.name],
                "step_s_median": med,
                "step_s_min": min(times[v.name]),
                "step_s_all": times[v.name],
                "examples_per_s": BATCH / med,
            }
        )
    torch_row = next((r for r in rows if r["impl"] == "torch"), None)
    for r in rows:
        r["speedup_vs_torch"] = torch_row["step_s_median"] / r["step_s_median"] if torch_row else None
    return rows


# ----------------------------------------------------------------------------- 2. packed vs sequential


def projected_seconds(prev: dict | None, k: int, steps: int) -> float | None:
    """Packed-K train time extrapolated from the previous K, per-model step time growing as sqrt(K)
    (what XLA:CPU's grouped convolutions do); used only to skip a K that would not fit the budget."""
    if prev is None:
        return None
    per_model_step = prev["packed"]["train_s"] / (prev["k"] * steps)
    return per_model_step * (k / prev["k"]) ** 0.5 * k * steps


def train_packed(program, data, steps, loop, k) -> dict:
    trainer = PackTrainer(program, data, make_schedule(steps, loop))
    t = trainer.train(HParams.stack(hparam_rows(k)), noop_log).timings
    return {
        "compile_s": t["compile_time"],
        "train_s": t["train_time"],
        "eval_s": t["eval_time"],
        "wall_s": t["wall_time"],
    }


def train_sequential(trainer: PackTrainer, first: int, count: int) -> list[dict]:
    """Models first..first+count-1, each a separate `train` of the pack-of-1 trainer."""
    out = []
    for row in hparam_rows(first + count)[first:]:
        t = trainer.train(HParams.stack([row]), noop_log).timings
        out.append({"compile_s": t["compile_time"], "train_s": t["train_time"], "eval_s": t["eval_time"]})
    return out


def pack_row(k, steps, packed, seq_runs, loop) -> dict:
    examples = k * steps * BATCH
    seq = {
        "first_compile_s": seq_runs[0]["compile_s"],
        "compile_s": sum(r["compile_s"] for r in seq_runs),  # first compile + K-1 cache hits, as pack_size=1 runs
        "train_s": sum(r["train_s"] for r in seq_runs),
        "eval_s": sum(r["eval_s"] for r in seq_runs),
    }
    for d in (packed, seq):
        d["model_examples_per_s"] = examples / d["train_s"]
        d["model_examples_per_s_incl_compile"] = examples / (d["train_s"] + d["compile_s"])
        d["per_model_step_s"] = d["train_s"] / (k * steps)
    return {
        "k": k,
        "steps": steps,
        "loop": loop,
        "packed": packed,
        "sequential": seq,
        "ratio": packed["model_examples_per_s"] / seq["model_examples_per_s"],
        "ratio_incl_compile": packed["model_examples_per_s_incl_compile"] / seq["model_examples_per_s_incl_compile"],
    }


def measure_pack(program, data, steps, ks, budget_s) -> tuple[list[dict], list[dict]]:
    """For each K: packed K, then sequential models up to K (prefix of one sequence of single runs)."""
    loop = resolve_loop("auto")
    seq_trainer = PackTrainer(program, data, make_schedule(steps, loop))
    seq_runs: list[dict] = []
    rows, skipped, prev = [], [], None
    for k in sorted(ks):
        est = projected_seconds(prev, k, steps)
        if est is not None and est > budget_s:
            reason = f"projected {est:.0f} s for the packed run > budget {budget_s:.0f} s (--budget)"
            skipped.append({"k": k, "reason": reason})
            print(f"  K={k}: skipped, {reason}", flush=True)
            continue
        try:
            packed = train_packed(program, data, steps, loop, k)
        except Exception as e:  # out of device memory shows up as an XLA runtime error
            skipped.append({"k": k, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"  K={k}: failed ({skipped[-1]['reason']})", flush=True)
            break
        seq_runs += train_sequential(seq_trainer, len(seq_runs), k - len(seq_runs))
        prev = pack_row(k, steps, packed, seq_runs[:k], loop)
        prev["loadavg_after"] = list(os.getloadavg())
        rows.append(prev)
        print(
            f"  K={k}: packed {packed['train_s']:.2f} s + compile {packed['compile_s']:.2f} s; "
            f"sequential {prev['sequential']['train_s']:.2f} s + compile {prev['sequential']['compile_s']:.2f} s; "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    return rows, skipped


# ----------------------------------------------------------------------------- 3. compile, cold vs warm cache


def compile_programs(k: int, steps: int) -> dict[str, dict[str, float]]:
    """Trace+lower and compile seconds of each program of a pack of K (done in a fresh process)."""
    program = make_program()
    data = make_data(steps * BATCH)
    trainer = PackTrainer(program, data, make_schedule(steps, "python"))
    hp = HParams.stack(hparam_rows(k))
    out = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        out[name] = {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}
        return compiled

    programs = trainer.programs
    state = timed("init", programs.init, hp)(hp)
    perm = trainer.permutation(hp, 0)
    timed("step", programs.step, state, hp, data, perm, jnp.int32(0))
    timed("epoch_scan", programs.epoch, state, hp, data, perm)
    images, labels, mask = (a[0] for a in trainer.evaluator.running_batches["test"])
    timed("eval", trainer.evaluator.programs.sums, state.params, state.batch_stats, images, labels, mask)
    return out


def compile_probe_main(cache_dir: str, k: int, steps: int) -> None:
    """Subprocess entry: compile with the persistent cache in `cache_dir`, print JSON on the last line."""
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    result = compile_programs(k, steps)
    print(json.dumps(result))


def run_probe(cache_dir: str, k: int, steps: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--compile-probe",
        cache_dir,
        "--probe-k",
        str(k),
        "--steps",
        str(steps),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"compile probe failed: {proc.stderr[-2000:]}")
    return {"programs": json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - t0}


def measure_compile(ks: list[int], steps: int) -> list[dict]:
    rows = []
    for k in ks:
        with tempfile.TemporaryDirectory(prefix="bnstudy-jax-cache-") as cache_dir:
            cold = run_probe(cache_dir, k, steps)
            entries = len(os.listdir(cache_dir))
            warm = run_probe(cache_dir, k, steps)
        for name in cold["programs"]:
            c, w = cold["programs"][name], warm["programs"][name]
            rows.append(
                {
                    "k": k,
                    "program": name,
                    "cold_lower_s": c["lower_s"],
                    "cold_compile_s": c["compile_s"],
                    "warm_lower_s": w["lower_s"],
                    "warm_compile_s": w["compile_s"],
                    "cache_entries": entries,
                    "cold_process_wall_s": cold["process_wall_s"],
                    "warm_process_wall_s": warm["process_wall_s"],
                }
            )
        print(
            f"  K={k}: cold process {cold['process_wall_s']:.1f} s, warm process {warm['process_wall_s']:.1f} s, "
            f"{entries} cache entries",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------- 4. one thread, CPU time

SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def single_thread_probe_main(steps: int, repeats: int) -> None:
    """Subprocess entry (XLA_FLAGS set by the parent): pin to one core before the backend starts,
    then CPU seconds per step of each variant, JSON on the last line."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    program, data = make_program(), make_data(steps * BATCH)
    # Pure step loops only: process CPU time would also count `PackTrainer.train`'s init and eval.
    variants = [plain_step_variant(program, data, steps), pack1_compiled_variant(program, data, steps, "python")]
    tv = torch_variant(data, steps)
    if tv is not None:
        import torch

        torch.set_num_threads(1)
        tv = torch_variant(data, steps)  # note records the thread count
        variants.append(tv)
    for v in variants:
        v.prepare()
        v.run()
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            c0 = time.process_time()
            wall[v.name].append(v.run() / steps)
            cpu[v.name].append((time.process_time() - c0) / steps)
    print(
        json.dumps(
            {v.name: {"impl": v.impl, "note": v.note, "cpu_s": cpu[v.name], "wall_s": wall[v.name]} for v in variants}
        )
    )


def measure_single_thread(steps: int, repeats: int) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}".strip())
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--single-thread-probe",
        "--steps",
        str(steps),
        "--repeats",
        str(repeats),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"single-thread probe failed: {proc.stderr[-2000:]}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [
        {
            "name": name,
            "impl": r["impl"],
            "note": r["note"],
            "xla_flags": env["XLA_FLAGS"],
            "cpu_s_median": statistics.median(r["cpu_s"]),
            "cpu_s_min": min(r["cpu_s"]),
            "wall_s_median": statistics.median(r["wall_s"]),
            "cpu_s_all": r["cpu_s"],
            "wall_s_all": r["wall_s"],
        }
        for name, r in raw.items()
    ]
    torch_row = next((r for r in rows if r["impl"] == "torch"), None)
    for r in rows:
        r["torch_cpu_over_this"] = torch_row["cpu_s_median"] / r["cpu_s_median"] if torch_row else None
    return rows


# ----------------------------------------------------------------------------- output


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def print_header(info: dict, cfg: dict) -> None:
    load = info["loadavg_start"]
    print(f"bnstudy pack benchmark on {info['backend']} / {info['device_kind']} (x{info['device_count']})")
    print(
        f"  jax {info['jax']}  flax {info['flax']}  optax {info['optax']}  numpy {info['numpy']}  torch {info['torch']}"
    )
    print(
        f"  {info['platform']}, python {info['python']}, {info['cpus_usable']}/{info['cpu_count']} CPUs usable, "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"  MNIST CNN norm=before_relu, batch {BATCH}, SGD momentum 0.9; generated uint8 data; "
        f"steps/measurement {cfg['steps']}, repeats {cfg['repeats']}, Ks {cfg['ks']}"
    )
    if load[0] > 0.5 * info["cpus_usable"]:
        print(f"  WARNING: load {load[0]:.2f} on {info['cpus_usable']} CPUs: another job is running; re-run when idle")


def print_step_table(rows: list[dict]) -> None:
    print(
        "\n1. per-model train step (median of repeats; examples/s = batch / median step; "
        "vs torch = torch step time / this step time)"
    )
    print(f"   {'variant':40s} {'step ms':>9s} {'min ms':>8s} {'ex/s':>8s} {'compile s':>9s} {'vs torch':>8s}")
    for r in rows:
        vs = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        print(
            f"   {r['name']:40s} {1e3 * r['step_s_median']:9.1f} {1e3 * r['step_s_min']:8.1f} "
            f"{fmt_rate(r['examples_per_s']):>8s} {r['compile_s']:9.2f} {vs:>8s}"
        )


def print_pack_table(rows: list[dict], skipped: list[dict]) -> None:
    if not rows:
        return
    print(
        f"\n2. K packed vs K one after another (loop={rows[0]['loop']}, {rows[0]['steps']} steps per model; "
        "model-examples/s = K*steps*batch / seconds)"
    )
    print(
        f"   {'K':>3s} {'packed ex/s':>12s} {'seq ex/s':>10s} {'ratio':>6s} | {'incl. compile: packed':>21s} "
        f"{'seq':>8s} {'ratio':>6s} | {'compile packed s':>16s} {'seq s':>6s}"
    )
    for r in rows:
        p, s = r["packed"], r["sequential"]
        print(
            f"   {r['k']:3d} {fmt_rate(p['model_examples_per_s']):>12s} {fmt_rate(s['model_examples_per_s']):>10s} "
            f"{r['ratio']:6.2f} | {fmt_rate(p['model_examples_per_s_incl_compile']):>21s} "
            f"{fmt_rate(s['model_examples_per_s_incl_compile']):>8s} {r['ratio_incl_compile']:6.2f} | "
            f"{p['compile_s']:16.2f} {s['compile_s']:6.2f}"
        )
    s0 = rows[0]["sequential"]
    print(
        f"   one compile of the pack-of-1 program (sequential): {s0['first_compile_s']:.2f} s; "
        f"later `train` calls reuse it ({(s0['compile_s'] - s0['first_compile_s']):.3f} s for the rest at K={rows[0]['k']})"
    )
    for s in skipped:
        print(f"   K={s['k']}: not measured ({s['reason']})")


def print_compile_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(
        "\n3. compile per program (trace+lower / XLA compile, seconds), fresh process each, "
        "persistent cache cold vs warm"
    )
    print(
        f"   {'K':>3s} {'program':12s} {'cold lower':>10s} {'cold compile':>12s} {'warm lower':>10s} {'warm compile':>12s}"
    )
    for r in rows:
        print(
            f"   {r['k']:3d} {r['program']:12s} {r['cold_lower_s']:10.2f} {r['cold_compile_s']:12.2f} "
            f"{r['warm_lower_s']:10.2f} {r['warm_compile_s']:12.2f}"
        )


def paired_ratio(num: dict, den: dict) -> dict[str, float]:
    """num/den step time: median over rounds of the ratio within a round (robust to load drifting
    between rounds), and the ratio of the best rounds (closest to an idle machine)."""
    per_round = [a / b for a, b in zip(num["step_s_all"], den["step_s_all"])]
    return {"paired_median": statistics.median(per_round), "of_minima": num["step_s_min"] / den["step_s_min"]}


def print_single_thread_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(
        "\n4. one core (process pinned to one CPU; XLA --xla_cpu_multi_thread_eigen=false; torch 1 thread): "
        "process CPU time per step"
    )
    print(f"   {'variant':40s} {'cpu ms':>8s} {'min ms':>8s} {'wall ms':>8s} {'torch cpu / this':>16s}")
    for r in rows:
        vs = f"{r['torch_cpu_over_this']:.2f}" if r["torch_cpu_over_this"] else "-"
        print(
            f"   {r['name']:40s} {1e3 * r['cpu_s_median']:8.1f} {1e3 * r['cpu_s_min']:8.1f} "
            f"{1e3 * r['wall_s_median']:8.1f} {vs:>16s}"
        )


def print_summary(step_rows: list[dict]) -> dict:
    by = {r["name"]: r for r in step_rows}
    loop = resolve_loop("auto")
    vmap1 = paired_ratio(by["pack K=1 jit(vmap(step)), python loop"], by["plain jit step, python loop"])
    summary: dict[str, Any] = {"vmap_k1_over_plain_step_time": vmap1, "app_loop": loop}
    print(
        f"\n   step time of the vmapped pack of 1 / plain step (python loop): {vmap1['paired_median']:.2f} "
        f"(median of per-round ratios), {vmap1['of_minima']:.2f} (ratio of minima)"
    )
    torch_row = next((r for r in step_rows if r["impl"] == "torch"), None)
    if torch_row:
        app = by[f"PackTrainer.train K=1 loop={loop}"]
        vs = paired_ratio(torch_row, app)
        summary["torch_over_app_step_time"] = vs
        print(
            f"   PyTorch eager step time / PackTrainer.train (loop={loop}, what the app runs here): "
            f"{vs['paired_median']:.2f} (median of per-round ratios), {vs['of_minima']:.2f} (ratio of minima); "
            ">1 means bnstudy is faster"
        )
    return summary


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer steps, repeats and smaller K")
    ap.add_argument("--ks", type=str, default=None, help="comma-separated pack sizes, e.g. 1,4,16,64")
    ap.add_argument("--steps", type=int, default=None, help="training steps per measurement")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per step variant")
    ap.add_argument("--budget", type=float, default=None, help="max projected seconds for one packed-K run")
    ap.add_argument("--compile-ks", type=str, default="1", help="pack sizes for the compile-cache section")
    ap.add_argument("--no-unroll", action="store_true", help="skip the fully unrolled lax.scan variant")
    ap.add_argument("--skip", type=str, default="", help="comma-separated sections to skip: step,pack,compile,cpu1")
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    ap.add_argument("--compile-probe", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-k", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--single-thread-probe", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def resolve_config(args) -> dict:
    kind = "cpu" if jax.default_backend() == "cpu" else "accel"
    steps, repeats, ks, budget = DEFAULTS[(kind, args.quick)]
    return {
        "quick": args.quick,
        "steps": args.steps or steps,
        "repeats": args.repeats or repeats,
        "ks": [int(k) for k in args.ks.split(",")] if args.ks else list(ks),
        "budget_s": args.budget or budget,
        "compile_ks": [int(k) for k in args.compile_ks.split(",") if k],
        "unroll_scan": not args.no_unroll,
        "skip": [s for s in args.skip.split(",") if s],
        "batch_size": BATCH,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compile_probe:
        compile_probe_main(args.compile_probe, args.probe_k, args.steps or 4)
        return {}
    if args.single_thread_probe:
        single_thread_probe_main(args.steps or 4, args.repeats or 5)
        return {}
    logging_quiet()
    cfg = resolve_config(args)
    info = machine_info()
    print_header(info, cfg)
    program, data = make_program(), make_data(cfg["steps"] * BATCH)
    results: dict[str, Any] = {"machine": info, "config": cfg, "sections": {}}
    t_start = time.perf_counter()
    if "step" not in cfg["skip"]:
        with Section("step") as sec:
            results["step"] = measure_step(program, data, cfg["steps"], cfg["repeats"], cfg["unroll_scan"])
        results["sections"]["step"] = sec.record
    if "pack" not in cfg["skip"]:
        with Section("pack") as sec:
            results["pack"], results["pack_skipped"] = measure_pack(
                program, data, cfg["steps"], cfg["ks"], cfg["budget_s"]
            )
        results["sections"]["pack"] = sec.record
    if "compile" not in cfg["skip"]:
        with Section("compile") as sec:
            results["compile"] = measure_compile(cfg["compile_ks"], cfg["steps"])
        results["sections"]["compile"] = sec.record
    if "cpu1" not in cfg["skip"] and jax.default_backend() == "cpu":
        with Section("cpu1: one core, CPU time") as sec:
            results["single_thread"] = measure_single_thread(cfg["steps"], cfg["repeats"])
        results["sections"]["cpu1"] = sec.record
    info["loadavg_end"] = list(os.getloadavg())
    results["total_wall_s"] = time.perf_counter() - t_start
    print(
        f"\nbnstudy pack benchmark on {info['backend']} / {info['device_kind']}, jax {info['jax']}, "
        f"{info['cpus_usable']} CPUs, load at start {info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}, "
        f"total {results['total_wall_s']:.0f} s"
    )
    if "step" in results:
        print_step_table(results["step"])
        results["summary"] = print_summary(results["step"])
    print_pack_table(results.get("pack", []), results.get("pack_skipped", []))
    print_compile_table(results.get("compile", []))
    print_single_thread_table(results.get("single_thread", []))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return results


def logging_quiet() -> None:
    import logging

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
