"""`bnstudy-report`'s command line: write a study's report (tables, figures, README with the verdict) or the index.

    python -m bnstudy.report STUDY [--runs DIR] [--out DIR] [--dataset NAME]
    python -m bnstudy.report STUDY --source wandb [--entity E] [--project P] [--group G]
    python -m bnstudy.report --index results/     # the verdict table atop results/README.md
    python -m bnstudy.report STUDY ... [--wandb-mode offline|online|disabled | --no-wandb]  # also a wandb run

Writes `results/<study>/` (or --out): summary.csv, runs.csv, comparisons.csv, table.md, table.tex, figures
(PNG and SVG), verdict.json (the verdict in brief, for --index) and README.md with the claim, the verdict, the
effect sizes with their 95% intervals, the tables, the figures, the command that regenerates it and the
data/version facts of the runs. Needs only pandas, scipy, matplotlib, numpy and yaml: no training stack, no GPU.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import warnings
from pathlib import Path

from bnstudy.analysis.analyse import Analysis, analyse
from bnstudy.analysis.dashboard import MODES, log_report, report_run
from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.fingerprints import check_fingerprints
from bnstudy.analysis.index import network_label, write_index
from bnstudy.analysis.load import load_local, load_wandb
from bnstudy.analysis.readme import runs_used
from bnstudy.analysis.write import write_report
from bnstudy.app.config_tree import known_studies

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bnstudy-report",
        description="Turn a study's runs into a report: tables with 95% intervals, figures and a verdict on its claim.",
    )
    p.add_argument("study", nargs="?", help="study name, e.g. placement (experiments/<study>.yaml)")
    p.add_argument(
        "--index",
        type=Path,
        metavar="RESULTS",
        help="instead of a study: write the table of every report under RESULTS (their verdict.json) "
        "at the top of RESULTS/README.md",
    )
    p.add_argument(
        "--runs",
        type=Path,
        help="folder of run folders, or a raw-runs file runs.jsonl.gz (or a report folder holding one); "
        "default: <out-dir>/<study>",
    )
    p.add_argument("--out-dir", type=Path, default=Path("outputs"), help="training out_dir root (default: outputs)")
    p.add_argument(
        "--out",
        type=Path,
        help="report folder (default: results/<study>; for a quick variant "
        "<out-dir>/reports/<study>, never under results/)",
    )
    p.add_argument("--dataset", help="report the runs of this dataset only (needed when runs mix datasets)")
    p.add_argument("--data-note", help="a sentence about the data, printed at the top of the report")
    p.add_argument(
        "--allow-mixed-fingerprints",
        action="store_true",
        help="report runs trained at several code fingerprints together (refused by default; the README says so)",
    )
    p.add_argument("--source", choices=("local", "wandb"), default="local")
    p.add_argument("--entity", help="wandb entity (--source wandb)")
    p.add_argument("--project", default="bnstudy", help="wandb project (--source wandb; default bnstudy)")
    p.add_argument("--group", help="wandb group (--source wandb; default: the study name)")
    p.add_argument(
        "--wandb-mode",
        choices=MODES,
        default="offline",
        help="log the report as one wandb run (job_type report) in the runs' project and group: offline "
        "(default; upload later with `wandb sync`), online, or disabled",
    )
    p.add_argument(
        "--no-wandb", dest="wandb_mode", action="store_const", const="disabled", help="= --wandb-mode disabled"
    )
    return p.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "bnstudy.report", args.study]
    for flag in ("runs", "out_dir", "out", "dataset", "data_note"):
        value = getattr(args, flag)
        if value is not None and not (flag == "out_dir" and (args.runs or str(value) == "outputs")):
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    if args.allow_mixed_fingerprints:
        parts.append("--allow-mixed-fingerprints")
    if args.source == "wandb":
        parts += ["--source", "wandb", "--project", args.project]
        parts += [x for flag in ("entity", "group") if getattr(args, flag) for x in (f"--{flag}", getattr(args, flag))]
    return shlex.join(parts)


def _print_warning(message, category, *args, **kwargs) -> None:
    print(f"bnstudy-report: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        run(args)


def check_one_network(frame) -> None:
    """A study is decided on one network: runs of several (a 2-conv and a depth-6 CNN trained into one out_dir,
    e.g. `+network=cnn6` with `+preset=quick`, which both set it) are refused, naming them."""
    label = network_label(frame)
    if "+" in label:
        raise ReportError(
            f"the runs are of several networks: {label.replace('+', ', ')}. A report decides a claim on one network; "
            f"train each into its own out_dir (`+network=NAME` sets outputs/NAME) and report each folder alone."
        )


def report_folder(args: argparse.Namespace, analysis: Analysis) -> Path:
    """Where the report goes; a quick variant's report never lands in results/, which holds full grids only."""
    quick = "quick" in str(analysis.spec.get("variant", ""))
    if args.out is None:
        return (args.out_dir / "reports" / args.study) if quick else Path("results") / args.study
    if quick and any(args.out.resolve().is_relative_to(r.resolve()) for r in (REPO / "results", Path("results"))):
        raise ReportError(
            f"--out {args.out}: these are runs of the quick variant ({analysis.spec['variant']}); "
            f"results/ holds reports of full grids only. Write it elsewhere (default: "
            f"{args.out_dir / 'reports' / args.study})."
        )
    return args.out


