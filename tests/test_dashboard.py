"""The report's wandb run (bnstudy.analysis.dashboard), read back from its offline `.wandb` file with wandb's own
record format (wandb.proto): its config, summary, tables and images, one run per study and set of runs, and the
fallback from an unreachable server to offline.

`read_wandb_file` frames the file's records (the LevelDB-log layout wandb writes: a 7-byte header, 32 KiB
blocks of checksummed chunks) and parses each with `wandb.proto.wandb_internal_pb2.Record`."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from test_stats import SELECT_SPEC, select_runs

from bnstudy.analysis import cli, dashboard
from bnstudy.analysis.analyse import analyse
from bnstudy.analysis.load import load_local

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a wandb run file"
    pos = 7
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0:
            pos += left
            continue
        body = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        assert zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF == crc, f"bad chunk checksum at byte {pos}"
        yield kind, body
        pos += CHUNK_HEADER + length


def read_wandb_file(path: Path) -> list:
    """Every record of a `.wandb` file, as wandb.proto Records."""
    from wandb.proto import wandb_internal_pb2

    records, parts = [], b""
    for kind, body in _chunks(path.read_bytes()):
        parts += body
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def decoded_run(path: Path) -> dict:
    """{"run": RunRecord, "config": {key: value}, "summary": {...}, "history": {...}} of one `.wandb` file (the last
    value of each key; nested keys joined with '.')."""
    out = {"run": None, "config": {}, "summary": {}, "history": {}}
    for record in read_wandb_file(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind in ("summary", "history"):
            items = record.summary.update if kind == "summary" else record.history.item
            out[kind].update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in items})
    return out


def offline_run(report: Path) -> Path:
    (folder,) = (report / "wandb").glob("offline-run-*")
    return folder


SPEC = {**SELECT_SPEC, "figures": [{"name": "test_acc_by_norm", "x": "model.norm", "y": "test/acc"}]}


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return select_runs(tmp_path / "runs", spec=SPEC)


def test_the_offline_report_run_holds_the_verdict_tables_figures_and_readme(tmp_path, runs_dir):
    out = tmp_path / "report"
    cli.main(["select", "--runs", str(runs_dir), "--out", str(out)])
    folder = offline_run(out)
    (run_file,) = folder.glob("run-*.wandb")
    run = decoded_run(run_file)
    verdict = json.loads((out / "verdict.json").read_text())
    assert (run["run"].job_type, run["run"].run_group, run["run"].project) == ("report", "select", "bnstudy")
    assert run["run"].notes == SPEC["claim"] and run["summary"]["claim"] == SPEC["claim"]
    assert run["summary"]["verdict"] == verdict["verdict"] == "supported"
    assert run["summary"]["deciding"]["estimate"] == pytest.approx(verdict["deciding"]["estimate"])
    assert run["config"]["runs"] == sorted(pd.read_csv(out / "runs.csv")["run_id"])
    # Tables: their rows are the report's comparisons.csv and the per-arm selection.
    table = json.loads((folder / "files" / run["summary"]["comparisons.path"]).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    csv = pd.read_csv(out / "comparisons.csv")
    assert [r["estimate"] for r in rows] == pytest.approx(list(csv["estimate"]))
    assert [r["verdict"] for r in rows] == ["supported"]
    selection = json.loads((folder / "files" / run["summary"]["selection.path"]).read_text())
    chosen = [dict(zip(selection["columns"], r)) for r in selection["data"]]
    assert {(r["model.norm"], r["optimizer.lr"]) for r in chosen if r["selected"]} == {
        ("before_relu", 0.1),
        ("none", 0.01),
    }
    # Images: every figure of the report folder, its PNG in the run's files.
    image = run["summary"]["figures/test_acc_by_norm.path"]
    assert run["summary"]["figures/test_acc_by_norm._type"] == "image-file"
    assert (folder / "files" / image).read_bytes()[:4] == b"\x89PNG"
    readme = (folder / "files" / run["summary"]["readme.path"]).read_text()
    assert "Per-arm selection of optimizer.lr" in readme


def test_rerunning_the_report_updates_its_one_run_and_other_runs_get_another(tmp_path, runs_dir):
    out = tmp_path / "report"
    cli.main(["select", "--runs", str(runs_dir), "--out", str(out)])
    first = offline_run(out)
    cli.main(["select", "--runs", str(runs_dir), "--out", str(out)])
    second = offline_run(out)  # exactly one offline copy: the new one
    assert first.name.split("-", 3)[-1] == second.name.split("-", 3)[-1]
    a = analyse("select", load_local(runs_dir))
    ids = list(a.runs["run_id"])
    assert second.name.endswith(dashboard.report_run_id("select", a.dataset, ids[::-1]))
    assert dashboard.report_run_id("select", a.dataset, ids[1:]) != dashboard.report_run_id("select", a.dataset, ids)


def test_no_wandb_logs_nothing(tmp_path, runs_dir):
    for flags in (["--no-wandb"], ["--wandb-mode", "disabled"]):
        out = tmp_path / flags[-1]
        cli.main(["select", "--runs", str(runs_dir), "--out", str(out), *flags])
        assert (out / "README.md").exists() and not (out / "wandb").exists()


def test_an_unreachable_server_is_one_warning_and_the_report_run_is_kept_offline(tmp_path, runs_dir, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    a = analyse("select", load_local(runs_dir))
    out = tmp_path / "report"
    out.mkdir()
    run = dashboard.report_run(a, out)
    run.init_timeout = 3.0
    with pytest.warns(UserWarning, match="wandb online init failed") as caught:
        folder = dashboard.log_report(run, "online")
    assert len([w for w in caught if "online init failed" in str(w.message)]) == 1
    assert folder == offline_run(out) and folder.name.endswith(run.id)
    assert decoded_run(next(folder.glob("run-*.wandb")))["summary"]["verdict"] == "supported"
