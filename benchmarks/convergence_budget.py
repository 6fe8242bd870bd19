"""The epoch budget a network converges in, per lr schedule: val/acc over epochs, the convergence criterion's
fraction, val/acc and test/acc at the end with the spread over seeds, and minutes per run on this machine.

Trains with the app itself (`python -m bnstudy.train`, one job per schedule and budget; the lrs and seeds a
pack), then reads the run folders. A constant lr is trained once for the longest budget: its curve gives every
shorter budget. A decaying schedule is shaped by its budget, so each budget is a job of its own.

    python benchmarks/convergence_budget.py --network cnn                    # the 2-conv CNN, ~30 min on 2 cores
    python benchmarks/convergence_budget.py --network cnn6 --budgets 3 5 10  # the depth-6 CNN
    python benchmarks/convergence_budget.py --network resnet20 --budgets 3 5 10
    python benchmarks/convergence_budget.py --network cnn --report-only      # tables and figure from the folders

The criterion is the studies' (`report.convergence` in experiments/*.yaml): val/acc changed by at most the
tolerance between the last two evaluations (one per epoch). Results go to benchmarks/results/convergence_<network>
.json, .md and .png; the run folders to --out-dir (default outputs/convergence_budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

NETWORKS = {  # name -> the model overrides
    "cnn": ["model=cnn"],
    "cnn6": ["model=cnn", "model.depth=6"],
    "resnet20": ["model=resnet"],
}
SCHEDULES = {  # name -> the schedule overrides (the shapes the studies declare)
    "constant": ["optimizer.schedule.name=constant"],
    "cosine": ["optimizer.schedule.name=cosine"],
    # batch_size and small_batch_norms: Goyal et al. (2017), 5 of 90 epochs of warmup, x0.1 at 30, 60, 80
    "step": ["optimizer.schedule={name: step, warmup: 0.056, milestones: [0.33, 0.67, 0.89], factor: 0.1}"],
}
TOLERANCE = 0.005  # the studies' `convergence: {key: val/acc, tolerance: 0.005}`
RESULTS = Path(__file__).parent / "results"


def job_command(network: str, schedule: str, epochs: int, lrs, seeds, out_dir: Path, extra=()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bnstudy.train",
        *NETWORKS[network],
        *SCHEDULES[schedule],
        f"train.epochs={epochs}",
        f"optimizer.lr=[{','.join(f'{x:g}' for x in lrs)}]",
        f"seed=[{','.join(str(s) for s in seeds)}]",
        f"study=budget_{network}_{schedule}_e{epochs}",
        f"out_dir={out_dir}",
        "logger.wandb.mode=disabled",
        *extra,
    ]


def jobs(network: str, schedules, budgets, lrs, seeds, out_dir: Path, extra=()) -> list[list[str]]:
    """A constant lr once at the longest budget; every other schedule once per budget."""
    out = []
    for schedule in schedules:
        for epochs in [max(budgets)] if schedule == "constant" else sorted(budgets):
            out.append(job_command(network, schedule, epochs, lrs, seeds, out_dir, extra))
    return out


def read_runs(out_dir: Path, network: str) -> list[dict]:
    """One row per finished run of `network`: its schedule, budget, lr, seed, val/acc per epoch, end values."""
    rows = []
    for study in sorted(out_dir.glob(f"budget_{network}_*")):
        for folder in sorted(p for p in study.iterdir() if (p / "summary.json").exists()):
            summary = json.loads((folder / "summary.json").read_text())
            if summary.get("status") not in ("done", "diverged"):
                continue
            config = yaml.safe_load((folder / "config.yaml").read_text())
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
            curve = [(r["epoch"], r["val/acc"]) for r in records if "val/acc" in r]
            rows.append(
                {
                    "schedule": config["optimizer"]["schedule"]["name"],
                    "epochs": config["train"]["epochs"],
                    "lr": config["optimizer"]["lr"],
                    "seed": config["seed"],
                    "status": summary["status"],
                    "val_acc": [v for _, v in sorted(curve)],
                    "test_acc": summary.get("test/acc"),
                    "minutes": summary["wall_time"] / 60,
                    "train_minutes": summary["train_time"] / 60,
                }
            )
    return rows


def converged(curve: list[float], upto: int) -> bool | None:
    """The criterion after `upto` epochs: val/acc changed by at most the tolerance over the last epoch."""
    if upto < 2 or len(curve) < upto:
        return None
    a, b = curve[upto - 2], curve[upto - 1]
    return math.isfinite(a) and math.isfinite(b) and abs(b - a) <= TOLERANCE


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def budget_rows(rows: list[dict], budgets) -> list[dict]:
    """Per schedule and budget: the converged fraction (all lrs), and at the best lr (mean val/acc at the end)
    val/acc and test/acc over seeds and the minutes per run. A constant lr's budget E is its curve at epoch E."""
    out = []
    for schedule in sorted({r["schedule"] for r in rows}):
        for epochs in sorted(budgets):
            if schedule == "constant":
                runs = [dict(r, end=r["val_acc"][epochs - 1]) for r in rows if r["schedule"] == schedule]
                runs = [r for r in runs if len(r["val_acc"]) >= epochs]
                minutes = lambda r, e=epochs: r["minutes"] * e / r["epochs"]  # noqa: E731 (training scales with epochs)
            else:
                runs = [
                    dict(r, end=r["val_acc"][-1]) for r in rows if r["schedule"] == schedule and r["epochs"] == epochs
                ]
                minutes = lambda r: r["minutes"]  # noqa: E731
            if not runs:
                continue
            flags = [converged(r["val_acc"], epochs) for r in runs]
            by_lr = {}
            for r in runs:
                by_lr.setdefault(r["lr"], []).append(r)
            best = max(by_lr, key=lambda lr: statistics.mean(r["end"] for r in by_lr[lr]))
            at_best = by_lr[best]
            out.append(
                {
                    "schedule": schedule,
                    "epochs": epochs,
                    "converged": sum(f is True for f in flags),
                    "runs": len(flags),
                    "best_lr": best,
                    "val_acc_best": mean_sd([r["end"] for r in at_best]),
                    "test_acc_best": mean_sd([r["test_acc"] for r in at_best])
                    if schedule != "constant" or epochs == max(budgets)
                    else "n/a",
                    "val_acc_by_lr": {lr: mean_sd([r["end"] for r in rs]) for lr, rs in sorted(by_lr.items())},
                    "minutes_per_run": statistics.mean(minutes(r) for r in runs),
                    "seeds": len(at_best),
                    "_best_mean": statistics.mean(r["end"] for r in at_best),
                }
            )
    return out


