"""Write one study's report folder: summary.csv, runs.csv, comparisons.csv, table.md, table.tex, the figures,
README.md and verdict.json. Reports are regenerated, never edited."""

from __future__ import annotations

import json
from pathlib import Path

from bnstudy.analysis.analyse import Analysis
from bnstudy.analysis.figures import write_figures
from bnstudy.analysis.index import VERDICT_FILE, json_default, verdict_record
from bnstudy.analysis.load import LoadedRuns
from bnstudy.analysis.readme import readme
from bnstudy.analysis.tables import comparison_table, to_latex, wide_tables


def write_report(a: Analysis, runs: LoadedRuns, out: Path, command: str, data_note: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    a.summary[["table", *a.summary.columns.drop("table")]].to_csv(out / "summary.csv", index=False)
    a.comparisons.to_csv(out / "comparisons.csv", index=False)
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
    return out
