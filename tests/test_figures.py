"""bnstudy.analysis.figures on synthetic run folders: at most MAX_LINES lines per panel whatever the grid, each arm
at its selected lr, and runs that diverged or did not train drawn as marked points at the panel's bottom."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from bnstudy.analysis import figures
from bnstudy.analysis.load import load_local
from tests.report_runs import analyse_dir, write_run

pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")


@pytest.fixture
def drawn(monkeypatch):
    """The figures drawn (not saved), by name."""
    out = {}

    def keep(fig, folder, name):
        out[name] = fig
        return [f"{name}.png", f"{name}.svg"]

    monkeypatch.setattr(figures, "_save", keep)
    return out


def lines_per_panel(fig) -> list[int]:
    return [sum(isinstance(c, ErrorbarContainer) for c in ax.containers) for ax in fig.axes if ax.get_visible()]


def failed_marks(fig):
    """Per panel, the (x, y) offsets of the points labelled as failed runs, and the panel's bottom."""
    out = []
    for ax in fig.axes:
        for coll in ax.collections:
            if coll.get_label() == figures.FAILED_LABEL:
                out.append((coll.get_offsets().tolist(), ax.get_ylim()[0]))
    return out


def test_a_figure_of_27_arms_has_at_most_8_lines_per_panel(tmp_path, drawn):
    spec = {
        "claim": "x.",
        "metrics": ["test/acc"],
        "figures": [{"name": "acc", "x": "train.batch_size", "y": "test/acc", "hue": "model.norm", "logx": True}],
    }
    root = tmp_path / "runs"
    for norm in ("none", "before_relu", "after_relu"):
        for scale in (0.5, 1.0, 2.0):
            for lr in (0.01, 0.1, 1.0):
                for batch in (8, 128):
                    for seed in range(2):
                        acc = 0.8 + 0.01 * seed + 0.001 * batch / 128
                        write_run(root, norm=norm, init_scale=scale, lr=lr, batch_size=batch, seed=seed, spec=spec,
                                  summary={"test/acc": acc})  # fmt: skip
    a = analyse_dir("placement", root)
    figures.write_figures(a, load_local(root), tmp_path)
    counts = lines_per_panel(drawn["acc"])
    assert sum(counts) == 27 and max(counts) <= figures.MAX_LINES
    assert all(len(ax.get_legend().get_texts()) == 3 for ax in drawn["acc"].axes if ax.get_visible())


def test_diverged_and_not_trained_runs_are_marked_at_the_bottom_and_arms_shown_at_their_lr(tmp_path, drawn):
    spec = {
        "claim": "x.",
        "metrics": ["test/acc", "val/acc"],
        "select": {"by": "val/acc", "over": ["optimizer.lr"]},
        "figures": [
            {"name": "by_lr", "x": "optimizer.lr", "y": "test/acc", "hue": "model.norm", "logx": True},
            {"name": "by_norm", "x": "model.norm", "y": "test/acc"},
        ],
    }
    root = tmp_path / "runs"
    for norm in ("none", "before_relu"):
        for lr in (0.01, 0.1, 0.3):
            for seed in range(2):
                failed = norm == "none" and lr > 0.05
                status = ("diverged" if lr == 0.3 else "done") if failed else "done"
                acc = 0.105 if failed else 0.9 + 0.01 * seed + 0.01 * lr
                summary = {} if status == "diverged" else {"test/acc": acc, "val/acc": acc}
                write_run(root, norm=norm, lr=lr, seed=seed, spec=spec, status=status, summary=summary)
    a = analyse_dir("placement", root)
    assert set(a.runs["status"]) == {"done", "diverged", "not_trained"}
    figures.write_figures(a, load_local(root), tmp_path)
    ((points, bottom),) = failed_marks(drawn["by_lr"])
    assert sorted(x for x, _ in points) == [0.1, 0.1, 0.3, 0.3]  # no-BN at lr 0.1 (not trained) and 0.3
    assert all(y == pytest.approx(bottom) for _, y in points)
    assert lines_per_panel(drawn["by_norm"]) == [1]  # each arm once, at its selected lr
    assert failed_marks(drawn["by_norm"]) == []  # the selected lrs trained


@pytest.mark.filterwarnings("ignore:epochs_to_target. no run reached:bnstudy.analysis.errors.ReportWarning")
def test_a_one_epoch_curve_is_not_drawn_and_the_report_says_why(tmp_path, drawn):
    root = tmp_path / "runs"
    for norm in ("before_relu", "none"):
        for seed in range(2):
            curve = [{"step": 10, "epoch": 1.0, "test/acc": 0.9}]
            write_run(root, norm=norm, seed=seed, summary={"test/acc": 0.9}, records=curve)
    a = analyse_dir("placement", root)
    written, notes = figures.write_figures(a, load_local(root), tmp_path / "out")
    assert "learning_curves_test_acc" not in drawn and "test_acc_by_norm" in drawn
    assert any("`learning_curves_test_acc` not drawn: one logged value of `test/acc` per run" in n for n in notes)


def test_log_x_tick_labels_of_an_extended_grid_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lrs = [0.00111111, 0.00333333, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]  # a grid extended past its low edge
    fig = Figure(figsize=(6.2, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(lrs, range(len(lrs)))
    figures._log_x_at_values(ax, pd.Series(lrs))
    fig.canvas.draw()
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels][:2] == ["0.0011", "0.0033"]
    boxes = [t.get_window_extent() for t in labels]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def test_a_derived_metric_before_any_confirmation_run_draws_without_error(tmp_path, drawn):
    """A spread over init scales at each arm's selected lr, while the study is still in its selection phase:
    the figure at the selected settings has nothing to draw yet, and says nothing wrong."""
    spec = {
        "claim": "x.",
        "metrics": ["test/acc", "val/acc"],
        "select": {"by": "val/acc", "over": ["optimizer.lr"]},
        "derived": {"acc_spread": {"over": "model.init_scale", "of": "test/acc", "reduce": "range"}},
        "figures": [{"name": "spread", "x": "model.norm", "y": "acc_spread"}],
    }
    for norm in ("none", "before_relu"):
        for scale in (0.5, 2.0):
            for lr in (0.01, 0.1):
                for seed in range(3):
                    acc = 0.9 + 0.01 * seed + 0.01 * lr
                    summary = {"test/acc": acc, "val/acc": acc}
                    write_run(
                        tmp_path / "runs", norm=norm, init_scale=scale, lr=lr, seed=seed, spec=spec, summary=summary
                    )
    a = analyse_dir("placement", tmp_path / "runs")
    figures.write_figures(a, load_local(tmp_path / "runs"), tmp_path)  # raised before: a setting key the frame lacks