def run(args: argparse.Namespace) -> None:
    try:
        if args.index is not None:
            path = write_index(args.index)
            print(f"index -> {path}")
            return
        if not args.study:
            raise ReportError("give a study name (e.g. `bnstudy-report placement`) or `--index RESULTS_DIR`.")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.study):
            raise ReportError(f"study name {args.study!r} must be a plain name like `placement`.")
        if args.source == "wandb":
            runs = load_wandb(args.entity, args.project, args.group or args.study, args.study)
        else:
            runs_dir = args.runs or args.out_dir / args.study
            if not runs_dir.exists() and args.study not in known_studies():
                known = ", ".join(known_studies())
                raise ReportError(f"unknown study {args.study!r} and no runs in {runs_dir}. Known studies: {known}.")
            if not runs_dir.exists():
                quick = args.out_dir / "quick" / args.study
                hint = f" Quick runs of it are in {quick}: add `--out-dir {quick.parent}`." if quick.is_dir() else ""
                raise ReportError(
                    f"no runs directory {runs_dir}: expected the run folders of study {args.study!r} there. Train "
                    f"them with `python -m bnstudy.train -m experiment={args.study}`, or point --runs at the folder "
                    f"that holds them.{hint}"
                )
            runs = load_local(runs_dir, args.study)
        check_fingerprints(runs.frame, args.allow_mixed_fingerprints)
        check_one_network(runs.frame)
        analysis = analyse(args.study, runs, args.dataset)
        out = write_report(analysis, runs, report_folder(args, analysis), command_line(args), args.data_note)
    except ReportError as e:
        print(f"bnstudy-report: {e}", file=sys.stderr)
        sys.exit(2)
    used = runs_used(analysis)
    unfinished = f"; {len(analysis.runs) - used} not finished" if used != len(analysis.runs) else ""
    print(f"{args.study}: {analysis.verdict} ({used} runs used{unfinished}) -> {out / 'README.md'}")
    log_to_wandb(args, analysis, out)


def log_to_wandb(args: argparse.Namespace, analysis: Analysis, out: Path) -> None:
    """The report as one wandb run (bnstudy.analysis.dashboard), after its folder is written."""
    if args.wandb_mode == "disabled":
        return
    project = args.project if args.source == "wandb" else None
    run = report_run(analysis, out, project, args.entity)
    offline = log_report(run, args.wandb_mode)
    if offline is not None:
        print(f"wandb report run {run.id} (offline) -> {offline}; upload it with `wandb sync {offline}`")


if __name__ == "__main__":
    main()
