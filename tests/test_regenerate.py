"""results/regenerate.sh's own checks: bad input exits 2 with one line, before anything is trained or deleted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "results" / "regenerate.sh"


def regenerate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--network", "cnn9", "placement"], "unknown network 'cnn9' (known: cnn6"),
        (["--network", "cnn6", "placement", "cost"], "the cost study times the 2-conv CNN only"),
        (["placment"], "unknown study placment"),
        (["--fast"], "unknown option --fast"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_training(args, says):
    done = regenerate(*args)
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""


def test_help_names_the_network_option():
    done = regenerate("--help")
    assert done.returncode == 0 and "--network NAME" in done.stdout and "results/NAME/STUDY/" in done.stdout
