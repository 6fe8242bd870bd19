"""The README text of a study's report: claim, verdict and the rules behind it, how each metric is computed,
the tables, the figures, the runs and the data and version facts."""

from __future__ import annotations

import shlex

import pandas as pd

from bnstudy.analysis import stats
from bnstudy.analysis.analyse import Analysis
from bnstudy.analysis.derived import FINISHED
from bnstudy.analysis.fingerprints import fingerprint_counts, fingerprint_line
from bnstudy.analysis.index import FIXED_SEEDS, fixed_design_runs, one_phase_runs
from bnstudy.analysis.looks import schedule_of
from bnstudy.analysis.spec import for_dataset, spec_metrics
from bnstudy.analysis.tables import convergence_line, edges_table, margins_text, per_layer_table, selection_table

OFFICIAL_SPLITS = {"mnist": (60000, 10000), "cifar10": (50000, 10000)}  # train / test sizes
DEFAULT_DATASET = "mnist_t10k"  # what `bnstudy-train` trains on when no dataset= is given


def facts(a: Analysis) -> list[str]:
    """Data and version facts, read from the run summaries."""
    r = a.runs
    done = r[r["status"].isin(FINISHED)]

    def values(col, frame=r):
        if col not in frame:
            return "unknown"
        return ", ".join(f"{v} ({n} runs)" for v, n in frame[col].astype(str).value_counts().items())

    lines = [
        f"- dataset `{a.dataset}`; examples used per run (train / test): "
        f"{values('num_train', done)} / {values('num_test', done)}"
        + (
            f"; validation (held out of the training split, the same examples in every run): {values('num_val', done)}"
            if "num_val" in done
            else ""
        ),
    ]
    notes = done["data.note"].dropna().unique() if "data.note" in done else []
    if len(notes):  # a dataset that says what it is not (the embedded mnist_t10k)
        lines.append("- **" + "; ".join(notes) + "**")
    official = OFFICIAL_SPLITS.get(a.dataset)
    sizes = done.reindex(columns=["num_train", "num_test"]).dropna().astype(int)
    if official and len(sizes):
        if set(zip(sizes["num_train"], sizes["num_test"])) != {official}:
            lines.append(
                f"- **not the official {a.dataset} split** (official: {official[0]} train / {official[1]} test): "
                f"these numbers are not comparable to published {a.dataset} results."
            )
    if "train.epochs" in done:
        lines.append(f"- training: epochs {values('train.epochs', done)}; steps per run {values('steps', done)}")
    lines.append(fingerprint_line(fingerprint_counts(r)))
    dirty = "git_sha" in r and r["git_sha"].astype(str).str.endswith("-dirty").any()
    lines.append(f"- git SHA: {values('git_sha')}" + (" (`-dirty`: uncommitted changes)" if dirty else ""))
    pkg_cols = sorted(c for c in r if c.startswith("packages."))
    if pkg_cols:
        pk = "; ".join(f"{c[9:]} {'/'.join(sorted(r[c].dropna().astype(str).unique()))}" for c in pkg_cols)
        lines.append(f"- packages: {pk}")
    dev = [c for c in ("device.backend", "device.device_kind", "device.device_count") if c in r]
    if dev:
        combos = r[dev].astype(str).agg(" / ".join, axis=1).value_counts()
        lines.append("- device (backend / kind / count): " + ", ".join(f"{k} ({n} runs)" for k, n in combos.items()))
    if "wall_time" in done:
        minutes = done["wall_time"].astype(float).sum() / 60
        lines.append(f"- total wall time of the finished runs: {minutes:.1f} min (sum over runs)")
    if "started_at" in r and r["started_at"].notna().any():
        lines.append(f"- runs started {r['started_at'].dropna().min()} .. {r['started_at'].dropna().max()}")
    return lines


def train_commands(a: Analysis) -> list[str]:
    """The commands that trained the runs used, as each run recorded it (with its count when there are
    several); for runs that recorded none, the command rebuilt from their configs, said to be rebuilt."""
    used = a.runs[a.runs["status"].isin(FINISHED)]
    recorded = used["command"].dropna().astype(str) if "command" in used else pd.Series(dtype=str)
    counts = recorded.value_counts()
    lines = [f"{c}" + (f"    # {n} runs" if len(counts) > 1 else "") for c, n in counts.items()]
    if len(recorded) < len(used):
        lines.append(f"{train_command(a)}    # rebuilt from the configs of {len(used) - len(recorded)} runs")
    return lines


