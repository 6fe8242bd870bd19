"""A checkpoint gives back exactly the model slice it saved (every leaf, dtype and pytree node), keeps only the
last one, and its files get the umask's mode like the rest of the run folder."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from bnstudy.app import checkpoints
from bnstudy.core.engine import HParams
from bnstudy.core.trainer import build_train_programs
from conftest import build_model, setup_of


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_restored_model_slice_equals_the_saved_one_and_only_the_last_is_kept(tmp_path, optimizer):
    setup = setup_of(build_model(), optimizer=optimizer, batch_size=8)
    programs = build_train_programs(setup, (28, 28, 1), steps_per_epoch=1, probe_every=0, multipliers=(), ics_every=0)
    hp = HParams.stack([dict(lr=0.1, weight_decay=0.0, init_scale=1.0, dropout_rate=0.0, seed=s) for s in (3, 4)])
    pack = jax.device_get(programs.init(hp))
    pack = pack.replace(step=pack.step + 7, diverged=np.array([False, True]), diverged_step=np.array([-1, 5], np.int32))
    writer = checkpoints.Writer(tmp_path)
    writer.save(checkpoints.model_slice(pack, 0), checkpoints.Progress(epoch=1, step=7, metrics_records=3))
    writer.save(checkpoints.model_slice(pack, 1), checkpoints.Progress(epoch=2, step=14, metrics_records=9))
    writer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["2"]  # the last one only

    target = checkpoints.model_shape(pack)
    state, progress = checkpoints.restore(tmp_path, target)
    assert progress == checkpoints.Progress(epoch=2, step=14, metrics_records=9) == checkpoints.latest(tmp_path)
    assert_same_tree(state, checkpoints.model_slice(pack, 1))
    assert_same_tree(checkpoints.stack([checkpoints.model_slice(pack, k) for k in (0, 1)]), pack)

    mask = os.umask(0)
    os.umask(mask)
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "checkpoint").rglob("*") if p.is_file()}
    assert modes == {0o666 & ~mask}
    checkpoints.remove(tmp_path)
    assert checkpoints.latest(tmp_path) is None


def test_a_run_folder_given_relative_to_the_working_directory_checkpoints_and_restores(tmp_path, monkeypatch):
    """`out_dir=outputs/...` is relative; orbax itself refuses relative paths."""
    setup = setup_of(build_model(), optimizer="sgd", batch_size=8)
    programs = build_train_programs(setup, (28, 28, 1), steps_per_epoch=1, probe_every=0, multipliers=(), ics_every=0)
    hp = HParams.stack([dict(lr=0.1, weight_decay=0.0, init_scale=1.0, dropout_rate=0.0, seed=0)])
    state = checkpoints.model_slice(jax.device_get(programs.init(hp)), 0)
    monkeypatch.chdir(tmp_path)
    writer = checkpoints.Writer(os.path.join("outputs", "run"))
    writer.save(state, checkpoints.Progress(epoch=1, step=1, metrics_records=1))
    writer.close()
    restored, progress = checkpoints.restore(os.path.join("outputs", "run"), state)
    assert progress.epoch == 1 and (tmp_path / "outputs" / "run" / "checkpoint" / "1").is_dir()
    assert_same_tree(restored, state)


def test_a_reopened_run_folder_keeps_the_records_before_the_checkpoint_and_its_wandb_id(tmp_path):
    from bnstudy.app import runs

    folder = runs.RunFolder(tmp_path / "run", {"seed": 0}, {"config_hash": "h", "started_at": "t0"})
    for step in (4, 8, 8, 8, 12):  # train window, evaluation and the next epoch's first probe share step 8
        folder.log(step, {"x": step})
    folder.finish({"status": "interrupted", "error": "interrupted by SIGTERM", "wandb_id": "abc"})

    again = runs.RunFolder(tmp_path / "run", {"seed": 0}, {"config_hash": "h", "resumed_at": "t1"}, resume=(8, 3))
    assert again.records == 3 and [r["step"] for r in runs.read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [4, 8, 8]
    assert again.summary["wandb_id"] == "abc" and again.summary["started_at"] == "t0"
    assert again.summary["status"] == "running" and "error" not in again.summary
    again.log(8, {"x": 8})
    assert again.records == 4


def test_a_signal_during_a_checkpoint_waits_for_it_then_interrupts():
    import signal

    from bnstudy.app.signals import RunInterrupted, interrupts_as_exceptions, signals_deferred

    finished = []
    with pytest.raises(RunInterrupted) as stopped, interrupts_as_exceptions():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            finished.append("checkpoint written")  # runs although the signal has arrived
        finished.append("not reached")
    assert finished == ["checkpoint written"] and stopped.value.signum == signal.SIGTERM
