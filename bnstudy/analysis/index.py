"""A study's verdict in brief (verdict.json: claim, verdict, the deciding effect) and the index of every report
atop results/README.md (`bnstudy-report --index`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bnstudy.analysis.analyse import Analysis
from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.tables import fmt

VERDICT_FILE = "verdict.json"  # one study's verdict in brief, read by `--index`
FIXED_SEEDS = 5  # the fixed design the compute is weighed against: 5 seeds at every cell of the original grid


def json_default(x):
    return x.item() if isinstance(x, np.generic) else str(x)


def deciding_row(c: pd.DataFrame, verdict: str) -> pd.Series | None:
    """The comparison that decides the study's verdict: the weakest of the supporting ones (largest Holm p of
    support) when supported, the strongest contradiction when contradicted, and when inconclusive the
    inconclusive comparison furthest from support."""
    if c.empty:
        return None
    rows = c[c["verdict"] == verdict]
    rows = rows if len(rows) else c
    key, largest = ("p_contra_holm", False) if verdict == "contradicted" else ("p_support_holm", True)
    order = rows[key].fillna(np.inf if largest else -np.inf).sort_values(ascending=not largest, kind="stable")
    return rows.loc[order.index[0]]


def verdict_record(a: Analysis) -> dict:
    """What the index of all reports shows for this study: claim, verdict, the deciding effect and its n."""
    row = deciding_row(a.comparisons, a.verdict)
    record = {
        "study": a.study,
        "title": a.spec.get("title", a.study),
        "claim": a.spec["claim"],
        "verdict": a.verdict,
        "dataset": a.dataset,
        "variant": a.spec.get("variant", "default"),
        "verdict_sentence": a.verdict_sentence,
        "runs": int(len(a.runs)),
        "fixed_design_runs": fixed_design_runs(a),
        "deciding": None,
        "selections": [e.record() for e in a.edges],
        "comparisons": comparison_records(a.comparisons),
    }
    if row is not None:
        record["deciding"] = {
            k: (None if isinstance(row[k], float) and not math.isfinite(row[k]) else row[k])
            for k in (
                "metric",
                "comparison",
                "context",
                "expect",
                "estimate",
                "ci_low",
                "ci_high",
                "method",
                "n",
                "verdict",
            )
        }
    return record


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def comparison_records(c: pd.DataFrame) -> list[dict]:
    """Per comparison row: what it compares, its verdict, the looks taken (seeds), the seeds it was decided at,
    and for one still open at the schedule's maximum the seeds a fixed design would need."""
    keys = ["metric", "comparison", "context", "verdict", "looks", "decided_at", "seeds_needed", "along_value"]
    out = []
    for _, row in c.iterrows():
        record = {k: _finite(row[k]) for k in keys if k in row and not (k == "along_value" and pd.isna(row[k]))}
        if record.get("seeds_needed") is None:
            record.pop("seeds_needed", None)
        out.append(record)
    return out


def fixed_design_runs(a: Analysis) -> int:
    """Runs of the fixed design: FIXED_SEEDS seeds at every cell of the original grid. With a per-arm selection
    each arm counts as many settings as the arm searched least (grid extensions add settings to some arms)."""
    if not a.grid:
        return FIXED_SEEDS
    cells = a.runs.dropna(subset=a.grid)[a.grid].astype(str).drop_duplicates()
    if not a.edges:
        return FIXED_SEEDS * len(cells)
    arms = {tuple(sorted(e.filters.items())) for e in a.edges}
    return FIXED_SEEDS * len(arms) * min(len(e.searched) for e in a.edges)


# --------------------------------------------------------------------------------------------------- index

INDEX_START, INDEX_END = "<!-- bnstudy-report --index: start -->", "<!-- bnstudy-report --index: end -->"


def index_table(results: Path) -> str:
    """One row per report under `results` (each `<folder>/verdict.json`): claim, verdict, the verdict in words
    (each region of a claim that depends on an axis), deciding effect with its 95% interval, n and a link."""
    records = [(json.loads(p.read_text()), p.parent.name) for p in sorted(results.glob(f"*/{VERDICT_FILE}"))]
    if not records:
        raise ReportError(f"no reports under {results}: expected <study>/{VERDICT_FILE} written by bnstudy-report.")
    head = ["study", "claim", "verdict", "in words", "deciding effect [95% CI]", "n", "report"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, folder in records:
        d = r.get("deciding") or {}
        effect = (
            f"{d['comparison']} on `{d['metric']}` ({d['context']}): {fmt(d['estimate'])} "
            f"[{fmt(d['ci_low'])}, {fmt(d['ci_high'])}], expected {d['expect']}"
            if d
            else "no comparison"
        )
        n = f"{d.get('n', '-')} ({d.get('method', '-')})" if d else "-"
        variant = "" if r.get("variant", "default") == "default" else f" (variant: {r['variant']})"
        words = r.get("verdict_sentence") or r["verdict"]
        cells = [
            r["study"] + variant,
            r["claim"],
            f"**{r['verdict']}**",
            words,
            effect,
            n,
            f"[{folder}]({folder}/README.md)",
        ]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def write_index(results: Path) -> Path:
    """Put the index table at the top of `results/README.md`, between markers; the rest of the file (notes
    written by hand) is kept. A README without the markers gets the table above its text."""
    table = f"{INDEX_START}\n{index_table(results)}\n{INDEX_END}"
    readme_path = results / "README.md"
    text = readme_path.read_text() if readme_path.is_file() else ""
    if INDEX_START in text and INDEX_END in text:
        head, rest = text.split(INDEX_START, 1)
        text = head + table + rest.split(INDEX_END, 1)[1]
    else:
        text = f"# results\n\n{table}\n\n{text}"
    readme_path.write_text(text)
    return readme_path
