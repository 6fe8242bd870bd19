"""bnstudy's train step as the app runs it vs the same CNN in PyTorch eager: the torch ratio table.

    python benchmarks/step_vs_torch.py --out step_vs_torch.json

The MNIST CNN (conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, dense128-BN-ReLU, dense10; BN before ReLU),
batch 128, SGD with momentum 0.9, random MNIST-shaped data. bnstudy rows are `PackTrainer.train` with a
pack of one model and `loop=python` (what `train.pack_size=auto` and `loop=auto` run on a CPU), one row
per `train.steps_per_call` (the one `auto` picks is marked), timed by the trainer's own `train_time`
(train steps only, no compile or evaluation), each in a worker subprocess of its own: none shares a
process with torch, whose OpenMP threads spin on after each torch op. One more bnstudy row is the app
itself: the default job (`python -m bnstudy.train`, 3 epochs on the embedded digits, wandb offline) in
a subprocess per round, its `summary.json` `step_time` (compare it with the fresh worker process of
`lever: defaults`); the last round's time breakdown is printed and kept, with the process's wall time
from spawn to exit (what a user waits for: it includes the interpreter's exit, which the breakdown
cannot). The torch row is `benchmarks/torch_reference.py`, whose loss is first checked to fall. All rows
are timed round-robin in one run, after a warm-up; the table gives the median ms per step and the ratio
torch ms / bnstudy ms (> 1: bnstudy is faster).

Levers, measured in the same rounds, each in its own subprocess (XLA reads its flags once, and malloc
its settings, at start), each changing one thing from bnstudy's defaults: each XLA:CPU flag
(`bnstudy.perf.xla_flags`) off in turn, glibc's malloc defaults (`bnstudy.perf.allocator` off), the first BN not
folded into the one-channel convolution, BN's gradient by autodiff instead of its closed form, XLA's
convolution for the one-channel first layer, and the pool as a reshape + max reduction or `nn.max_pool`.
Their ratio is to the subprocess with bnstudy's defaults. Needs jax, flax, optax, numpy; torch optional
(`pip install -e '.[bench]'`).

Deeper networks (`--models`, default the depth-6 CNN `cnn6` and ResNet-20 `resnet20`; `<cnn|resnet><depth>`):
rows `[<model>] bnstudy app` (steps_per_call auto), `[<model>] bnstudy app, XLA convolutions` (the same with
XLA's convolution for every shape instead of the forms bnstudy/core/conv_choice.py chose: what the choice
brings) and `[<model>] PyTorch eager` (torch_reference.build, the same layers), each bnstudy row's ratio to
torch; with `--deep-levers` each model's levers too, as `[<model>] lever: ...`.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="train steps per timed repeat (default 16, --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, --quick 3)")
    ap.add_argument("--ks", default=None, help="steps_per_call values, comma-separated (default 1,2,4,8; --quick 1,4)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, rounds and steps_per_call values")
    ap.add_argument("--no-levers", action="store_true", help="skip the XLA-flag and pool subprocesses")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    ap.add_argument("--no-app-job", action="store_true", help="skip the default-job row (python -m bnstudy.train)")
    ap.add_argument("--models", default="cnn6,resnet20", help="deeper models timed too, comma-separated ('' = none)")
    ap.add_argument("--deep-levers", action="store_true", help="time every lever on the deeper models as well")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "flags=on,pool=reshape"
    args = ap.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 16)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.ks = [int(k) for k in (args.ks or ("1,4" if args.quick else "1,2,4,8")).split(",")]
    args.models = [m for m in args.models.split(",") if m]
    for tag in args.models:
        model_of(tag)  # an unknown model fails here, before any worker starts
    return args


def model_of(tag: str) -> tuple[str, int | None]:
    """'cnn6' -> ('cnn', 6), 'resnet20' -> ('resnet', 20), 'cnn' -> ('cnn', None): model.name and model.depth."""
    name = tag.rstrip("0123456789")
    if name not in ("cnn", "resnet"):
        raise SystemExit(f"unknown model {tag!r}: expected cnn<depth> or resnet<depth>, e.g. cnn6, resnet20")
    return name, int(tag[len(name) :]) if tag != name else None


def set_process_settings(flags: str = "on", malloc_on: bool = True) -> None:
    """Before JAX starts: bnstudy's malloc settings as the app sets them, or not, and its speed flags:
    `flags` 'on' (all, as the app sets them), 'off' (none) or 'without:<flag name>' (all but that one)."""
    from bnstudy.perf import allocator, xla_flags

    if malloc_on:
        allocator.keep_freed_memory()
    if flags == "off":
        dropped = {xla_flags.flag_name(f) for f in xla_flags.CPU_FLAGS}
    else:
        dropped = {flags.removeprefix("without:")} if flags.startswith("without:") else set()
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if xla_flags.flag_name(f) not in dropped]
    os.environ["XLA_FLAGS"] = " ".join(kept)
    xla_flags.add_xla_flags([f for f in xla_flags.speed_flags() if xla_flags.flag_name(f) not in dropped])


def reshape_max_pool(x):
    """bnstudy's previous pool: a reshape and a `max` reduction (its backward counts ties by reduction)."""
    b, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def unfolded_batch_norm(conv, scale, bias, epsilon):
    """`kernels.batch_norm_train_one_channel_conv` without the folding: BN on the computed first conv map."""
    from bnstudy.core import kernels

    return kernels.batch_norm_train(conv.output(), scale, bias, epsilon)


