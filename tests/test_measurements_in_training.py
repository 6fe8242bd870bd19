"""The measurements of issue-level mechanisms as the trainer and the app run them: ICS probes, dead units
at each evaluation, evaluations every N steps with steps_to_target, and layer/group norm as arms."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnstudy.core import metrics, trainer
from conftest import cnn_program, hparams, imports_tensorflow, make_arrays, schedule

# 4 steps per epoch, 2 epochs; ICS before steps 0, 2, 4, 6; evaluations after 3, 6 and 8 steps.
MEASURED = schedule(
    epochs=2, log_every=2, max_steps_per_epoch=4, eval_batch_size=24, ics_every=2, eval_every_steps=3, dead_units=True
)
PACK_RTOL = 2e-4  # vmapped convs are grouped convs on XLA:CPU: a pack agrees to float32 round-off


@pytest.fixture
def arrays():
    return make_arrays(shape=(10, 10, 1))  # small images: what is measured when is under test, and they compile faster


def train(arrays, rows, sched=MEASURED):
    """Train a pack; returns the result and every logged record as (step, {key: [K]})."""
    logs = []
    pt = trainer.PackTrainer(cnn_program("before_relu", batch_size=32), arrays, sched)
    result = pt.train(hparams(rows), lambda step, epoch, m: logs.append((step, m)))
    return result, logs


def logged(logs, prefix):
    """{step: {key: [K]}} of the records holding keys with this prefix."""
    return {
        step: {k: v for k, v in m.items() if k.startswith(prefix)}
        for step, m in logs
        if any(k.startswith(prefix) for k in m)
    }


@pytest.mark.slow
def test_ics_and_dead_units_are_logged_at_their_steps_and_match_each_run_alone(arrays):
    rows = [{"lr": 0.02, "seed": 0}, {"lr": 0.1, "seed": 1}, {"lr": 0.05, "seed": 2, "init_scale": 0.5}]
    packed, packed_logs = train(arrays, rows)
    ics, dead = logged(packed_logs, "ics/"), logged(packed_logs, "relu/")
    assert sorted(ics) == [0, 2, 4, 6]  # probed before those steps, logged at the steps done
    assert sorted(dead) == [3, 6, 8] == sorted(logged(packed_logs, "test/acc"))
    layers = ("conv1", "conv2", "dense1", "classifier")
    assert set(ics[2]) == {f"ics/{name}/{m}" for name in layers for m in ("l2", "rel", "cos")}
    assert set(dead[8]) == {f"relu/{name}/dead_frac" for name in ("conv1", "conv2", "dense1")}
    # The first weight layer has nothing before it: G' = G exactly.
    np.testing.assert_array_equal(ics[2]["ics/conv1/l2"], 0.0)
    # Medians over the probes after step 0 (steps 2, 4, 6), beside the last probe's value.
    for key in ("ics/dense1/l2", "ics/classifier/cos"):
        stacked = np.stack([ics[s][key] for s in (2, 4, 6)])
        np.testing.assert_allclose(packed.final[f"{key}_median"], np.median(stacked, axis=0), rtol=1e-6)
        np.testing.assert_array_equal(packed.final[key], ics[6][key])
    for k, row in enumerate(rows):
        alone, alone_logs = train(arrays, [row])
        for step, record in logged(alone_logs, "ics/").items():
            for key, v in record.items():
                np.testing.assert_allclose(ics[step][key][k], v[0], rtol=PACK_RTOL, atol=1e-6, err_msg=key)
        for step, record in logged(alone_logs, "relu/").items():
            for key, v in record.items():  # fractions of counted units: close weights, same units
                assert dead[step][key][k] == pytest.approx(v[0], abs=1.5 / 128), key
    assert len({float(x) for x in ics[4]["ics/dense1/l2"]}) == 3  # the runs really differ


def test_dead_fraction_is_over_the_whole_test_split_in_inference_mode(arrays):
    """24-example batches of a 64-example split: 3 batches, the last one padded; the padding must not count."""
    result, _ = train(arrays, [{"lr": 0.5, "seed": 3}], schedule(**{**MEASURED.__dict__, "ics_every": 0}))
    setup = cnn_program("before_relu", batch_size=32)
    one = jax.tree.map(lambda a: a[0], result.state)
    whole = jax.jit(partial(metrics.eval_batch_with_units, setup))(  # op by op, each op would compile
        one.params,
        one.batch_stats,
        arrays.test_images,
        arrays.test_labels,
        jnp.ones(arrays.test_labels.shape[0]),
    )
    expected = metrics.dead_unit_fractions(whole["relu_positive"])
    for key, v in expected.items():
        assert result.final[key][0] == pytest.approx(float(v), abs=1e-7), key
    assert result.final["test/acc"][0] == pytest.approx(float(whole["correct_sum"]) / 64, abs=1e-7)


@pytest.mark.slow
def test_scan_loop_evaluates_and_probes_at_the_same_steps_as_the_python_loop(arrays):
    rows = [{"lr": 0.05, "seed": 5}]
    py, py_logs = train(arrays, rows, schedule(**{**MEASURED.__dict__, "loop": "python"}))
    sc, sc_logs = train(arrays, rows, schedule(**{**MEASURED.__dict__, "loop": "scan"}))
    assert [s for s, _ in sc_logs] == [s for s, _ in py_logs]
    for (_, a), (_, b) in zip(py_logs, sc_logs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    ("eval_every", "eval_every_steps", "epochs", "points"),
    [
        (1, 0, 3, [[4], [4], [4]]),
        (2, 0, 3, [[], [4], [4]]),  # the end of training is always evaluated
        (0, 0, 2, [[], [4]]),
        (1, 3, 3, [[3], [2], [1, 4]]),  # steps 3, 6, 9 and the end (12); eval_every is then not used
        (1, 4, 2, [[4], [4]]),
    ],
)
def test_evaluation_points(arrays, eval_every, eval_every_steps, epochs, points):
    sched = schedule(epochs=epochs, max_steps_per_epoch=4, eval_every=eval_every, eval_every_steps=eval_every_steps)
    pt = trainer.PackTrainer(cnn_program(), arrays, sched)
    assert [list(pt.evaluation_points(e)) for e in range(epochs)] == points


def test_ics_medians_skip_step_zero_and_nan():
    probes = [
        {"ics/a/l2": np.array([1.0, np.nan])},
        {"ics/a/l2": np.array([3.0, np.nan])},
        {"ics/a/l2": np.array([8.0, np.nan])},
    ]
    out = trainer.ics_medians(probes)
    assert out["ics/a/l2_median"][0] == 3.0 and np.isnan(out["ics/a/l2_median"][1])
    assert trainer.ics_medians([]) == {}


# --------------------------------------------------------------------------- the app


def run_folders(out):
    return sorted(p.parent for p in out.glob("*/*/summary.json"))


@pytest.mark.slow
@imports_tensorflow
def test_app_run_writes_ics_dead_units_and_steps_to_target(mock_tfds, run_app):
    out = run_app(
        "logger.wandb.mode=offline",
        "ics.every=1",
        "train.eval_every_steps=2",
        "train.target_acc=0.01",
        "discrepancy.enabled=true",
        "discrepancy.train_subset=64",
    )
    (folder,) = run_folders(out)
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "ics/dense1/l2" in r] == [0, 1, 2]
    assert [r["step"] for r in records if "relu/conv1/dead_frac" in r] == [2, 3]  # every 2 steps and the end
    for key in ("ics/dense1/l2", "ics/dense1/l2_median", "ics/conv2/cos_median", "relu/dense1/dead_frac", "disc/kl"):
        assert isinstance(summary[key], float), key
    # A 1% target is reached at the first evaluation, read on the validation split (dataset.val_size's default).
    assert summary["steps_to_target"] == 2 and summary["steps_to_target_key"] == "val/acc"
    (wandb_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    raw = wandb_file.read_bytes()
    assert all(k.encode() in raw for k in ("ics/dense1/l2", "relu/conv1/dead_frac", "ics/dense1/l2_median"))


@pytest.mark.parametrize("kind", ["layer", pytest.param("group", marks=pytest.mark.slow)])
def test_layer_and_group_norm_run_end_to_end_without_bn_keys(small_data, run_app, kind):
    out = run_app(f"model.norm_kind={kind}", "discrepancy.enabled=true", "discrepancy.train_subset=64")
    (folder,) = run_folders(out)
    summary = json.loads((folder / "summary.json").read_text())
    keys = set(summary) | {k for line in (folder / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert summary["status"] == "done" and f"before_relu-{kind}" in folder.name
    assert "test/acc" in keys and "relu/dense1/dead_frac" in keys
    assert not [k for k in keys if k.startswith(("disc/", "bn/"))]
