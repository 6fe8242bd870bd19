"""A checkpoint gives back exactly the model slice it saved (every leaf, dtype and pytree node), keeps only the
last one, and its files get the umask's mode like the rest of the run folder."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from bnstudy import checkpoints
from bnstudy.engine import HParams, Program
from bnstudy.trainer import build_train_programs
from conftest import build_model


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_restored_model_slice_equals_the_saved_one_and_only_the_last_is_kept(tmp_path, optimizer):
    program = Program(model=build_model(), optimizer=optimizer, batch_size=8)
    programs = build_train_programs(program, (28, 28, 1), steps_per_epoch=1, probe_every=0, multipliers=())
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
