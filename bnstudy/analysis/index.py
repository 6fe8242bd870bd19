"""A study's verdict in brief (verdict.json: claim, verdict, the deciding effect) and the index of every report
atop results/README.md (`bnstudy-report --index`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bnstudy.analysis.analyse import Analysis
from bnstudy.analysis.edges import REASON_BOUND, REASON_FAILED
from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.fingerprints import fingerprint_counts
from bnstudy.analysis.stats import FAILURE_WORDS
from bnstudy.analysis.tables import fmt
from bnstudy.records import TRAINING_TIME_FILE
from bnstudy.schema import STANDARD_DEPTHS

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
    key, largest = ("p_contra_holm", False) if verdict in FAILURE_WORDS else ("p_support_holm", True)
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
        "network": network_label(a.runs),
        "verdict_sentence": a.verdict_sentence,
        "runs": int(len(a.runs)),
        "code_fingerprint": list(fingerprint_counts(a.runs)),
        "fixed_design_runs": fixed_design_runs(a),
        "deciding": None,
        "selections": [e.record() for e in a.edges],
        "comparisons": comparison_records(a.comparisons),
        "per_layer": per_layer_records(a.per_layer),
    }
    if a.phases is not None:  # disjoint by construction; recorded so that anyone can check it
        record["selection_seeds"] = a.phases.seeds
        record["confirmation_seeds"] = a.phases.confirmation_seeds
        record["one_phase_runs"] = one_phase_runs(a)
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


NETWORK_NAMES = {"cnn": "CNN", "resnet": "ResNet", "vgg": "VGG"}


def network_label(runs: pd.DataFrame) -> str:
    """The network of a study's runs, e.g. 'CNN-2' (the default digits CNN), 'CNN-6', 'ResNet-20'; several are
    joined with '+'."""
    if "model.name" not in runs or runs.empty:
        return "unknown"
    depth = runs["model.depth"] if "model.depth" in runs else pd.Series(np.nan, index=runs.index)
    labels = set()
    for name, d in zip(runs["model.name"].astype(str), depth, strict=True):
        d = STANDARD_DEPTHS.get(name) if d is None or (isinstance(d, float) and math.isnan(d)) else int(d)
        labels.add(f"{NETWORK_NAMES.get(name, name)}-{d}")
    return "+".join(sorted(labels))


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def per_layer_records(p: pd.DataFrame) -> list[dict]:
    """Per row of the per-layer table (bnstudy.analysis.per_layer): layer, metric, comparison, context and the
    contrast with its 95% interval (None where it has none). Descriptive: no verdict."""
    keys = ["layer", "metric", "comparison", "context", "estimate", "ci_low", "ci_high"]
    return [{k: _finite(float(r[k]) if k in keys[4:] else r[k]) for k in keys} for _, r in p.iterrows()]


def comparison_records(c: pd.DataFrame) -> list[dict]:
    """Per comparison row: what it compares, its verdict, the looks taken (seeds), the seeds it was decided at,
    and for one still open at the schedule's maximum the seeds a fixed design would need."""
    keys = ["metric", "comparison", "context", "verdict", "looks", "decided_at", "seeds_needed", "along_value", "note"]
    out = []
    for _, row in c.iterrows():
        record = {k: _finite(row[k]) for k in keys if k in row and not (k == "along_value" and pd.isna(row[k]))}
        for key in ("seeds_needed", "note"):
            if not record.get(key):
                record.pop(key, None)
        for key in ("seeds_needed", "decided_at"):  # seed counts, read back as floats beside a missing value
            if isinstance(record.get(key), float):
                record[key] = int(record[key])
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


def one_phase_runs(a: Analysis) -> int:
    """Runs the one-phase design would have trained for the same looks: every searched setting of every arm at
    every seed the looks reached (each look added its seeds to the whole grid), at least the selection seeds."""
    looks = [lk for lk in a.comparisons.get("looks", []) if isinstance(lk, list) and lk]
    seeds = max([len(a.phases.seeds), *(lk[-1] for lk in looks)])
    return int(len(a.phases.table) * seeds)


# --------------------------------------------------------------------------------------------------- index

INDEX_START, INDEX_END = "<!-- bnstudy-report --index: start -->", "<!-- bnstudy-report --index: end -->"


DEFAULT_NETWORK = "CNN-2"  # the network every study is designed on; any other is "the deep network"


def effect_cell(r: dict) -> str:
    d = r.get("deciding") or {}
    if not d:
        return "no comparison"
    return (
        f"{d['comparison']} on `{d['metric']}` ({d['context']}): {fmt(d['estimate'])} "
        f"[{fmt(d['ci_low'])}, {fmt(d['ci_high'])}], expected {d['expect']}"
    )


def looks_cell(r: dict) -> str:
    """The seeds each comparison was decided at and the looks taken, e.g. '7 seeds (looks 3, 5, 7)'."""
    parts = []
    for c in r.get("comparisons") or []:
        if c.get("decided_at") == 0:  # an arm trained at no searched setting: decided by the selection phase
            parts.append("by the selection (an arm never trained)")
            continue
        looks = c.get("looks") or []
        seeds = c.get("decided_at") or (looks[-1] if looks else None)
        open_ = "" if c.get("decided_at") else ", undecided"
        parts.append(f"{seeds} seeds (looks {', '.join(map(str, looks))}{open_})" if looks else "-")
    unique = list(dict.fromkeys(parts))
    return "; ".join(unique) if unique else "-"


