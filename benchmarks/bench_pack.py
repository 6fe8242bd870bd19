"""Packed training: K MNIST CNNs in one vmapped program vs the same K trained one after another.

    python benchmarks/bench_pack.py --out pack.json
    python benchmarks/bench_pack.py --quick
    python benchmarks/bench_pack.py --ks 1,4,16,64 --steps 20 --skip compile

1. pack     For each K: a pack of K models (`PackTrainer.train`) vs K separate `train` calls on one
            pack-of-1 trainer reusing its compiled program (what `train.pack_size=1` does), measured
            back to back. Aggregate model-examples/s (K x steps x batch / seconds) and the ratio
            packed/sequential, compile time excluded and included. Both use the loop that `loop=auto`
            picks (python on CPU, scan elsewhere). A K whose projected run time exceeds --budget is
            skipped and listed.
2. compile  Trace+lower and XLA compile seconds of each program of a pack (init, step, scan epoch,
            eval): a fresh subprocess compiles against a new, empty persistent-cache directory, then a
            second subprocess against the same directory.

The default run's MNIST CNN (`common.setup`: BN before ReLU, batch 128, SGD momentum 0.9) on random
MNIST-shaped data (speed, not accuracy). The per-model train step against PyTorch is `step_vs_torch.py`.
Needs only jax, flax, optax and numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import jax
import jax.numpy as jnp

from bnstudy.core.engine import HParams
from bnstudy.core.trainer import PackTrainer, resolve_loop

BATCH = common.BATCH

# (steps per measurement, Ks, seconds allowed for one packed-K measurement)
DEFAULTS = {
    ("cpu", False): (4, (1, 4, 16, 64), 360.0),
    ("cpu", True): (3, (1, 4, 8), 60.0),
    ("accel", False): (100, (1, 4, 16, 64), 300.0),
    ("accel", True): (30, (1, 4, 16, 64), 60.0),
}


# ----------------------------------------------------------------------------- 1. packed vs sequential


def projected_seconds(prev: dict | None, k: int, steps: int) -> float | None:
    """Packed-K train time extrapolated from the previous K, per-model step time growing as sqrt(K)
    (what XLA:CPU's grouped convolutions do); used only to skip a K that would not fit the budget."""
    if prev is None:
        return None
    per_model_step = prev["packed"]["train_s"] / (prev["k"] * steps)
    return per_model_step * (k / prev["k"]) ** 0.5 * k * steps


def train_packed(setup, data, steps, loop, k) -> dict:
    trainer = PackTrainer(setup, data, common.timing_schedule(steps, loop))
    t = trainer.train(HParams.stack(common.hparam_rows(k)), common.no_log).timings
    return {
        "compile_s": t["compile_time"],
        "train_s": t["train_time"],
        "eval_s": t["eval_time"],
        "wall_s": t["wall_time"],
    }


def train_sequential(trainer: PackTrainer, first: int, count: int) -> list[dict]:
    """Models first..first+count-1, each a separate `train` of the pack-of-1 trainer."""
    out = []
    for row in common.hparam_rows(first + count)[first:]:
        t = trainer.train(HParams.stack([row]), common.no_log).timings
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


def measure_pack(setup, data, steps, ks, budget_s) -> tuple[list[dict], list[dict]]:
    """For each K: packed K, then sequential models up to K (prefix of one sequence of single runs)."""
    loop = resolve_loop("auto")
    seq_trainer = PackTrainer(setup, data, common.timing_schedule(steps, loop))
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
            packed = train_packed(setup, data, steps, loop, k)
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


def compile_programs(k: int, steps: int) -> dict[str, dict[str, float]]:
    """Trace+lower and compile seconds of each program of a pack of K (done in a fresh process)."""
    setup = common.setup()
    data = common.random_data(steps * BATCH)
    trainer = PackTrainer(setup, data, common.timing_schedule(steps, "python"))
    hp = HParams.stack(common.hparam_rows(k))
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


def print_pack_table(rows: list[dict], skipped: list[dict]) -> None:
    if not rows:
        return
    print(
        f"\n1. K packed vs K one after another (loop={rows[0]['loop']}, {rows[0]['steps']} steps per model; "
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
        "\n2. compile per program (trace+lower / XLA compile, seconds), fresh process each, "
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


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and smaller K")
    ap.add_argument("--ks", type=str, default=None, help="comma-separated pack sizes, e.g. 1,4,16,64")
    ap.add_argument("--steps", type=int, default=None, help="training steps per measurement")
    ap.add_argument("--budget", type=float, default=None, help="max projected seconds for one packed-K run")
    ap.add_argument("--compile-ks", type=str, default="1", help="pack sizes for the compile-cache section")
    ap.add_argument("--skip", type=str, default="", help="comma-separated sections to skip: pack,compile")
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    ap.add_argument("--compile-probe", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-k", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def resolve_config(args) -> dict:
    kind = "cpu" if jax.default_backend() == "cpu" else "accel"
    steps, ks, budget = DEFAULTS[(kind, args.quick)]
    return {
        "quick": args.quick,
        "steps": args.steps or steps,
        "ks": [int(k) for k in args.ks.split(",")] if args.ks else list(ks),
        "budget_s": args.budget or budget,
        "compile_ks": [int(k) for k in args.compile_ks.split(",") if k],
        "skip": [s for s in args.skip.split(",") if s],
        "batch_size": BATCH,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compile_probe:
        compile_probe_main(args.compile_probe, args.probe_k, args.steps or 4)
        return {}
    common.quiet_logging()
    cfg = resolve_config(args)
    info = common.machine()
    common.print_header("bnstudy pack benchmark", info)
    print(f"  steps/measurement {cfg['steps']}, Ks {cfg['ks']}, budget {cfg['budget_s']:.0f} s per packed run")
    results: dict = {"machine": info, "config": cfg}
    if "pack" not in cfg["skip"]:
        setup, data = common.setup(), common.random_data(cfg["steps"] * BATCH)
        results["pack"], results["pack_skipped"] = measure_pack(setup, data, cfg["steps"], cfg["ks"], cfg["budget_s"])
    if "compile" not in cfg["skip"]:
        results["compile"] = measure_compile(cfg["compile_ks"], cfg["steps"])
    info["load_end"] = common.load()
    print(f"\nload at start {info['load_start'][0]:.2f}, at end {info['load_end'][0]:.2f}")
    print_pack_table(results.get("pack", []), results.get("pack_skipped", []))
    print_compile_table(results.get("compile", []))
    common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