def train_command(a: Analysis) -> str:
    """The training command of this study, rebuilt from the runs' configs (runs that did not record their
    command): `bnstudy.study` for a study with a seed schedule (its grid, edge extensions and seed rounds),
    else the grid through `bnstudy.train`."""
    if a.spec.get("seeds"):
        parts = ["python", "-m", "bnstudy.study", a.study]
    else:
        parts = ["python", "-m", "bnstudy.train", "-m", f"experiment={a.study}"]
    if a.dataset != DEFAULT_DATASET:
        parts.append(f"dataset={a.dataset}")
    if "quick" in str(a.spec.get("variant", "")):
        parts.append("+preset=quick")
    epochs = a.runs["train.epochs"].dropna().unique() if "train.epochs" in a.runs else []
    if len(epochs) == 1:  # explicit, since a grid may have been run with fewer epochs than its file says
        parts.append(f"train.epochs={int(epochs[0])}")
    if "dataset.data_dir" in a.runs and a.runs["dataset.data_dir"].notna().any():
        # The reader's own prepared TFDS folder; the path on the machine that trained is not theirs.
        return shlex.join(parts) + " dataset.data_dir=$DATA_DIR"
    return shlex.join(parts)


def verdict_rules(a: Analysis) -> list[str]:
    """The statistics behind the verdict, in words (the rules are those of bnstudy.analysis.stats)."""
    k = len(a.comparisons)
    trained = (
        "Runs that diverged or did not train are counted apart in the tables' means; a finite run is "
        f"*not trained* when its final train loss is >= {stats.LOSS_RATIO:g} x its first logged train loss "
        f"or its test accuracy is <= chance + {stats.CHANCE_MARGIN:g}."
        if a.spec.get("require_trained", True)
        else "Diverged runs are counted apart in the tables' means; this study does not require runs to learn "
        "(`require_trained: false`)."
    )
    failed = (
        " In a comparison, a failed run counts against its arm, never dropped: an outcome of training (an "
        "accuracy, a loss) at its own value where it has one (a run that did not learn has a test accuracy), "
        "an accuracy at chance (1 / classes) where it diverged, and otherwise, every probe of a mechanism "
        "(smoothness, ICS, a BN discrepancy, dead units, a generalization gap) included, as the worst outcome: "
        "a probe read on a net that did not train describes the failure (a net stuck at chance reads as "
        "smooth), so its value must not help its arm. A comparison holding a worst outcome is decided by a "
        "rank test (Wilcoxon signed-rank on the per-seed contrasts, or Mann-Whitney's U) whose interval is that "
        "of the median contrast."
    )
    return [
        "Each comparison is a contrast of group means over seeds (mean A - mean B; with `relative_to`, that "
        "difference minus the same difference in the reference groups) with a 95% t-interval: **paired** (on "
        "per-seed differences) when every group holds the same seeds, since a seed fixes the initialization and "
        "the data order in every arm; **Welch** (unequal variances) otherwise. The `interval` column says which.",
        "",
        f"Verdicts use one-sided t-tests against each comparison's margin, Holm-Bonferroni adjusted over this "
        f"study's {k} comparison(s), at a family-wise level of {stats.FAMILY_ALPHA:g}: "
        f"{stats.DIRECTION_ALPHA:g} for support and {stats.DIRECTION_ALPHA:g} for the claim's failure. A "
        "comparison that expects *greater* (claim: the difference exceeds the margin m) is **supported** when "
        "that is shown (with one comparison: its 95% interval lies above m), **contradicted** when the opposite "
        "beyond the margin is shown (below -m; below 0 when m = 0), **negligible** when, with m > 0, a "
        "difference inside +-m is shown (the claimed effect is absent, the opposite not shown); *less* "
        "(claim: below m) is supported below m and contradicted above it. *equivalent* is supported by two "
        "one-sided tests (TOST) within +-m (with one comparison: the 95% interval inside +-m) and contradicted "
        "when the difference is shown beyond one of +-m (the smaller one-sided p doubled: the 97.5% interval). "
        "A comparison with no variation across seeds (a zero-width interval) or fewer than 2 runs in a group is "
        "inconclusive. The claim is **supported** when every comparison supports it, **contradicted** when any "
        "contradicts it, else **negligible** when any is, otherwise **inconclusive**." + failed + along_rule(a),
        "",
        *selection_rules(a),
        *sequential_rules(a),
        trained,
    ]


