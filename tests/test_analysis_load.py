"""bnstudy.analysis.load: corrupt run folders are skipped with a warning and listed; a wandb failure is a
clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnstudy.analysis.analyse import analyse
from bnstudy.analysis.errors import ReportError, ReportWarning
from bnstudy.analysis.load import load_local, load_wandb
from tests.report_runs import (
    placement_runs,
)

# Synthetic runs log only what each test needs; the report's "no run has metric" warnings are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:study .*no run has metric:bnstudy.analysis.errors.ReportWarning")


def test_corrupt_folder_is_skipped_with_a_warning_and_listed(tmp_path):
    root = placement_runs(tmp_path / "runs")
    bad = root / "broken-run"
    bad.mkdir()
    (bad / "config.yaml").write_text("model: {norm: none}\n")
    (bad / "summary.json").write_text('{"status": "do')
    (root / "half-written").mkdir()
    with pytest.warns(ReportWarning) as warned:
        runs = load_local(root)
    messages = " ".join(str(w.message) for w in warned)
    assert "broken-run: summary.json is not JSON" in messages and "half-written: no config.yaml" in messages
    assert {Path(p).name for p, _ in runs.skipped} == {"broken-run", "half-written"}
    a = analyse("placement", runs)
    assert a.verdict == "supported" and len(a.runs) == 9


def test_wandb_failure_is_a_clear_error(monkeypatch):
    wandb = pytest.importorskip("wandb")

    def no_network(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "Api", no_network)
    with pytest.raises(ReportError, match="could not read wandb runs.*--source local"):
        load_wandb("me", "bnstudy", "placement")
