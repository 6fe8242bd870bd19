"""Write one study's report folder: summary.csv, runs.csv, comparisons.csv, per_layer.csv (when a comparison
is of a layer mean), table.md, table.tex, the figures, README.md and verdict.json. Reports are regenerated, never edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bnstudy.analysis.analyse import Analysis
from bnstudy.analysis.figures import write_figures
from bnstudy.analysis.index import VERDICT_FILE, json_default, verdict_record
from bnstudy.analysis.load import LoadedRuns
from bnstudy.analysis.readme import readme
from bnstudy.analysis.tables import comparison_table, to_latex, wide_tables
from bnstudy.records import RAW_RUNS_FILE, write_raw_runs


def write_report(a: Analysis, runs: LoadedRuns, out: Path, command: str, data_note: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    a.summary[["table", *a.summary.columns.drop("table")]].to_csv(out / "summary.csv", index=False)
    a.comparisons.to_csv(out / "comparisons.csv", index=False)
    if not a.per_layer.empty:
        a.per_layer.to_csv(out / "per_layer.csv", index=False)
    # data_dir is a path on the machine that trained, meaningless to a reader.
    a.runs.drop(columns=["dataset.data_dir"], errors="ignore").to_csv(out / "runs.csv", index=False)
    tables = wide_tables(a)
    comp = comparison_table(a)
    md = [f"## {kind}\n\n{t.to_markdown(index=False)}\n" for kind, t in tables.items()]
    if not comp.empty:
        md.append(f"## comparisons (verdict: {a.verdict})\n\n{comp.to_markdown(index=False)}\n")
    (out / "table.md").write_text("\n".join(md))
    tex = [to_latex(t, f"{a.study}: {kind}; mean [95\\% t-interval] (n) over seeds") for kind, t in tables.items()]
    if not comp.empty:
        tex.append(
            to_latex(
                comp, f"{a.study}: comparisons, 95\\% intervals (paired or Welch), Holm-adjusted p; verdict {a.verdict}"
            )
        )
    (out / "table.tex").write_text("\n".join(tex))
    figures, notes = write_figures(a, runs, out)
    (out / "README.md").write_text(readme(a, tables, comp, figures, notes, command, data_note))
    (out / VERDICT_FILE).write_text(json.dumps(verdict_record(a), indent=1, default=json_default) + "\n")
    keep_raw_runs(a, out)
    return out


def keep_raw_runs(a: Analysis, out: Path) -> None:
    """The study's finished runs beside its report (bnstudy.records' raw-runs file), so that the report can be
    rewritten and the study resumed from a clone: packed from the run folders read, or copied from the raw-runs
    file they were read from. Runs read from wandb stay there."""
    target = out / RAW_RUNS_FILE
    paths = [str(p) for p in a.runs["path"]]
    sources = {Path(p.split("#", 1)[0]) for p in paths if "#" in p}
    if sources:
        for source in sources:  # one file: a report reads one raw-runs file
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
        return
    folders = [Path(p) for p in paths if Path(p).is_dir()]
    if folders:
        write_raw_runs(folders, target)