def autodiff_batch_norm_train(x, scale, bias, epsilon):
    """`kernels.batch_norm_train` without its closed-form gradient: JAX differentiates the formula."""
    import jax

    from bnstudy.core import kernels

    mean, var = kernels.batch_stats(x)
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias, mean, var


def xla_conv3x3(x, kernel, bias):
    """`kernels.conv3x3_one_channel` as XLA's own convolution."""
    import jax

    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims) + bias


def swap_core_functions(pool: str, bn: str, conv: str, convs: str = "chosen") -> None:
    """Replace the model's pool ("flax": `nn.max_pool`, "reshape": reshape-max), its train-mode BN
    ("unfolded": not folded into the one-channel conv, "autodiff": unfolded and differentiated by JAX),
    its one-channel convolution ("xla") or the forms of its many-channel ones (`convs` "xla": XLA's for every
    shape, not bnstudy/core/conv_choice.py's); the models look each up when they trace."""
    import flax.linen as nn

    from bnstudy.core import conv_forms, kernels

    if conv == "xla":
        kernels.conv3x3_one_channel = xla_conv3x3
    if convs == "xla":
        conv_forms.chosen_forms = lambda *args, **kwargs: conv_forms.XLA

    if pool == "flax":
        kernels.max_pool_2x2 = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    elif pool == "reshape":
        kernels.max_pool_2x2 = reshape_max_pool
    if bn in ("unfolded", "autodiff"):
        kernels.batch_norm_train_one_channel_conv = unfolded_batch_norm
    if bn == "autodiff":
        kernels.batch_norm_train = autodiff_batch_norm_train


def app_step_run(steps: int, steps_per_call: int | str, model: str = "cnn"):
    """A warmed-up pack-of-1 `PackTrainer` of `model` (model_of) with loop=python; returns (run, compile
    seconds), where run() trains one epoch of `steps` steps and returns its train-step seconds."""
    import common

    from bnstudy.core.trainer import PackTrainer

    name, depth = model_of(model)
    data = common.random_data(steps * common.BATCH)
    setup = common.setup(common.build_model(name, depth=depth))
    trainer = PackTrainer(setup, data, common.timing_schedule(steps, "python", steps_per_call))
    hp = common.hparams([{"lr": 0.05}])
    compile_s = trainer.train(hp, common.no_log).timings["compile_time"]
    return (lambda: trainer.train(hp, common.no_log).timings["train_time"]), compile_s, trainer.steps_per_call


