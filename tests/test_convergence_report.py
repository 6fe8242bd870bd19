"""The report states the fraction of runs that met the study's convergence criterion, and a comparison most of
whose runs did not meet it says so beside its verdict."""

from __future__ import annotations

from report_runs import analyse_dir, write_run

from bnstudy.analysis.tables import comparison_table, convergence_line

SPEC = {
    "claim": "x.",
    "metrics": ["test/acc", "converged"],
    "convergence": {"key": "val/acc", "tolerance": 0.005},
    "compare": [
        {"metric": "test/acc", "a": {"model.norm": "before_relu"}, "b": {"model.norm": "none"}, "expect": "greater"},
        {"metric": "test/acc", "a": {"model.norm": "after_relu"}, "b": {"model.norm": "none"}, "expect": "greater"},
    ],
}
SETTLED, MOVING = [0.90, 0.970, 0.972], [0.50, 0.70, 0.90]  # the last two evaluations 0.002 vs 0.2 apart


def test_the_report_states_the_converged_fraction_and_flags_a_comparison_of_unconverged_runs(tmp_path):
    root = tmp_path / "runs"
    curves = {"before_relu": SETTLED, "after_relu": MOVING, "none": MOVING}
    for norm, accs in curves.items():
        for seed in range(3):
            recs = [{"step": 10 * (i + 1), "epoch": i + 1.0, "val/acc": v - 0.01 * seed} for i, v in enumerate(accs)]
            write_run(root, norm=norm, seed=seed, summary={"test/acc": accs[-1] - 0.01 * seed}, records=recs, spec=SPEC)
    a = analyse_dir("placement", root)
    assert convergence_line(a).startswith("Convergence: 3 of 9 finished runs (33%) met the study's criterion")
    table = comparison_table(a).set_index("comparison")
    before, after = table.iloc[0], table.iloc[1]
    assert before["converged runs"] == "3 of 6" and "did not converge" not in before["verdict"]  # half: not most
    assert after["converged runs"] == "0 of 6"
    assert after["verdict"].endswith("; **most of its runs did not converge** (0 of 6 met the criterion)")


def test_a_study_without_a_criterion_says_so(tmp_path):
    spec = {**SPEC, "metrics": ["test/acc"]}
    spec.pop("convergence")
    for norm in ("before_relu", "none"):
        for seed in range(2):
            write_run(tmp_path / "runs", norm=norm, seed=seed, summary={"test/acc": 0.9 + 0.01 * seed}, spec=spec)
    a = analyse_dir("placement", tmp_path / "runs")
    assert "states no convergence criterion" in convergence_line(a)
    assert (comparison_table(a)["converged runs"] == "-").all()


def test_an_along_row_counts_the_runs_at_its_own_axis_value(tmp_path):
    """Along the batch axis, each value's row counts its own runs: settled at batch 32, moving at batch 2."""
    spec = {**SPEC, "compare": [{**SPEC["compare"][0], "along": "train.batch_size"}]}
    for batch, accs in ((2, MOVING), (32, SETTLED)):
        for norm in ("before_relu", "none"):
            for seed in range(2):
                recs = [{"step": 10 * (i + 1), "epoch": i + 1.0, "val/acc": v} for i, v in enumerate(accs)]
                summary = {"test/acc": accs[-1] - 0.01 * seed + (0.02 if norm == "before_relu" else 0.0)}
                write_run(
                    tmp_path / "runs", norm=norm, seed=seed, batch_size=batch, summary=summary, records=recs, spec=spec
                )
    table = comparison_table(analyse_dir("placement", tmp_path / "runs"))
    assert list(table["converged runs"]) == ["0 of 4", "4 of 4"]