def selection_rules(a: Analysis) -> list[str]:
    """The two phases in words, for a study with a selection."""
    if a.phases is None:
        return []
    over = ", ".join(a.spec["select"]["over"])
    confirmed = a.phases.confirmation_seeds
    return [
        f"Two phases on disjoint seeds: each arm's {over} was chosen on the selection seeds "
        f"{a.phases.seeds} (the grid and its extensions), then frozen; the comparisons use only the "
        f"confirmation runs, each arm at its selected {over} on seeds "
        f"{', '.join(map(str, confirmed)) if confirmed else '(none yet)'}, so that no run that chose a setting "
        "decides the claim (no winner's curse). An arm where no searched setting trained has no selection and "
        "loses each two-arm comparison that needs it to train (decided by the selection phase, no confirmation "
        f"seed spent); a trend or relative contrast with such an arm stays inconclusive."
        + (
            f" {len(a.phases.stray)} confirmation run(s) at an unselected setting were left out."
            if len(a.phases.stray)
            else ""
        ),
        "",
    ]


def along_rule(a: Analysis) -> str:
    """How a comparison declared `along:` an axis counts, when the study has one."""
    if not any("along" in c for c in a.spec.get("compare") or []):
        return ""
    return (
        " A comparison declared `along:` an axis is decided at each axis value (each value one comparison of the "
        "family) and counts once for the claim, by the same rule at every value: **depends** when some values "
        "support it and others show its failure (the sentence above names each region, per context when "
        "another grid column varies, and brackets the crossover between two searched values); otherwise "
        "contradicted if any value is, negligible if any is, supported if all are, else inconclusive. The claim "
        "**depends** when such a comparison does and none contradicts it or is negligible."
    )


def sequential_rules(a: Analysis) -> list[str]:
    """The seed schedule's rule in words, when the study declares one (`report.seeds`)."""
    schedule = schedule_of(a.spec)
    if schedule is None:
        return []
    looks = ", ".join(str(n) for n in schedule.looks)
    return [
        f"Seeds until decided (`seeds: {{start: {schedule.start}, step: {schedule.step}, max: {schedule.max}}}`): "
        f"the comparisons are looked at with {looks} paired seeds (each look uses the first seeds, sorted, that "
        "every group of the comparison holds). At each look the open comparisons are tested with the same "
        "one-sided p-values at a stricter nominal level that spends the family's level as alpha * t^2 (Kim-DeMets "
        "power family, t the share of the maximum seeds), Holm's step-down across the comparisons within each "
        "look; a comparison decided at a look "
        "keeps that look's verdict and interval and gets no more seeds. One still open at the maximum is "
        "inconclusive, with the paired seeds a fixed design would need at the observed spread "
        "(`seeds_needed` in verdict.json). The Holm p columns are empty: the levels are per look.",
        "",
    ]


def runs_used(a: Analysis) -> int:
    """The runs that finished (done, diverged or not trained): those the tables count; the others are listed."""
    return int(a.runs["status"].isin(FINISHED).sum())


def compute_line(a: Analysis) -> str:
    """The runs this report used against those of the fixed design (and, with two phases, of one phase)."""
    used, total = runs_used(a), len(a.runs)
    of = f" (of {total} run folders; the others did not finish, see Runs)" if used != total else ""
    line = (
        f"Compute: {used} runs used{of}; the fixed design ({FIXED_SEEDS} seeds at every setting of the "
        f"original grid) would have used {fixed_design_runs(a)}"
    )
    if a.phases is None:
        return line + "."
    confirmation = len(a.phases.confirmation) + len(a.phases.stray)
    return (
        f"{line}, and one phase (every searched setting at every seed the looks reached) {one_phase_runs(a)}; "
        f"{used - confirmation} selection and {len(a.phases.confirmation)} confirmation runs."
    )


