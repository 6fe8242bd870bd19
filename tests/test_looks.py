"""bnstudy.analysis.looks and verdicts on synthetic run folders: the sequential looks replayed from the runs equal
`take_look` on the same p-values, the next look's seeds are asked for, an `along:` comparison is decided per axis
value with its sentence, and the fixed design is unchanged."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bnstudy.analysis import stats
from bnstudy.analysis.errors import ReportError
from bnstudy.analysis.index import index_table
from bnstudy.analysis.load import load_local
from bnstudy.analysis.looks import pending_seeds
from bnstudy.analysis.sequential import LookState, SeedSchedule, take_look
from bnstudy.analysis.spec import validate_spec
from bnstudy.analysis.write import write_report
from tests.report_runs import analyse_dir, write_run

pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")

SCHEDULE = {"start": 3, "step": 2, "max": 7}
SPEC = {
    "claim": "BN helps.",
    "metrics": ["test/acc"],
    "seeds": SCHEDULE,
    "compare": [
        {"metric": "test/acc", "a": {"model.norm": "before_relu"}, "b": {"model.norm": "none"}, "expect": "greater"},
        {"metric": "test/acc", "a": {"model.norm": "after_relu"}, "b": {"model.norm": "none"}, "expect": "greater"},
    ],
}
# Per seed: no BN, and the gains of BN before / after the ReLU (a clear one, a small noisy one).
BASE = np.array([0.80, 0.81, 0.79, 0.80, 0.82, 0.80, 0.81])
GAIN = {"before_relu": np.array([0.05, 0.03, 0.06, 0.04, 0.05, 0.04, 0.05]),
        "after_relu": np.array([0.02, -0.005, 0.015, 0.01, 0.02, 0.012, 0.015])}  # fmt: skip


def seeded_runs(root, n_seeds, spec=SPEC, gains=GAIN):
    for seed in range(n_seeds):
        for norm in ("none", *gains):
            acc = BASE[seed] + (gains[norm][seed] if norm in gains else 0.0)
            write_run(root, norm=norm, seed=seed, spec=spec, summary={"test/acc": float(acc)})
    return root


def direct_looks(n_seeds, gains=GAIN):
    """take_look on the hand-computed paired one-sided p-values of each look the seeds allow."""
    schedule = SeedSchedule(**SCHEDULE)
    state = LookState.start(2)
    for k, n in enumerate(schedule.looks):
        if n > n_seeds or not state.open.any():
            break
        ps, pc = [], []
        for norm in gains:
            d = pd.Series(gains[norm][:n])
            c = stats.paired_contrast([d, pd.Series(np.zeros(n))], [1.0, -1.0])
            p_support, p_contra, _ = stats.one_sided_pvalues(c, "greater", 0.0)
            ps.append(p_support)
            pc.append(p_contra)
        take_look(state, ps, pc, schedule, k)
    return state


@pytest.mark.parametrize("n_seeds", [3, 5, 7])
def test_looks_replayed_from_the_runs_equal_take_look(tmp_path, n_seeds):
    a = analyse_dir("placement", seeded_runs(tmp_path / "runs", n_seeds))
    state = direct_looks(n_seeds)
    c = a.comparisons
    assert list(c["verdict"]) == state.verdicts
    assert list(c["looks"]) == state.looks
    assert [None if pd.isna(d) else int(d) for d in c["decided_at"]] == state.decided_at


def test_a_decided_comparison_keeps_its_look_and_the_open_one_asks_for_seeds(tmp_path):
    assert direct_looks(5).decided_at == [5, None] and direct_looks(7).decided_at == [5, 7]
    a = analyse_dir("placement", seeded_runs(tmp_path / "runs", 5))
    pending = pending_seeds(a)
    assert pending["seeds"] == 7
    settings = sorted(g["filters"]["model.norm"] for g in pending["groups"])
    assert settings == ["after_relu", "none"] and all(g["missing"] == [5, 6] for g in pending["groups"])
    a = analyse_dir("placement", seeded_runs(tmp_path / "runs7", 7))
    assert list(a.comparisons["method"]) == ["paired (5 seeds)", "paired (7 seeds)"]  # each from its look
    assert a.comparisons["estimate"].iloc[0] == pytest.approx(GAIN["before_relu"][:5].mean())
    assert pending_seeds(a) == {} and a.verdict == "supported"


NOISY = {**GAIN, "after_relu": np.array([0.02, -0.01, 0.015, -0.01, 0.02, -0.015, 0.005])}


def test_open_at_the_maximum_reports_the_fixed_design_seeds(tmp_path):
    assert direct_looks(7, NOISY).decided_at == [5, None]
    a = analyse_dir("placement", seeded_runs(tmp_path / "runs", 7, gains=NOISY))
    assert pending_seeds(a) == {}
    out = write_report(a, load_local(tmp_path / "runs"), tmp_path / "out", "cmd")
    records = json.loads((out / "verdict.json").read_text())["comparisons"]
    assert records[0]["decided_at"] == 5 and records[0]["looks"] == [3, 5] and "seeds_needed" not in records[0]
    assert records[1]["decided_at"] is None and records[1]["looks"] == [3, 5, 7] and records[1]["seeds_needed"] > 7
    assert "Seeds until decided" in (out / "README.md").read_text()


def test_without_a_schedule_the_fixed_design_decides_on_every_seed(tmp_path):
    spec = {k: v for k, v in SPEC.items() if k != "seeds"}
    a = analyse_dir("placement", seeded_runs(tmp_path / "runs", 5, spec))
    assert list(a.comparisons["looks"]) == [[5], [5]]
    verdicts, _, _ = stats.decide_family(a.comparisons["p_support"], a.comparisons["p_contra"])
    assert list(a.comparisons["verdict"]) == verdicts and pending_seeds(a) == {}


ALONG_SPEC = {
    "claim": "BN helps at small batches.",
    "metrics": ["test/acc"],
    "compare": [
        {
            "metric": "test/acc",
            "a": {"model.norm": "before_relu"},
            "b": {"model.norm": "none"},
            "along": "train.batch_size",
            "expect": "greater",
        }
    ],
}
# Per batch size: the per-seed gain of BN (clearly positive, clearly negative, nothing).
ALONG_GAIN = {2: [0.05, 0.06, 0.055], 8: [-0.04, -0.05, -0.045], 32: [0.01, -0.012, 0.001]}


def test_an_along_comparison_is_decided_per_value_and_named_in_a_sentence(tmp_path):
    root = tmp_path / "runs"
    for batch, gains in ALONG_GAIN.items():
        for seed, gain in enumerate(gains):
            for norm, acc in (("none", 0.8 + 0.01 * seed), ("before_relu", 0.8 + 0.01 * seed + gain)):
                write_run(root, norm=norm, seed=seed, batch_size=batch, spec=ALONG_SPEC, summary={"test/acc": acc})
    a = analyse_dir("placement", root)
    assert list(a.comparisons["along_value"]) == [2, 8, 32] and list(a.comparisons["context"]) == [
        "batch_size=2",
        "batch_size=8",
        "batch_size=32",
    ]
    assert list(a.comparisons["verdict"]) == ["supported", "contradicted", "inconclusive"]
    assert a.verdict == "depends"
    assert a.verdict_sentence == (
        "depends: (norm=before_relu) - (norm=none) on `test/acc`: supported at batch 2, contradicted at batch 8, "
        "inconclusive at batch 32 (crossover between 2 and 8)"
    )
    out = write_report(a, load_local(root), tmp_path / "results" / "placement", "cmd")
    assert json.loads((out / "verdict.json").read_text())["verdict_sentence"] == a.verdict_sentence
    assert "crossover between 2 and 8" in index_table(tmp_path / "results")
    text = (out / "README.md").read_text()
    assert "## Verdict: **depends**" in text and "**depends** when some values support it" in text


def test_spec_checks_the_schedule_the_bounds_and_along():
    base = {"claim": "x.", "metrics": ["test/acc"]}
    comp = {"metric": "test/acc", "a": {"model.norm": "none"}, "b": {"model.norm": "before_relu"}, "expect": "less"}
    cases = [
        ({"seeds": {"start": 1, "step": 2, "max": 10}}, "`seeds` must be"),
        ({"seeds": {"start": 3, "max": 10}}, "`seeds` must be"),
        ({"select": {"by": "val/acc", "over": ["optimizer.lr"], "bounds": {"optimizer.lr": [1.0, 0.1]}}}, "`bounds`"),
        ({"select": {"by": "val/acc", "over": ["optimizer.lr"], "bounds": {"model.norm": [0, 1]}}}, "`bounds`"),
        ({"compare": [{**comp, "along": "model.norm"}]}, "must not also be fixed"),
        ({"compare": [{"metric": "x", "trend": "train.batch_size", "expect": "less", "along": "lr"}]}, "drop `along`"),
    ]
    for extra, words in cases:
        with pytest.raises(ReportError, match=words):
            validate_spec({**base, **extra}, "s")
    validate_spec({**base, "seeds": SCHEDULE, "compare": [{**comp, "along": "train.batch_size"}]}, "s")