def epochs_to_converge(table: list[dict]) -> dict[str, int | None]:
    """Per schedule: the smallest budget from which on (at every larger budget measured too) the criterion holds
    for most runs and the best lr's mean val/acc at the end is within the tolerance of the longest budget's."""
    out = {}
    for schedule in sorted({t["schedule"] for t in table}):
        rows = sorted((t for t in table if t["schedule"] == schedule), key=lambda t: t["epochs"])
        ok = [t["converged"] * 2 > t["runs"] and t["gap_to_longest"] <= TOLERANCE for t in rows]
        first = None
        for i, t in enumerate(rows):
            if all(ok[i:]):
                first = t["epochs"]
                break
        out[schedule] = first
    return out


def with_gaps(table: list[dict]) -> list[dict]:
    """Each row's `gap_to_longest`: the longest budget's mean val/acc at its best lr minus this row's (same
    schedule): how much more training still buys."""
    for t in table:
        longest = max((u for u in table if u["schedule"] == t["schedule"]), key=lambda u: u["epochs"])
        t["gap_to_longest"] = longest["_best_mean"] - t["_best_mean"]
    return table


def markdown(network: str, table: list[dict], command: str) -> str:
    lines = [
        f"### {network}",
        "",
        "Tables from:",
        "",
        f"    {command}",
        "",
        "| schedule | epochs | converged (all lrs) | best lr | val/acc at best lr | below the longest | "
        "test/acc at best lr | val/acc per lr | min/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        per_lr = "; ".join(f"{lr:g}: {v}" for lr, v in t["val_acc_by_lr"].items())
        lines.append(
            f"| {t['schedule']} | {t['epochs']} | {t['converged']}/{t['runs']} | {t['best_lr']:g} | {t['val_acc_best']} "
            f"| {t['gap_to_longest']:+.4f} | {t['test_acc_best']} | {per_lr} | {t['minutes_per_run']:.2f} |"
        )
    lines += ["", "Epochs from which most runs meet the criterion and more epochs buy at most the tolerance: "]
    lines[-1] += ", ".join(f"{s} {e if e else 'not within the budgets'}" for s, e in epochs_to_converge(table).items())
    return "\n".join(lines) + "\n"


def figure(network: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = sorted({r["schedule"] for r in rows})
    fig, axes = plt.subplots(1, len(schedules), figsize=(5 * len(schedules), 3.6), sharey=True, squeeze=False)
    lrs = sorted({r["lr"] for r in rows})
    colors = dict(zip(lrs, plt.cm.viridis([i / max(len(lrs) - 1, 1) for i in range(len(lrs))])))
    for ax, schedule in zip(axes[0], schedules):
        budgets = sorted({r["epochs"] for r in rows if r["schedule"] == schedule})
        for epochs in budgets:
            for lr in lrs:
                runs = [r for r in rows if r["schedule"] == schedule and r["epochs"] == epochs and r["lr"] == lr]
                if not runs:
                    continue
                n = min(len(r["val_acc"]) for r in runs)
                xs = list(range(1, n + 1))
                mean = [statistics.mean(r["val_acc"][i] for r in runs) for i in range(n)]
                lo = [min(r["val_acc"][i] for r in runs) for i in range(n)]
                hi = [max(r["val_acc"][i] for r in runs) for i in range(n)]
                longest = epochs == max(budgets)
                label = f"lr {lr:g}" if longest else None
                ax.plot(
                    xs, mean, color=colors[lr], alpha=1.0 if longest else 0.5, lw=1.5 if longest else 1, label=label
                )
                if longest:
                    ax.fill_between(xs, lo, hi, color=colors[lr], alpha=0.15)
                else:
                    ax.plot(xs[-1:], mean[-1:], "o", color=colors[lr], ms=4)
        ax.set_title(f"{network}, {schedule}" + ("" if schedule == "constant" else " (dots: end of shorter budgets)"))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val/acc (mean over seeds, band: min-max)")
    axes[0][0].legend(loc="lower right")
    lows = [v for r in rows for v in r["val_acc"][1:] if math.isfinite(v)]
    if lows:
        axes[0][0].set_ylim(max(0.0, min(lows) - 0.01), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", choices=sorted(NETWORKS), default="cnn")
    p.add_argument("--schedules", nargs="+", choices=sorted(SCHEDULES), default=["constant", "cosine"])
    p.add_argument("--budgets", nargs="+", type=int, default=[3, 5, 10])
    p.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out-dir", type=Path, default=Path("outputs/convergence_budget"))
    p.add_argument("--override", nargs="*", default=[], help="more overrides for every job (e.g. a smoke test's)")
    p.add_argument("--report-only", action="store_true", help="only read the run folders (no training)")
    args = p.parse_args()
    if not args.report_only:
        for cmd in jobs(args.network, args.schedules, args.budgets, args.lrs, args.seeds, args.out_dir, args.override):
            print("+", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, env=os.environ.copy())  # finished runs are skipped on a re-run
    rows = read_runs(args.out_dir, args.network)
    table = with_gaps(budget_rows(rows, args.budgets))
    command = "python benchmarks/convergence_budget.py " + " ".join(sys.argv[1:])  # the tables' command
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"convergence_{args.network}"
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "table": table, "runs": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(args.network, table, command))
    figure(args.network, rows, stem.with_suffix(".png"))
    print(markdown(args.network, table, command))


if __name__ == "__main__":
    main()
