"""bnstudy.analysis.edges on synthetic run folders: a selection at the edge of its grid is flagged and the next
value proposed (geometric for lr), a study's bound stops it, and an all-diverged value beyond makes it real."""

from __future__ import annotations

import json

import pytest

from bnstudy.analysis.edges import (
    REASON_BOUND,
    REASON_FAILED,
    REASON_OPEN,
    is_geometric,
    pending_extensions,
    step_beyond,
)
from bnstudy.analysis.load import load_local
from bnstudy.analysis.write import write_report
from tests.report_runs import analyse_dir, write_run

pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")

SPEC = {
    "claim": "BN helps at each arm's own lr.",
    "metrics": ["test/acc", "val/acc"],
    "select": {"by": "val/acc", "over": ["optimizer.lr"]},
    "compare": [
        {"metric": "test/acc", "a": {"model.norm": "before_relu"}, "b": {"model.norm": "none"}, "expect": "greater"}
    ],
}
# Mean val/acc per (norm, lr): BN's best is the grid's largest lr (an edge); no BN's best is inside.
VAL = {"before_relu": {0.025: 0.90, 0.05: 0.93, 0.1: 0.95}, "none": {0.025: 0.85, 0.05: 0.88, 0.1: 0.87}}


def grid_runs(root, spec=SPEC, values=VAL):
    for norm, by_lr in values.items():
        for lr, v in by_lr.items():
            for seed in range(3):
                summary = {"val/acc": v + 0.002 * seed, "test/acc": v + 0.003 * seed}
                write_run(root, norm=norm, lr=lr, seed=seed, spec=spec, summary=summary)
    return root


def by_arm(a):
    return {e.filters["model.norm"]: e for e in a.edges}


def test_an_edge_selection_is_flagged_and_the_next_lr_proposed(tmp_path):
    root = grid_runs(tmp_path / "runs")
    a = analyse_dir("placement", root)
    bn, none = by_arm(a)["before_relu"], by_arm(a)["none"]
    assert (bn.searched, bn.selected, bn.edge, bn.edge_reason) == ([0.025, 0.05, 0.1], 0.1, "high", REASON_OPEN)
    assert (none.selected, none.edge, none.edge_reason) == (0.05, None, None)
    assert pending_extensions(a) == [
        {"filters": {"model.norm": "before_relu"}, "axis": "optimizer.lr", "value": 0.2, "edge": "high"}
    ]
    out = write_report(a, load_local(root), tmp_path / "out", "cmd")
    record = json.loads((out / "verdict.json").read_text())
    assert record["selections"][0] == {
        "filters": {"model.norm": "before_relu"},
        "axis": "optimizer.lr",
        "searched": [0.025, 0.05, 0.1],
        "selected": 0.1,
        "edge": "high",
        "edge_reason": REASON_OPEN,
    }
    assert "edge_reason" not in record["selections"][1] and record["selections"][1]["edge"] is None
    assert record["runs"] == 18 and record["fixed_design_runs"] == 2 * 3 * 5
    text = (out / "README.md").read_text()
    assert f"| high   | {REASON_OPEN} |" in text and "Compute: 18 runs used" in text


def test_a_low_edge_steps_down_by_the_grid_ratio(tmp_path):
    values = {"before_relu": {0.025: 0.95, 0.05: 0.93, 0.1: 0.90}, "none": VAL["none"]}
    a = analyse_dir("placement", grid_runs(tmp_path / "runs", values=values))
    assert pending_extensions(a) == [
        {"filters": {"model.norm": "before_relu"}, "axis": "optimizer.lr", "value": 0.0125, "edge": "low"}
    ]


def test_the_study_bound_is_tried_before_it_stops_the_extension(tmp_path):
    spec = {**SPEC, "select": {**SPEC["select"], "bounds": {"optimizer.lr": [0.01, 0.15]}}}
    root = grid_runs(tmp_path / "runs", spec=spec)
    a = analyse_dir("placement", root)
    bn = by_arm(a)["before_relu"]
    assert (bn.edge, bn.edge_reason) == ("high", REASON_OPEN)  # 0.2 is past the bound, but 0.15 was never tried
    assert [e["value"] for e in pending_extensions(a)] == [0.15]
    for seed in range(3):
        write_run(root, norm="before_relu", lr=0.15, seed=seed, spec=spec, summary={"val/acc": 0.96, "test/acc": 0.96})
    a = analyse_dir("placement", root)
    bn = by_arm(a)["before_relu"]
    assert (bn.selected, bn.edge, bn.edge_reason) == (0.15, "high", REASON_BOUND)
    assert pending_extensions(a) == []


