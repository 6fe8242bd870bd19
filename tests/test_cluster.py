"""The cluster path: a Hydra sweep through submitit's local executor runs every job to its end (and, in the slow
run, trains them), and the SLURM launcher config becomes the sbatch script its comments promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bnstudy.app import config as config_lib
from bnstudy.app import config_tree, runs
from conftest import TINY, subprocess_env

config_tree.register()


def sweep_command(tmp_path, *overrides: str) -> list[str]:
    """`python -m bnstudy.train` sweeping model.norm over two jobs through submitit's local executor."""
    return [
        sys.executable, "-m", "bnstudy.train", "-m", "hydra/launcher=submitit_local", "model.norm=none,before_relu",
        *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.launcher.submitit_folder={tmp_path / 'submitit' / '%j'}",
    ]  # fmt: skip


def write_done_result(*overrides: str) -> Path:
    """A finished run folder of exactly the config these overrides give, written by bnstudy's own writer."""
    with initialize_config_dir(config_dir=str(config_tree.config_dir()), version_base="1.3"):
        (run,) = config_lib.expand_pack(config_lib.parse(compose("config", overrides=list(overrides))))
    folder = runs.run_dir(run)
    start = {"run_id": runs.run_id(run), "config_hash": runs.config_hash(run), "path": str(folder)}
    runs.RunFolder(folder, config_lib.to_dict(run), start).finish({"status": "done", "test/acc": 0.5})
    return folder


def test_a_two_job_sweep_through_submitit_local_runs_each_job_to_its_end(tmp_path):
    """The launcher's whole path, each job in a process of its own, at the cost of starting them: each job finds
    its run finished (as after a requeue) and ends without training; the sweep that trains is marked slow."""
    job = [*TINY, f"out_dir={tmp_path / 'out'}"]
    done = {norm: write_done_result(*job, f"model.norm={norm}") for norm in ("none", "before_relu")}
    before = {norm: (folder / "summary.json").read_bytes() for norm, folder in done.items()}
    result = subprocess.run(
        sweep_command(tmp_path, *job), env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = sorted((tmp_path / "submitit").glob("*/*_log.out"))
    assert len(logs) == 2, "submitit wrote no job logs where it was told"
    for norm, folder in done.items():
        (log,) = [p for p in logs if f"-> {folder}" in p.read_text()]  # each job handled one of the runs...
        assert "skipped: already done" in log.read_text() and "Job completed successfully" in log.read_text()
        assert (folder / "summary.json").read_bytes() == before[norm]  # ...read it, and left it as it was
    assert runs.run_folders(tmp_path / "out" / "default") == sorted(done.values())


# Two jobs that train in submitit's processes at once: ~25 s of the default run on a shared 2-core CPU (process
# starts and cold compiles). By default the launcher's path runs in the test above, and training in a subprocess
# on these data in tests/test_reliability.py.
@pytest.mark.slow
@pytest.mark.xdist_group("prepared_digits")  # the worker that holds the session's prepared digits
def test_a_two_job_sweep_runs_through_submitit_local_and_finishes_both(tmp_path, tfds_dir):
    out = tmp_path / "out"
    cmd = sweep_command(
        tmp_path, *TINY, "dataset.train_subset=256", "dataset.test_subset=64", f"dataset.data_dir={tfds_dir}",
        f"out_dir={out}",
    )  # fmt: skip
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = runs.run_folders(out / "default")
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    assert sorted(yaml.safe_load((f / "config.yaml").read_text())["model"]["norm"] for f in folders) == [
        "before_relu", "none",
    ]  # fmt: skip
    assert [s["status"] for s in summaries] == ["done", "done"]
    assert list((tmp_path / "submitit").glob("*/*_log.out")), "submitit wrote no job logs where it was told"


def slurm_launcher(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(config_tree.config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=False)


def test_the_slurm_launcher_config_becomes_a_requeueing_sbatch_script():
    from submitit.slurm.slurm import _make_sbatch_string

    launcher = slurm_launcher("hydra.launcher.partition=gpu")
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["max_num_timeout"] >= 1 and launcher["tasks_per_node"] == 1 and launcher["nodes"] == 1
    # The keys as the plugin hands them to submitit's SLURM executor (hydra_submitit_launcher's launch()).
    sbatch_keys = {"partition", "account", "qos", "gpus_per_node", "cpus_per_task", "setup", "signal_delay_s",
                   "array_parallelism", "stderr_to_stdout", "additional_parameters"}  # fmt: skip
    params = {k: v for k, v in launcher.items() if k in sbatch_keys}
    script = _make_sbatch_string(
        "python -m bnstudy.train", folder="/logs/%j", job_name="bnstudy", time=launcher["timeout_min"],
        mem=f"{launcher['mem_gb']}GB", ntasks_per_node=launcher["tasks_per_node"], nodes=launcher["nodes"],
        map_count=100, **params,
    )  # fmt: skip
    assert f"#SBATCH --time={launcher['timeout_min']}" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gpus-per-node=1" in script
    assert f"#SBATCH --array=0-99%{launcher['array_parallelism']}" in script
    assert f"@{launcher['signal_delay_s']}" in script  # the warning signal that triggers the requeue
    assert "export XLA_PYTHON_CLIENT_PREALLOCATE=false" in script
    assert "#SBATCH --output=/logs/" in script  # the task logs go to submitit_folder
