"""The pack trainer: reproducible, divergence is a result, a pack trains each model exactly as alone,
compiled programs are reused, and pack sizing follows device memory."""

import numpy as np
import pytest

from bnstudy.core import trainer
from conftest import cnn_program, hparams, make_arrays, schedule

SCHEDULE = schedule(epochs=2, log_every=1, max_steps_per_epoch=4, eval_batch_size=64)


@pytest.fixture
def arrays():
    return make_arrays(shape=(10, 10, 1))  # small images: the trainer is under test, and they compile faster


def train(arrays, rows, norm="before_relu", sched=SCHEDULE, **program_kw):
    """Train a pack; returns the result and per-step logs as {key: [steps, K]}."""
    logs = []
    pt = trainer.PackTrainer(cnn_program(norm, **program_kw), arrays, sched)
    result = pt.train(hparams(rows), lambda step, epoch, m: logs.append(m) if "train/loss" in m else None)
    stacked = {k: np.stack([m[k] for m in logs]) for k in ("train/loss", "train/acc")}
    return result, stacked


def test_same_seed_same_numbers_different_seed_different(arrays):
    _, a = train(arrays, [{"seed": 1}])
    _, b = train(arrays, [{"seed": 1}])
    _, c = train(arrays, [{"seed": 2}])
    np.testing.assert_array_equal(a["train/loss"], b["train/loss"])
    assert not np.allclose(a["train/loss"], c["train/loss"])


def test_model_learns_the_synthetic_task(arrays):
    result, logs = train(arrays, [{"lr": 0.05}], sched=schedule(epochs=3, log_every=8, eval_batch_size=64))
    assert logs["train/loss"][-1, 0] < 0.5 * logs["train/loss"][0, 0]
    assert result.final["test/acc"][0] > 0.5


def test_huge_lr_diverges_as_a_result_and_freezes(arrays):
    result, _ = train(arrays, [{"lr": 1e6}], norm="none")
    assert result.diverged_step[0] >= 0
    summary = trainer.summarize_final(result)[0]
    assert summary["status"] == "diverged"
    # Frozen at the last finite parameters: nothing non-finite leaks into the state.
    import jax

    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(result.state.params))


# vmap turns the convs into grouped convs, so a pack is not bitwise equal to solo training on XLA:CPU;
# losses agree to float32 round-off accumulated over the steps.
PACK_RTOL = 2e-4


def test_pack_of_three_matches_each_model_trained_alone(arrays):
    rows = [{"lr": 0.02, "seed": 0}, {"lr": 0.05, "seed": 1}, {"lr": 0.1, "seed": 2, "init_scale": 0.5}]
    packed, packed_logs = train(arrays, rows)
    for k, row in enumerate(rows):
        alone, alone_logs = train(arrays, [row])
        np.testing.assert_allclose(packed_logs["train/loss"][:, k], alone_logs["train/loss"][:, 0], rtol=PACK_RTOL)
        np.testing.assert_allclose(packed.final["test/loss"][k], alone.final["test/loss"][0], rtol=PACK_RTOL)
        assert packed.final["test/acc"][k] == pytest.approx(alone.final["test/acc"][0], abs=1.5 / 64)


def test_a_pack_whose_every_run_diverged_stops_at_the_end_of_that_epoch(arrays):
    sched = schedule(epochs=3, log_every=1, max_steps_per_epoch=4, eval_batch_size=64)
    result, logs = train(arrays, [{"lr": 1e6, "seed": 0}, {"lr": 1e7, "seed": 1}], norm="none", sched=sched)
    assert (result.diverged_step >= 0).all() and (result.diverged_step < 4).all()  # both within epoch 1
    assert result.epochs_trained == 1 and len(logs["train/loss"]) == 4  # epochs 2 and 3 not trained
    assert [s["status"] for s in trainer.summarize_final(result)] == ["diverged", "diverged"]


def test_diverging_member_does_not_disturb_the_rest_of_its_pack(arrays):
    rows = [{"lr": 0.05, "seed": 0}, {"lr": 1e6, "seed": 0}]
    packed, packed_logs = train(arrays, rows, norm="none")
    alone, alone_logs = train(arrays, rows[:1], norm="none")
    assert packed.diverged_step.tolist()[0] == -1 and packed.diverged_step[1] >= 0
    assert packed.epochs_trained == SCHEDULE.epochs  # one run still finite: the pack trains to the end
    np.testing.assert_allclose(packed_logs["train/loss"][:, 0], alone_logs["train/loss"][:, 0], rtol=PACK_RTOL)