def test_an_arm_where_nothing_trains_has_no_selection_no_extension_and_loses(tmp_path):
    """No tie-break picks an lr for it, no edge reason claims what the data do not show, and the comparison
    that needs it to train is lost by it: contradicted, with no confirmation seed spent on it."""
    root = grid_runs(tmp_path / "runs", values={"before_relu": VAL["before_relu"]})
    for lr in (0.025, 0.05, 0.1):
        for seed in range(3):
            write_run(root, norm="none", lr=lr, seed=seed, spec=SPEC, status="diverged")
    flipped = {**SPEC, "compare": [{**SPEC["compare"][0], "a": SPEC["compare"][0]["b"], "b": SPEC["compare"][0]["a"]}]}
    a = analyse_dir("placement", root)
    none = by_arm(a)["none"]
    assert (none.selected, none.edge, none.edge_reason) == (None, "none", "no optimizer.lr in [0.025, 0.1] trained")
    assert [e["filters"] for e in pending_extensions(a)] == [{"model.norm": "before_relu"}]  # BN's open edge only
    assert a.phases.untrained == [{"model.norm": "none"}]
    assert not a.selection.query("`model.norm` == 'none'")["selected"].any()
    (row,) = a.comparisons.to_dict("records")
    assert row["verdict"] == "supported" and row["decided_at"] == 0 and "(norm=none) trained at no" in row["note"]
    (row,) = analyse_spec(root, flipped).comparisons.to_dict("records")
    assert row["verdict"] == "contradicted"  # as `a`, the untrained arm loses "a > b"


def analyse_spec(root, spec):
    import yaml

    from bnstudy.analysis.analyse import analyse

    folder = root.parent / "experiments"
    folder.mkdir(exist_ok=True)
    (folder / "placement.yaml").write_text(yaml.safe_dump({"report": spec}))
    loaded = load_local(root)
    loaded.specs.clear()  # read the experiment file's spec, not the runs'
    return analyse("placement", loaded, experiments_dir=folder)


def test_an_all_diverged_extension_makes_the_edge_real(tmp_path):
    root = grid_runs(tmp_path / "runs")
    for seed in range(3):  # the extension the first analysis proposed: every run there diverged
        write_run(root, norm="before_relu", lr=0.2, seed=seed, spec=SPEC, status="diverged")
    a = analyse_dir("placement", root)
    bn = by_arm(a)["before_relu"]
    assert (bn.searched, bn.selected, bn.edge, bn.edge_reason) == ([0.025, 0.05, 0.1, 0.2], 0.1, "high", REASON_FAILED)
    assert pending_extensions(a) == []


def test_an_extension_that_trains_and_wins_moves_the_edge_on(tmp_path):
    root = grid_runs(tmp_path / "runs")
    for seed in range(3):
        write_run(root, norm="before_relu", lr=0.2, seed=seed, spec=SPEC, summary={"val/acc": 0.97, "test/acc": 0.97})
    a = analyse_dir("placement", root)
    assert by_arm(a)["before_relu"].selected == 0.2
    assert pending_extensions(a)[0]["value"] == 0.4


def test_grid_spacing_geometric_for_ratios_arithmetic_for_steps():
    assert is_geometric([0.01, 0.03, 0.1, 0.3]) and not is_geometric([0.0, 0.25, 0.5])
    assert step_beyond([0.01, 0.03, 0.1, 0.3], "high") == 0.9
    assert step_beyond([0.1, 0.2, 0.3], "high") == pytest.approx(0.4)
    assert step_beyond([0.0, 0.25, 0.5], "low") == -0.25


def test_the_index_tells_an_edge_that_stands_from_an_open_one():
    from bnstudy.analysis.index import selections_cell

    arm = lambda edge, why: {"filters": {"model.norm": "none"}, "edge": edge, **({"edge_reason": why} if why else {})}
    assert selections_cell({"selections": [arm(None, None)]}) == "yes (1 arms)"
    standing = selections_cell({"selections": [arm(None, None), arm("high", REASON_FAILED)]})
    assert standing.startswith("yes (2 arms; 1 at an edge that stands: model.norm=none at the high edge")
    assert selections_cell({"selections": [arm("high", REASON_OPEN)]}).startswith("no: model.norm=none")