def app_job_run(steps: int):
    """The app's default job in a subprocess, warmed up once (data prepared, compile cache filled); returns
    (run, last) where run() trains it again and returns its summary's `step_time` x `steps` (the table
    divides by `steps`) and last() is the latest summary. None without the app's stack (Hydra, TFDS)."""
    if importlib.util.find_spec("hydra") is None or importlib.util.find_spec("tensorflow_datasets") is None:
        return None
    out = Path(tempfile.mkdtemp(prefix="bnstudy-bench-app-job-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    summaries: list[dict] = []

    def run() -> float:
        cmd = [sys.executable, "-m", "bnstudy.train", "train.rerun=true", "logger.progress=false", f"out_dir={out}"]
        # Output to a file, not a pipe: waiting for a pipe's end would also wait for the job's wandb child,
        # which may exit after the job (its runs' files are closed by then); a shell waits for the job only.
        with tempfile.TemporaryFile("w+") as log:
            t0 = time.perf_counter()
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
            outside = time.perf_counter() - t0  # spawn to exit, as a user waits for it
            log.seek(0)
            if done.returncode != 0:
                raise RuntimeError(f"the default job failed ({done.returncode}): {log.read()[-2000:]}")
        (path,) = out.glob("default/*/summary.json")
        summaries.append(json.loads(path.read_text()) | {"process_wall": outside})
        return summaries[-1]["step_time"] * steps

    run()
    return run, lambda: summaries[-1]


def worker_main(spec: str, steps: int) -> None:
    """Subprocess: train on request. Reads 'run' lines, answers 'RESULT <seconds>' lines."""
    opts = dict(kv.split("=") for kv in spec.split(","))
    set_process_settings(opts["flags"], opts["malloc"] == "on")
    swap_core_functions(opts["pool"], opts["bn"], opts["conv"], opts["convs"])
    k = opts.get("k", "auto")
    run, compile_s, _ = app_step_run(steps, int(k) if k.isdigit() else k, opts.get("model", "cnn"))
    print(f"RESULT {compile_s}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(f"RESULT {run()}", flush=True)


class Worker:
    """A worker subprocess with one lever setting; `run()` asks it to train once, returns its seconds."""

    def __init__(self, spec: str, steps: int):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--steps", str(steps)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.compile_s = self._answer()

    def _answer(self) -> float:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return float(line.split()[1])
        raise RuntimeError(f"benchmark worker exited with code {self.proc.wait()}")

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def torch_run(steps: int, data, model: str = "cnn"):
    """The PyTorch reference of `model` (model_of) on the same data, warmed up; None without torch."""
    try:
        import torch
        import torch_reference
    except ImportError:
        return None
    import numpy as np

    name, depth = model_of(model)
    images, labels = np.array(data.train_images), np.array(data.train_labels)
    trainer = torch_reference.TorchTrainer(images, labels, lr=0.05, model=name, depth=depth)
    n = len(trainer.labels)
    trainer.steps(torch.randperm(n), 128, min(2, steps))  # warm-up

    def run() -> float:
        perm = torch.randperm(n)
        t0 = time.perf_counter()
        trainer.steps(perm, 128, steps)  # reads every loss: waits for the last step
        return time.perf_counter() - t0

    return run


# Each of bnstudy.perf.xla_flags.CPU_FLAGS by name, and what switching it off brings back.
FLAG_LEVERS = {
    "xla_cpu_experimental_ynn_fusion_type": "YNN conv fusion back on",
    "xla_cpu_use_fusion_emitters": "MLIR fusion emitters back on",
}
DEFAULT_SPEC = dict(flags="on", malloc="on", pool="maxtree", bn="folded", conv="stencil", convs="chosen", k="auto")


def worker_spec(**change: str) -> str:
    """A worker's settings: bnstudy's defaults with `change` applied, as 'flags=on,malloc=on,...'."""
    return ",".join(f"{k}={v}" for k, v in (DEFAULT_SPEC | change).items())


def lever_specs(flags_measured: bool, model: str | None = None) -> dict[str, str]:
    """Row name -> worker spec (of `model`, when given); the first is bnstudy's defaults, each other changes
    one lever."""
    levers = {"defaults": {}}
    if flags_measured:
        for flag, what in FLAG_LEVERS.items():
            levers[f"XLA flag off ({what})"] = {"flags": f"without:{flag}"}
    levers["glibc malloc defaults (allocator.py off)"] = {"malloc": "off"}
    levers["BN not folded into the one-channel conv1"] = {"bn": "unfolded"}
    levers["BN unfolded, gradient by autodiff (no closed form)"] = {"bn": "autodiff"}
    levers["XLA convolution for the one-channel conv1"] = {"conv": "xla"}
    levers["reshape-max pool (max reduction)"] = {"pool": "reshape"}
    levers["nn.max_pool (select_and_scatter)"] = {"pool": "flax"}
    on = {} if model is None else {"model": model}
    return {name: worker_spec(**change, **on) for name, change in levers.items()}


def add_deep_rows(args, runs: dict, workers: dict, flags_measured: bool) -> dict:
    """Each of `args.models`: its bnstudy worker, its PyTorch row (whose loss must fall: {model: check}),
    and with `--deep-levers` its lever workers; rows named `[<model>] ...`."""
    checks = {}
    for tag in args.models:
        for row, spec in ((f"[{tag}] bnstudy app", {}), (f"[{tag}] bnstudy app, XLA convolutions", {"convs": "xla"})):
            workers[row] = Worker(worker_spec(model=tag, **spec), args.steps)
            runs[row] = workers[row].run
        trun = None if args.no_torch else torch_run(args.steps, common_data(args.steps), tag)
        if trun is not None:
            import torch_reference

            name, depth = model_of(tag)
            first, last = torch_reference.loss_falls(model=name, depth=depth)
            checks[tag] = {"loss_first": first, "loss_last": last, "falls": last < first}
            print(
                f"  [{tag}] torch reference loss {first:.3f} -> {last:.3f} ({'falls' if last < first else 'DOES NOT FALL'})"
            )
            runs[f"[{tag}] PyTorch eager"] = trun
        for lever, spec in lever_specs(flags_measured, tag).items() if args.deep_levers else ():
            workers[f"[{tag}] lever: {lever}"] = Worker(spec, args.steps)
            runs[f"[{tag}] lever: {lever}"] = workers[f"[{tag}] lever: {lever}"].run
    return checks


def common_data(steps: int):
    import common

    return common.random_data(steps * common.BATCH)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.worker:
        return worker_main(args.worker, args.steps)
    set_process_settings()  # as bnstudy-train does first thing
    import common
    import jax

    from bnstudy.perf import xla_flags

    common.quiet_logging()
    info = common.machine()
    common.print_header("bnstudy train step vs PyTorch eager", info)
    print(
        f"  MNIST CNN, BN before ReLU, batch {common.BATCH}, SGD momentum 0.9; {args.steps} steps x {args.repeats} rounds"
    )
    from bnstudy.core.trainer import resolve_steps_per_call

    # Every bnstudy row trains in a worker process of its own: torch's OpenMP threads keep spinning after
    # each torch op and slowed a jax step sharing their process (measured: benchmarks/README.md).
    runs: dict = {}
    workers: dict[str, Worker] = {}
    for k in args.ks:
        name = f"bnstudy app, steps_per_call={resolve_steps_per_call(k, args.steps)}"
        workers[name] = Worker(worker_spec(k=str(k)), args.steps)
        runs[name] = workers[name].run
    auto_k = resolve_steps_per_call("auto", args.steps)
    torch_check = None
    if not args.no_torch:
        trun = torch_run(args.steps, common.random_data(args.steps * common.BATCH))
        if trun is None:
            print("  torch is not installed (pip install -e '.[bench]'): bnstudy rows only")
        else:
            import torch_reference

            first, last = torch_reference.loss_falls()
            torch_check = {"loss_first": first, "loss_last": last, "falls": last < first}
            print(f"  torch reference loss {first:.3f} -> {last:.3f} ({'falls' if last < first else 'DOES NOT FALL'})")
            runs["PyTorch eager (torch_reference.py)"] = trun
    app_job = None if args.no_app_job else app_job_run(args.steps)
    if app_job is not None:
        runs["bnstudy-train default job, summary.json step_time"] = app_job[0]
    elif not args.no_app_job:
        print("  Hydra or TFDS is not installed: no default-job row")
    flags_measured = bool(xla_flags.speed_flags()) and jax.default_backend() == "cpu"
    if not args.no_levers:
        if not flags_measured:
            print("  XLA flag lever skipped: bnstudy sets no XLA flag on this backend/jaxlib")
        for name, spec in lever_specs(flags_measured).items():
            workers[f"lever: {name}"] = Worker(spec, args.steps)
            runs[f"lever: {name}"] = workers[f"lever: {name}"].run
    deep_checks = add_deep_rows(args, runs, workers, flags_measured)
    load_before = common.load()
    seconds = common.round_robin(runs, args.repeats)
    load_after = common.load()
    for w in workers.values():
        w.close()
    rows = table(seconds, args.steps, auto_k)
    print_table(rows, load_before, load_after, info)
    job_summary = app_job[1]() if app_job else None
    if job_summary:
        print_breakdown(job_summary)
    result = {
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "worker"} | {"batch_size": common.BATCH},
        "auto_steps_per_call": auto_k,
        "compile_s": {n: w.compile_s for n, w in workers.items()},
        "torch_loss_check": torch_check,
        "deep_torch_loss_checks": deep_checks,
        "load_before": load_before,
        "load_after": load_after,
        "seconds": seconds,
        "rows": rows,
        "default_job": job_summary
        and {k: job_summary[k] for k in ("step_time", "steps", "time_breakdown", "process_wall")},
    }
    common.write_json(args.out, result)
    return result


def table(seconds: dict[str, list[float]], steps: int, auto_k: int) -> list[dict]:
    """One row per variant: median ms/step, examples/s, torch ms / its ms (levers: defaults' ms / its ms)."""
    import common

    ms = {name: 1e3 * common.median(s) / steps for name, s in seconds.items()}
    rows = []
    for name, v in ms.items():
        model = name[: name.index("] ") + 2] if name.startswith("[") else ""  # "[resnet20] " or the CNN's ""
        base = name.removeprefix(model)
        torch_ms = next((t for n, t in ms.items() if n.startswith(model + "PyTorch")), None)
        ref = ms.get(model + "lever: defaults") if base.startswith("lever:") else torch_ms
        label = name + (" (auto)" if name == f"bnstudy app, steps_per_call={auto_k}" else "")
        rows.append(
            {
                "variant": label,
                "ms_per_step": v,
                "examples_per_s": common.BATCH / v * 1e3,
                "ratio": ref / v if ref else None,
            }
        )
    return rows


def print_table(rows: list[dict], load_before: list[float], load_after: list[float], info: dict) -> None:
    print(f"\n{'variant':48s} {'ms/step':>8s} {'examples/s':>10s} {'ratio':>6s}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        print(f"{r['variant']:48s} {r['ms_per_step']:8.1f} {r['examples_per_s']:10.0f} {ratio:>6s}")
    print(
        "ratio: PyTorch ms / this ms (> 1: bnstudy faster); levers: defaults' ms / this ms (> 1: this setting "
        f"beats bnstudy's defaults)\n{info['backend']} / {info['device_kind']}, {info['cpus_usable']} CPUs, "
        f"load {load_before[0]:.2f} before and {load_after[0]:.2f} after the timed rounds"
    )


def print_breakdown(summary: dict) -> None:
    """The default job's time line, as the app prints it, and its overhead against the issue's budget."""
    from bnstudy.perf.timing import breakdown_line

    t = summary["time_breakdown"]
    budget = 0.25 * t["train_steps"] + 5.0
    outside = summary["process_wall"]
    print(
        f"\ndefault job (last round): {breakdown_line(t)}\n  not train steps {t['wall'] - t['train_steps']:.1f} s "
        f"in the process, {outside - t['train_steps']:.1f} s from outside (spawn to exit: {outside:.1f} s) vs 25% "
        f"of train steps + 5 s = {budget:.1f} s; {summary['steps']} steps, "
        f"step_time {1e3 * summary['step_time']:.1f} ms"
    )


if __name__ == "__main__":
    main()