def selections_cell(r: dict) -> str:
    """'yes (3 arms)' when every arm's selection is inside what it searched; 'yes, N at an edge that stands' when
    the others sit at an edge the runs explain (the next value failed, the bound was tried); else 'no' with each
    open edge (or arm where nothing trained) and its reason."""
    selections = r.get("selections") or []
    if not selections:
        return "no selection"
    edges = [s for s in selections if s.get("edge")]
    describe = lambda s: (
        f"{', '.join(f'{k}={v}' for k, v in s['filters'].items()) or 'all'} at the {s['edge']} edge "
        f"({s.get('edge_reason', 'no reason recorded')})"
    )
    standing = [s for s in edges if s.get("edge_reason") in (REASON_FAILED, REASON_BOUND)]
    open_ = [s for s in edges if s not in standing]
    if open_:
        return "no: " + "; ".join(map(describe, open_))
    if standing:
        return (
            f"yes ({len(selections)} arms; {len(standing)} at an edge that stands: "
            + "; ".join(map(describe, standing))
            + ")"
        )
    return f"yes ({len(selections)} arms)"


def verdict_cell(r: dict | None, with_network: bool) -> str:
    if r is None:
        return "not run"
    words = r.get("verdict_sentence") or r["verdict"]
    network = f" ({r.get('network', 'unknown')})" if with_network else ""
    return f"**{r['verdict']}**{network}: {words.split(': ', 1)[-1] if ': ' in words else words}"


def training_time_cell(results: Path, folder: str) -> str:
    """The study's training time summed over the sessions that trained it, e.g. '41 min (2 sessions)'."""
    path = results / folder / TRAINING_TIME_FILE
    try:
        kept = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "-"
    sessions = len(kept.get("sessions", []))
    return f"{kept['total_s'] / 60:.0f} min" + (f" ({sessions} sessions)" if sessions > 1 else "")


def index_records(results: Path) -> dict[tuple[str, str], dict[str, tuple[dict, str]]]:
    """(study + variant, dataset) -> network -> (verdict.json record, report folder), for every report."""
    # results/<study>/ for the 2-conv CNN, results/<network>/<study>/ for a deep network's replication
    paths = sorted([*results.glob(f"*/{VERDICT_FILE}"), *results.glob(f"*/*/{VERDICT_FILE}")])
    if not paths:
        raise ReportError(f"no reports under {results}: expected <study>/{VERDICT_FILE} written by bnstudy-report.")
    grouped: dict[tuple[str, str], dict[str, tuple[dict, str]]] = {}
    for path in paths:
        r = json.loads(path.read_text())
        variant = "" if r.get("variant", "default") == "default" else f" (variant: {r['variant']})"
        network = r.get("network", DEFAULT_NETWORK)  # reports from before the key: the default network
        folder = path.parent.relative_to(results).as_posix()
        grouped.setdefault((r["study"] + variant, r.get("dataset", "")), {})[network] = (r, folder)
    return grouped


def old_protocol_mark(reports: list[tuple[dict, str]]) -> str:
    """A mark for reports from before runs recorded their code fingerprint (and before raw runs, two phases and
    failures counted): their verdicts are not this protocol's."""
    return (
        " (old report: fixed seeds, before the current protocol)"
        if any("code_fingerprint" not in r for r, _ in reports)
        else ""
    )


def index_table(results: Path) -> str:
    """One row per study (and dataset) over the reports under `results` (each `<folder>/verdict.json`): the
    claim, its verdict on the default CNN and on the deep network (each with the verdict in words, the axis
    rule's sentence where the claim depends on an axis), the deciding effect with its 95% interval, the seeds
    and looks, whether every selection is inside its grid, and links to the reports."""
    head = [
        "study",
        "claim",
        "verdict on the CNN",
        "verdict on the deep network",
        "deciding effect [95% CI]",
        "seeds and looks",
        "selections interior?",
        "training time",
        "reports",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (study, dataset), by_network in index_records(results).items():
        cnn = by_network.get(DEFAULT_NETWORK)
        deep = [by_network[n] for n in sorted(by_network) if n != DEFAULT_NETWORK]
        reports = ([cnn] if cnn else []) + deep
        label = (lambda r: f"{r.get('network', DEFAULT_NETWORK)}: ") if len(reports) > 1 else (lambda r: "")
        cells = [
            study + ("" if dataset in ("", "mnist_t10k") else f" ({dataset})") + old_protocol_mark(reports),
            reports[0][0]["claim"],
            verdict_cell(cnn[0] if cnn else None, with_network=False),
            "; ".join(verdict_cell(r, with_network=True) for r, _ in deep) or "not run",
            "; ".join(label(r) + effect_cell(r) for r, _ in reports),
            "; ".join(label(r) + looks_cell(r) for r, _ in reports),
            "; ".join(label(r) + selections_cell(r) for r, _ in reports),
            "; ".join(label(r) + training_time_cell(results, folder) for r, folder in reports),
            ", ".join(f"[{r.get('network', DEFAULT_NETWORK)}]({folder}/README.md)" for r, folder in reports),
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