def metric_notes(a: Analysis) -> list[str]:
    """One line per kind of computed metric the study uses: how it is computed from the runs."""
    s, names = a.spec, spec_metrics(a.spec)
    lines = []
    if any(m.startswith("mean(") for m in names):
        lines.append("- `mean(key)`: the mean of a logged key over all its records in metrics.jsonl (over training).")
    if any(m.startswith("median(") for m in names):
        lines.append(
            "- `median(key)`: per run, the median of a logged key over its records after step 0; the "
            "step-0 value (the untrained net) is reported apart as `step0(key)`."
        )
    if any(m.startswith("log10(") for m in names):
        lines.append(
            "- `log10(metric)`: per run, log10 of the metric (values <= 0 give none); its mean over "
            "seeds is a log-mean, so one extreme seed moves it by its order of magnitude only."
        )
    if any("*" in m for m in names):
        lines.append("- `a/*/b`: the mean of `a/<layer>/b` over the layers that log it (per record for logged keys).")
    if "steps_to_target" in names:
        target = for_dataset(s.get("target_acc"), a.dataset)
        lines.append(
            f"- `steps_to_target`: first logged step with `{s.get('target_key', 'val/acc')}` >= {target}; "
            "a run that never reaches it counts at its last logged step (a lower bound) and has "
            "`reached_target` 0."
        )
    if "converged" in names:
        c = s["convergence"]
        lines.append(
            f"- `converged`: 1 when the last two logged values of `{c['key']}` differ by at most "
            f"{c['tolerance']:g} (the stated convergence criterion), else 0."
        )
    if any("trend" in c for c in s.get("compare") or []):
        lines.append(
            "- trend comparisons: per seed, the least-squares slope (scipy.stats.linregress) of the metric "
            "(log10 where stated) against the axis (log10: per decade) over the whole axis, counted only for "
            "seeds with a usable run at every axis value; the effect is the mean slope over seeds (or the "
            "per-seed difference of two arms' slopes) with its 95% t-interval."
        )
    if s.get("heavy_tailed"):
        lines.append(
            f"- heavy-tailed metrics ({', '.join(f'`{m}`' for m in s['heavy_tailed'])}): the tables give "
            "the median over seeds before the mean."
        )
    return lines


def _head(a: Analysis, command: str, data_note: str | None) -> list[str]:
    """Title, the commands that regenerate the report and trained the runs, the claim and the data."""
    s = a.spec
    lines = [
        f"# {a.study}: {s.get('title', a.study)}",
        "",
        "Generated by `bnstudy.report`; do not edit by hand. Regenerate this report with:",
        "",
        f"    {command}",
        "",
        "The runs were trained with (each run's exact config is in its config.yaml and in runs.csv):",
        "",
        *[f"    {line}" for line in train_commands(a)],
        "",
        "## Claim",
        "",
        f"{s['claim']}",
        "",
        f"Source: {s.get('source', 'not given')}",
        "",
    ]
    variant = s.get("variant") or f"default (experiments/{a.study}.yaml)"
    lines += [f"Grid variant: **{variant}**.", ""]
    data = [line[2:] for line in facts(a)[:2] if line.startswith("- ")]
    lines += [f"Data: {data[0]}", ""] + ([f"Data note: {data_note}", ""] if data_note else [])
    lines += [f"{data[1]}", ""] if len(data) > 1 and data[1].startswith("**not") else []
    return lines


def _verdict(a: Analysis, comp: pd.DataFrame) -> list[str]:
    """The verdict, its rules, the comparison table, the margins and the per-arm selection."""
    s = a.spec
    lines = [f"## Verdict: **{a.verdict}**", "", f"In words: {a.verdict_sentence}.", "", compute_line(a), ""]
    lines += [convergence_line(a), ""]
    lines += [*verdict_rules(a), ""]
    lines += [comp.to_markdown(index=False) if not comp.empty else "No comparison is declared for this study.", ""]
    if s.get("compare"):
        lines += ["Margins (the smallest difference that matters) and why:", "", *margins_text(a), ""]
    select = selection_table(a)
    if select is not None:
        by, over = s["select"]["by"], ", ".join(s["select"]["over"])
        lines += [
            f"### Per-arm selection of {over} (on `{by}`, never on the test split)",
            "",
            f"Each arm is compared at its own setting of {over}, chosen on the selection seeds "
            f"{a.phases.seeds}: the best mean `{by}` over all runs there ({s['select'].get('mode', 'max')}imum), "
            "a run that did not learn at its real value and a diverged run at chance accuracy. An arm where no "
            "setting trained has none selected.",
            "",
            select.to_markdown(index=False),
            "",
            "Where each arm's selection sits in what it searched: *inside*, or at the *low* or *high* edge. An "
            "edge stands as the arm's optimum only when every run at the next value beyond it diverged or did "
            "not train, or the study's `select.bounds` are reached; otherwise the grid was not searched far "
            "enough and the selection is the best of what was tried.",
            "",
            edges_table(a).to_markdown(index=False),
            "",
        ]
    return lines


