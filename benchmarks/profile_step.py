"""Where a model's train step spends its time on XLA: the step's profile, summed by kind of XLA op.

    python benchmarks/profile_step.py --model resnet20 [--steps 8] [--top 12] [--out profile.json]

Trains `--steps` steps of the app's step (the same warmed-up pack-of-1 `PackTrainer` as step_vs_torch.py's
`bnstudy app` rows, with bnstudy's XLA flags and malloc settings) under `jax.profiler`, then reads the trace
back (`jax.profiler.ProfileData`) and sums the durations of the XLA op events of every thread by kind: the
event name with its numeric suffix dropped (`transpose_copy_fusion.12` -> `transpose_copy_fusion`), per step.
Convolutions that XLA:CPU hands to Eigen run on Eigen's pool threads, which the trace does not attribute to
an op (their events mark only the launch): the table's `unattributed` row is the step's CPU time (wall time x
CPUs usable) minus the attributed op time, an upper bound on what the convolutions take. Needs jax, flax, optax, numpy only.

To see what an op kind computes, dump the optimized HLO of the same run:
`XLA_FLAGS=--xla_dump_to=DIR python benchmarks/profile_step.py ...` (bnstudy's flags are added to it).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path

import step_vs_torch

# Scheduling markers and the executor's spans around the ops, not ops.
NOT_OPS = re.compile(r"^(ThreadpoolListener|SlinkyThreadPool|ThunkExecutor|end: |\$)")
WORKER_LINE = re.compile(r"^tf_XLA")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20", help="cnn, cnn<depth> or resnet<depth> (default resnet20)")
    ap.add_argument("--steps", type=int, default=8, help="profiled train steps (default 8)")
    ap.add_argument("--top", type=int, default=12, help="op kinds shown (default 12)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    step_vs_torch.model_of(args.model)  # an unknown model fails here, before any compute
    if args.steps < 1 or args.top < 1:
        ap.error(f"--steps and --top must be at least 1, got {args.steps} and {args.top}")
    return args


def op_kind(event_name: str) -> str:
    """'transpose_copy_fusion.12' -> 'transpose_copy_fusion'."""
    return re.sub(r"(\.\d+)+$", "", event_name)


def op_seconds_by_kind(xplane: Path) -> dict[str, float]:
    """Seconds per op kind summed over the XLA worker threads of a trace."""
    from jax.profiler import ProfileData

    seconds: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(str(xplane)).planes:
        for line in plane.lines:
            if not WORKER_LINE.match(line.name):
                continue
            for e in (e for e in line.events if not NOT_OPS.match(e.name)):
                seconds[op_kind(e.name)] += e.duration_ns * 1e-9
    return dict(seconds)


def profile(model: str, steps: int, cpus: int) -> dict:
    """Profile one epoch of `steps` train steps of `model` on `cpus` CPUs; times per step in ms."""
    import jax

    run, _, _ = step_vs_torch.app_step_run(steps, "auto", model)
    run()  # one more warm epoch, so that the traced one finds everything allocated
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        train_s = run()
        jax.profiler.stop_trace()
        (xplane,) = Path(trace_dir).rglob("*.xplane.pb")
        seconds = op_seconds_by_kind(xplane)
    per_step = {k: 1e3 * s / steps for k, s in sorted(seconds.items(), key=lambda kv: -kv[1])}
    step_ms = 1e3 * train_s / steps
    unattributed = max(0.0, step_ms * cpus - sum(per_step.values()))
    return {"model": model, "steps": steps, "step_ms": step_ms, "cpus": cpus,
            "op_ms_per_step": per_step, "unattributed_ms_per_step": unattributed}  # fmt: skip


def print_profile(result: dict, top: int) -> None:
    step, cpu_ms = result["step_ms"], result["step_ms"] * result["cpus"]
    print(f"\n{result['model']}: {step:.1f} ms a train step ({result['steps']} steps profiled), "
          f"{cpu_ms:.1f} CPU-ms a step on {result['cpus']} CPUs\n")  # fmt: skip
    print("| op kind | ms/step (all threads) | share of the step's CPU time |\n|---|---|---|")
    rows = list(result["op_ms_per_step"].items())
    for kind, ms in rows[:top]:
        print(f"| {kind} | {ms:.1f} | {ms / cpu_ms:.0%} |")
    rest = sum(ms for _, ms in rows[top:])
    if rest:
        print(f"| ({len(rows) - top} other kinds) | {rest:.1f} | {rest / cpu_ms:.0%} |")
    un = result["unattributed_ms_per_step"]
    print(f"| unattributed (Eigen convolutions, idle) | {un:.1f} | {un / cpu_ms:.0%} |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    step_vs_torch.set_process_settings()
    import common

    common.quiet_logging()
    info = common.machine(extra_packages=())
    common.print_header("profile_step", info)
    result = {**profile(args.model, args.steps, info["cpus_usable"]), "machine": info}
    print_profile(result, args.top)
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