@pytest.mark.xdist_group("dropout_cnn_pack")  # after tests/test_metrics.py's probe tests, on their worker
def test_scan_loop_matches_python_loop():
    # The data, model and schedule of tests/test_metrics.py's probe tests, over two epochs: the python loop's step
    # and the scan's epoch are the programs they compiled (seconds each), found in the compilation cache.
    data = make_arrays(n_train=64, n_test=24, shape=(10, 10, 1))
    sched = schedule(epochs=2, log_every=1, max_steps_per_epoch=3, eval_batch_size=24)
    rows = [{"lr": 0.05, "seed": 3, "dropout_rate": 0.2}]
    kw = dict(batch_size=16, dropout_placement="before_classifier")  # one dropout mask: faster compiles than three
    py, py_logs = train(data, rows, sched=sched, **kw)
    sc, sc_logs = train(data, rows, sched=schedule(**{**sched.__dict__, "loop": "scan"}), **kw)
    np.testing.assert_allclose(sc_logs["train/loss"], py_logs["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(sc.final["test/loss"], py.final["test/loss"], rtol=1e-5)


def test_batch_larger_than_training_set_is_refused(arrays):
    with pytest.raises(ValueError, match="exceeds"):
        trainer.PackTrainer(cnn_program(batch_size=10_000), arrays, SCHEDULE)


def test_auto_pack_size_follows_measured_device_memory(arrays, monkeypatch):
    import jax

    from bnstudy.core import pack_size

    pt = trainer.PackTrainer(cnn_program(batch_size=32), arrays, SCHEDULE)
    assert pack_size.resolve_pack_size("auto", 50, pt) == 1  # CPU: one model per program
    assert pack_size.resolve_pack_size(8, 5, pt) == 5  # never more than the runs

    class FakeAccelerator:
        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit}

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    sizes = {}
    for mib in (128, 512):  # below the cap at a few MB per model
        monkeypatch.setattr(jax, "devices", lambda *a, mib=mib: [FakeAccelerator(mib * 2**20)])
        sizes[mib] = pack_size.resolve_pack_size("auto", 10_000, pt)
    assert 1 <= sizes[128] < sizes[512] <= pack_size.ACCELERATOR_PACK_CAP
    assert pack_size.resolve_pack_size("auto", 3, pt) <= 3


def test_later_packs_of_the_same_shape_reuse_the_compiled_programs(arrays):
    from bnstudy.core import compiled

    compiled.forget_compiled_programs()  # what earlier tests of this process compiled
    pt = trainer.PackTrainer(cnn_program(), arrays, SCHEDULE)
    pt.train(hparams([{"seed": 0}]), lambda *a: None)
    held, seconds = compiled.programs_held(), pt.cache.compile_seconds
    assert held > 0 and seconds > 0
    pt.train(hparams([{"seed": 1}]), lambda *a: None)
    assert compiled.programs_held() == held and pt.cache.compile_seconds == seconds
    # A second trainer of the same setup in this process gets the same jitted functions, nothing compiled anew.
    again = trainer.PackTrainer(cnn_program(), arrays, SCHEDULE)
    assert again.programs is pt.programs
    again.train(hparams([{"seed": 2}]), lambda *a: None)
    assert compiled.programs_held() == held and again.cache.compile_seconds == 0


def test_training_resumes_from_a_state_handed_to_on_epoch_end(arrays):
    import jax

    hp = hparams([{"lr": 0.05, "seed": 4}])
    pt = trainer.PackTrainer(cnn_program(), arrays, SCHEDULE)
    saved, seen = {}, []

    def on_epoch_end(state, epoch):
        seen.append(epoch)
        saved.setdefault(epoch, jax.device_get(state))  # a copy: the next epoch donates the state's buffers

    whole = pt.train(hp, lambda *a: None, on_epoch_end=on_epoch_end)
    assert seen == [0, 1]
    resumed = pt.train(hp, lambda *a: None, state=jax.device_put(saved[0]), start_epoch=1)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(whole.final["test/loss"], resumed.final["test/loss"])


@pytest.mark.parametrize("every_eval", [True, False])
def test_the_discrepancy_is_measured_at_the_last_evaluation_or_at_every_one(arrays, every_eval):
    sched = schedule(
        epochs=2,
        log_every=4,
        max_steps_per_epoch=2,
        eval_batch_size=64,
        discrepancy=True,
        discrepancy_every_eval=every_eval,
        population_batches=1,
        discrepancy_train_subset=32,
    )
    records = []
    pt = trainer.PackTrainer(cnn_program("before_relu"), arrays, sched)
    result = pt.train(
        hparams([{"seed": 0}]), lambda step, epoch, m: records.append((epoch, m)) if "test/acc" in m else None
    )
    with_disc = [epoch for epoch, m in records if "disc/kl" in m]
    assert [epoch for epoch, _ in records] == [1, 2]  # epochs completed
    assert with_disc == ([1, 2] if every_eval else [2])
    assert np.isfinite(result.final["disc/kl"]).all() and "test/acc_population" in result.final
    assert {"test/loss", "test/acc", "train_subset/acc"} <= set(records[0][1])  # the plain evaluation