def per_layer_section(a: Analysis) -> list[str]:
    """The comparisons of layer-mean metrics redone layer by layer (bnstudy.analysis.per_layer); none without."""
    table = per_layer_table(a)
    if table.empty:
        return []
    return [
        "",
        "### Per layer",
        "",
        "Each comparison of a metric averaged over layers (`*` in its name), redone with `*` replaced by one "
        "layer's name: the same contrast A - B over the same runs and seeds as the comparison's row in that "
        "context, with its 95% t-interval (paired when every group holds the same seeds, else Welch). This table "
        "is descriptive: it has no verdict and is not part of the Holm family; the verdict rests on the layer "
        "mean above. Layers in network order; a layer with no value (e.g. a log10 of zero) shows `-`. Also in "
        "`per_layer.csv`.",
        "",
        table.to_markdown(index=False),
        "",
    ]


def _derived_rules(a: Analysis) -> list[str]:
    """One line per metric derived across an axis and per other computed metric: how it is computed."""
    s, names = a.spec, spec_metrics(a.spec)
    lines = []
    for name, d in (s.get("derived") or {}).items():
        rule = (
            f"largest `{d['over']}` whose run finished without diverging with `{d['of']}` >= "
            f"{for_dataset(d.get('threshold'), a.dataset)}" + (" (log10)" if d.get("log10") else "")
            if d["reduce"] == "max_stable"
            else f"max - min of `{d['of']}` over `{d['over']}`, a diverged run counting as {d.get('diverged_value')}"
        )
        lines.append(
            f"- `{name}` (one value per seed): {rule}; a seed counts only if all its `{d['over']}` values finished."
        )
    if "epochs_to_target" in names:
        target = for_dataset(s.get("target_acc"), a.dataset)
        lines.append(
            f"- `epochs_to_target`: first evaluated epoch with test accuracy >= {target}; runs that never "
            "reach it are not averaged in (n counts those that did)."
        )
    lines += metric_notes(a)
    if "gen_gap" in names:
        lines.append(
            "- `gen_gap`: accuracy on the training subset in inference mode minus test accuracy (same "
            "weights, same BN mode); missing for runs that do not log `train_subset/acc`."
        )
    if any(m.startswith("bn/*/") for m in names):
        lines.append("- `bn/*/key`: the mean of `bn/<layer>/key` over the BN layers that log it.")
    return lines


def _results(tables: dict, figures, notes) -> list[str]:
    """The tables, then the figures with their captions and the figures that could not be drawn."""
    lines = [
        "",
        "## Results",
        "",
        "Each cell: mean [95% t-interval] (n runs used) over seeds; accuracies and rates "
        "with the interval clipped to [0, 1] (the divergence rate: exact Clopper-Pearson interval).",
        "",
    ]
    for kind, t in tables.items():
        lines += [f"### {kind}", "", t.to_markdown(index=False), ""]
    lines += ["## Figures", ""]
    lines += [f"![{name}]({name})\n\n{text} (SVG: same name.)\n" for name, text in figures]
    lines += [] if figures else ["No figure could be drawn.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines


def _runs(a: Analysis, data_note: str | None) -> list[str]:
    """Runs by status, the unfinished and skipped ones, missing metrics, then the data and version facts."""
    by_status = ", ".join(f"{k} {v}" for k, v in a.runs["status"].value_counts().items())
    lines = ["## Runs", "", f"Runs by status: {by_status}; corrupt folders skipped: {len(a.skipped)}.", ""]
    incomplete = a.runs[~a.runs["status"].isin(FINISHED)]
    for _, r in incomplete.iterrows():
        error = f" ({r['error']})" if isinstance(r.get("error"), str) else ""
        lines.append(f"- {r['status']}: `{r['path']}`{error}")
    for path, why in a.skipped:
        lines.append(f"- corrupt, skipped: `{path}` ({why})")
    for m in a.missing:
        lines.append(f"- no run has metric `{m}`")
    lines += ["", "## Data and versions", ""] + facts(a)
    if data_note:
        lines.append(f"- note: {data_note}")
    lines += [
        "",
        "Files: `summary.csv` (one row per group and metric), `runs.csv` (one row per run), "
        "`comparisons.csv`, "
        + ("`per_layer.csv` (the comparisons layer by layer), " if not a.per_layer.empty else "")
        + "`table.md`, `table.tex`, figures as PNG and SVG.",
        "",
    ]
    return lines


def readme(a: Analysis, tables: dict, comp: pd.DataFrame, figures, notes, command: str, data_note: str | None) -> str:
    """The whole README.md of a report, section by section."""
    # The layer-by-layer table after the metrics' definitions, so that they stay one list.
    lines = _head(a, command, data_note) + _verdict(a, comp) + _derived_rules(a) + per_layer_section(a)
    lines += _results(tables, figures, notes) + _runs(a, data_note)
    return "\n".join(lines)
