"""The lr schedules: each is optax's own schedule times the run's traced peak lr, warmup rises from 0, the update,
the log and both probes use the lr of their step, a pack of different peak lrs compiles once and trains each as
alone, and a run resumed mid-schedule ends with the numbers of an uninterrupted one."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnstudy.app import config as config_lib
from bnstudy.app import runs
from bnstudy.core import engine, metrics, trainer
from bnstudy.core.lr_schedule import LrSchedule, learning_rate
from conftest import build_model, hparams, initial_state, make_arrays, schedule, setup_of

TOTAL = 100
STEPS = jnp.arange(TOTAL + 1)
DIGITS = {"dataset": {"name": "mnist_t10k"}}


def lr_schedule(name, warmup=0.0, floor=0.0, milestones=(0.5, 0.75), factor=0.1, total=TOTAL):
    shape = LrSchedule(name=name, warmup=warmup, floor=floor, milestones=milestones, factor=factor, total_steps=None)
    return shape.over(total)


def values(s: LrSchedule) -> np.ndarray:
    return np.asarray(jax.vmap(s.multiplier)(STEPS))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lr_schedule("constant"), optax.constant_schedule(1.0)),
        (lr_schedule("cosine"), optax.cosine_decay_schedule(1.0, TOTAL)),
        (lr_schedule("cosine", floor=0.1), optax.cosine_decay_schedule(1.0, TOTAL, alpha=0.1)),
        (lr_schedule("cosine", warmup=0.1, floor=0.05), optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, TOTAL, 0.05)),
        (lr_schedule("step"), optax.piecewise_constant_schedule(1.0, {50: 0.1, 75: 0.1})),
        (lr_schedule("step", milestones=(0.3,), factor=0.2), optax.piecewise_constant_schedule(1.0, {30: 0.2})),
        (lr_schedule("constant", warmup=0.2), optax.linear_schedule(0.0, 1.0, 20)),
    ],
    ids=["constant", "cosine", "cosine-floor", "cosine-warmup", "step", "step-one-milestone", "constant-warmup"],
)
def test_each_schedule_is_optax_s_own_with_a_peak_of_one(ours, theirs):
    np.testing.assert_allclose(values(ours), np.asarray(jax.vmap(theirs)(STEPS)), rtol=1e-6, atol=1e-7)


def test_milestones_that_meet_multiply_and_a_milestone_inside_the_warmup_still_counts():
    short = values(lr_schedule("step", milestones=(0.5, 0.51), total=10))[:11]  # both round to step 5
    np.testing.assert_allclose(short[4:7], [1.0, 0.01, 0.01], rtol=1e-6)
    early = values(lr_schedule("step", warmup=0.2, milestones=(0.1,), factor=0.5))
    np.testing.assert_allclose(early[[5, 10, 20, 50]], [0.25, 0.25, 0.5, 0.5], rtol=1e-6)  # warmup: 20 steps


def test_the_shapes_at_their_landmarks():
    cosine = values(lr_schedule("cosine", floor=0.1))
    assert cosine[0] == 1.0 and cosine[TOTAL // 2] == pytest.approx(0.55) and cosine[TOTAL] == pytest.approx(0.1)
    assert np.all(np.diff(cosine) <= 0)
    step = values(lr_schedule("step"))
    assert step[49] == 1.0 and step[50] == pytest.approx(0.1) and step[74] == pytest.approx(0.1)
    assert step[75] == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["constant", "cosine", "step"])
def test_warmup_rises_linearly_from_zero_to_the_peak_then_follows_the_schedule(name):
    warm = values(lr_schedule(name, warmup=0.1))
    np.testing.assert_allclose(warm[:11], np.linspace(0.0, 1.0, 11), atol=1e-6)
    if name == "step":  # the milestones stay where they were: fractions of the whole run, warmup included
        assert warm[49] == 1.0 and warm[50] == pytest.approx(0.1) and warm[75] == pytest.approx(0.01)
    if name == "cosine":
        assert warm[TOTAL] == pytest.approx(0.0, abs=1e-6) and np.all(np.diff(warm[10:]) <= 1e-7)


def test_a_constant_lr_is_the_peak_itself_and_needs_no_step_count():
    shape = LrSchedule(name="constant", warmup=0.0, floor=0.0, milestones=(), factor=0.1, total_steps=None)
    assert shape.over(50) is shape and shape.is_constant
    peak = jnp.float32(0.3)
    assert learning_rate(shape, peak, jnp.int32(7)) is peak  # the program of a run without a schedule
    with pytest.raises(ValueError, match="total steps"):
        dataclasses.replace(shape, name="cosine").multiplier(jnp.int32(0))


# ------------------------------------------------------------------------- the step, its log and the probes

SMALL = make_arrays(n_train=32, n_test=8, shape=(8, 8, 1))  # 8x8 images: the step compiles fast


def small_setup(lr_schedule_):
    return setup_of(build_model("cnn"), batch_size=8, input_mean=(0.13,), input_std=(0.31,), lr_schedule=lr_schedule_)


def test_the_update_the_log_and_both_probes_use_the_lr_of_their_step():
    """At step 5 of a cosine schedule over 8 steps, a step, the smoothness probe and the ICS probe give what a
    constant lr equal to that step's lr gives: the lr is taken at the state's own step counter."""
    cosine = lr_schedule("cosine", warmup=0.25, total=8)
    scheduled, constant = small_setup(cosine), small_setup(lr_schedule("constant"))
    hp = jax.tree.map(lambda v: v[0], hparams([{"lr": 0.2, "seed": 1}]))
    state = initial_state(scheduled, (8, 8, 1), hp).replace(step=jnp.int32(5))
    lr5 = np.float32(0.2) * np.float32(cosine.multiplier(jnp.int32(5)))
    assert 0.01 < lr5 < 0.19  # well inside the decay: neither the peak nor zero
    hp5 = hp._replace(lr=jnp.float32(lr5))
    perm = jax.jit(engine.epoch_permutation, static_argnums=2)(hp.seed, 0, 32)

    def step(setup, h):
        return jax.jit(lambda s, h: engine.train_step(setup, s, h, SMALL, perm, 1))(state, h)

    def probes(setup, h):
        smooth = lambda s, h: metrics.smoothness_probe(setup, (0.5, 2.0), False, s, h, SMALL, perm, 1)  # noqa: E731
        ics = lambda s, h: metrics.ics_probe(setup, s, h, SMALL, perm, 1)  # noqa: E731
        return jax.jit(lambda s, h: {**smooth(s, h), **ics(s, h)})(state, h)

    (new, logged), (expected, expected_logged) = step(scheduled, hp), step(constant, hp5)
    np.testing.assert_allclose(expected_logged["lr"], lr5, rtol=1e-6)
    np.testing.assert_allclose(logged["lr"], lr5, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    at_peak = step(constant, hp)[0]
    assert not np.allclose(np.asarray(jax.tree.leaves(at_peak.params)[0]), np.asarray(jax.tree.leaves(new.params)[0]))
    got, want = probes(scheduled, hp), probes(constant, hp5)
    assert set(got) == set(want) and any(k.startswith("ics/") for k in got)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-7, err_msg=key)


# ------------------------------------------------------------------------- packs and resume, through the trainer

SCHEDULE = schedule(epochs=2, log_every=1, max_steps_per_epoch=3, eval_batch_size=8)
PACK_RTOL = 2e-4  # vmap turns the convs into grouped convs: a pack agrees with solo training to round-off


def scheduled_trainer():
    return trainer.PackTrainer(small_setup(lr_schedule("cosine", warmup=0.2)), SMALL, SCHEDULE)


def train(pt, rows, **kw):
    logs = []
    result = pt.train(hparams(rows), lambda step, epoch, m: logs.append(m) if "train/loss" in m else None, **kw)
    return result, {k: np.stack([m[k] for m in logs]) for k in ("train/loss", "train/lr")}


def test_a_pack_of_peak_lrs_compiles_once_and_trains_each_as_alone():
    rows = [{"lr": 0.05, "seed": 0}, {"lr": 0.2, "seed": 0}]
    pt = scheduled_trainer()
    packed, packed_logs = train(pt, rows)
    lrs = packed_logs["train/lr"]
    # 6 steps, warmup round(0.2 * 6) = 1 step: lr 0 at step 0, the peak at step 1, then the cosine down.
    np.testing.assert_allclose(lrs[:2], [[0.0, 0.0], [0.05, 0.2]], rtol=1e-6)
    assert np.all(np.diff(lrs[1:], axis=0) < 0) and np.allclose(lrs[:, 1], 4 * lrs[:, 0], rtol=1e-6)
    compiled = pt.cache.compile_seconds
    train(pt, [{"lr": 0.01, "seed": 2}, {"lr": 0.3, "seed": 3}])  # other peaks: the same programs
    assert pt.cache.compile_seconds == compiled
    for k, row in enumerate(rows):
        alone, alone_logs = train(scheduled_trainer(), [row])
        np.testing.assert_allclose(packed_logs["train/lr"][:, k], alone_logs["train/lr"][:, 0], rtol=1e-6)
        np.testing.assert_allclose(packed_logs["train/loss"][:, k], alone_logs["train/loss"][:, 0], rtol=PACK_RTOL)
        np.testing.assert_allclose(packed.final["test/loss"][k], alone.final["test/loss"][0], rtol=PACK_RTOL)


def test_a_run_resumed_mid_schedule_ends_with_the_numbers_of_an_uninterrupted_one():
    pt, hp_rows = scheduled_trainer(), [{"lr": 0.2, "seed": 4}]
    saved = {}

    def on_epoch_end(state, epoch):
        saved.setdefault(epoch, jax.device_get(state))  # a copy: the next epoch donates the state's buffers

    whole, whole_logs = train(pt, hp_rows, on_epoch_end=on_epoch_end)
    assert int(saved[0].step[0]) == 3  # resumed halfway: the lr is mid-decay there
    resumed, resumed_logs = train(pt, hp_rows, state=jax.device_put(saved[0]), start_epoch=1)
    np.testing.assert_array_equal(resumed_logs["train/lr"], whole_logs["train/lr"][3:])
    assert resumed_logs["train/lr"][0, 0] < 0.2
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(whole.final["test/loss"], resumed.final["test/loss"])


# ------------------------------------------------------------------------- the config and the run's identity


def parse(schedule_keys: dict):
    return config_lib.parse({**DIGITS, "optimizer": {"schedule": schedule_keys}})


# The default run's hash from before optimizer.schedule existed (tests/test_deep_models.py's DEFAULT_RUN_HASH).
DEFAULT_RUN_HASH = "e6413c77"


def test_a_constant_lr_keeps_the_run_ids_and_a_schedule_changes_them_by_what_it_uses():
    assert (
        runs.config_hash(parse({})) == runs.config_hash(parse({"name": "constant", "floor": 0.3})) == DEFAULT_RUN_HASH
    )
    cosine = parse({"name": "cosine"})
    assert runs.config_hash(cosine) != DEFAULT_RUN_HASH
    assert runs.run_name(cosine) == "mnist_t10k-cnn-before_relu-lr0.1-cosine-bs128-s0"
    assert runs.config_hash(parse({"name": "cosine", "milestones": [0.3]})) == runs.config_hash(cosine)  # unused
    assert runs.config_hash(parse({"name": "cosine", "floor": 0.1})) != runs.config_hash(cosine)
    assert runs.config_hash(parse({"name": "constant", "warmup": 0.1})) != DEFAULT_RUN_HASH
    assert runs.config_hash(parse({"name": "step"})) != runs.config_hash(parse({"name": "step", "factor": 0.2}))


@pytest.mark.parametrize(
    "keys, key, expected",
    [
        ({"name": "linear"}, "optimizer.schedule.name", "one of ['constant', 'cosine', 'step']"),
        ({"warmup": 1.0}, "optimizer.schedule.warmup", "in [0, 1)"),
        ({"floor": -0.1}, "optimizer.schedule.floor", "in [0, 1]"),
        ({"factor": 0}, "optimizer.schedule.factor", "in (0, 1]"),
        ({"milestones": [0.75, 0.5]}, "optimizer.schedule.milestones", "increasing fractions"),
        ({"milestones": [0.5, 1.5]}, "optimizer.schedule.milestones", "each in (0, 1)"),
        ({"name": ["cosine", "step"]}, "optimizer.schedule.name", "multirun"),
    ],
)
def test_a_bad_schedule_is_refused_naming_its_key(keys, key, expected):
    with pytest.raises(config_lib.ConfigError) as err:
        parse(keys)
    assert f"`{key}`" in str(err.value) and expected in str(err.value)


def test_the_trainer_sets_the_schedule_over_the_run_s_steps():
    pt = scheduled_trainer()
    assert pt.setup.lr_schedule.total_steps == SCHEDULE.epochs * pt.steps_per_epoch == 6


def test_a_run_records_its_schedule_and_logs_the_lr_of_each_step(small_data, run_app):
    import json

    import yaml

    out = run_app("optimizer.schedule.name=step", "optimizer.schedule.milestones=[0.5]", "train.log_every=1")
    (folder,) = [p for p in (out / "default").iterdir() if (p / "summary.json").exists()]
    assert "-lr0.1-step-" in folder.name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["lr_schedule"] == "step(x0.1 at 0.5)"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["optimizer"]["schedule"] == {
        "name": "step",
        "warmup": 0.0,
        "floor": 0.0,
        "milestones": [0.5],
        "factor": 0.1,
    }
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert lrs == pytest.approx([0.1, 0.1, 0.01])  # 3 steps: x0.1 from step round(0.5 * 3) = 2 on
