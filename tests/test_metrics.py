"""Smoothness probes and train/inference discrepancy: closed forms, exact invariants, and the app's keys."""

import json
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnstudy.core import engine, metrics, models, trainer
from conftest import cnn_program, hparams, make_arrays, schedule, serve_generated_data, setup_of

SHAPE = (10, 10, 1)  # small images: these tests are about exactness, not accuracy


def tiny_arrays(n_train=64, n_test=24):
    return make_arrays(n_train=n_train, n_test=n_test, shape=SHAPE)


# --------------------------------------------------------------------------- smoothness (4.1)


@pytest.mark.parametrize("vectorize", [True, False])
def test_quadratic_loss_gives_closed_form_beta_eff_and_loss_range(vectorize):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    h = a @ a.T + np.eye(5)  # positive definite Hessian
    w = rng.normal(size=5)
    etas = np.array([0.01, 0.02, 0.04, 0.08])
    # A pytree of parameters, as a model has.
    params = {"a": jnp.asarray(w[:2], jnp.float32), "b": jnp.asarray(w[2:], jnp.float32)}
    hj = jnp.asarray(h, jnp.float32)
    loss = lambda p: 0.5 * (flat := jnp.concatenate([p["a"], p["b"]])) @ hj @ flat

    out = metrics.smoothness(loss, params, jnp.asarray(etas, jnp.float32), vectorize)

    g = h @ w
    losses = 0.5 * w @ h @ w - etas * (g @ g) + 0.5 * etas**2 * (g @ h @ g)
    change = etas * np.linalg.norm(h @ g)  # grad L(w - eta g) - g = -eta H g
    np.testing.assert_allclose(out["smooth/loss_range"], losses.max() - losses.min(), rtol=1e-4)
    np.testing.assert_allclose(out["smooth/loss_min"], losses.min(), rtol=1e-4)
    np.testing.assert_allclose(out["smooth/loss_max"], losses.max(), rtol=1e-4)
    np.testing.assert_allclose(out["smooth/grad_pred"], change.max(), rtol=1e-4)
    np.testing.assert_allclose(out["smooth/grad_pred_min"], change.min(), rtol=1e-4)
    np.testing.assert_allclose(out["smooth/beta_eff"], np.linalg.norm(h @ g) / np.linalg.norm(g), rtol=1e-4)

    # Along an eigenvector the effective beta is exactly the curvature there.
    lam, vecs = np.linalg.eigh(h)
    w_eig = vecs[:, -1] / lam[-1]  # gradient H w = v, the top eigenvector
    p_eig = {"a": jnp.asarray(w_eig[:2], jnp.float32), "b": jnp.asarray(w_eig[2:], jnp.float32)}
    out = metrics.smoothness(loss, p_eig, jnp.asarray(etas, jnp.float32), vectorize)
    np.testing.assert_allclose(out["smooth/beta_eff"], lam[-1], rtol=1e-4)


def train_pack(schedule, *, norm="before_relu", arrays=None, rows=({"dropout_rate": 0.3},), batch_size=16, **kw):
    logs = []
    pt = trainer.PackTrainer(cnn_program(norm, batch_size=batch_size, **kw), arrays or tiny_arrays(), schedule)
    result = pt.train(hparams(list(rows)), lambda step, epoch, m: logs.append((step, m)))
    return pt, result, logs


# Where the probe tests put dropout: before the classifier, one mask per step's key (after every block, three
# masks' random bits compile into each program, forward and backward: about twice the compile time).
DROPOUT = "before_classifier"


def probes_of(logs):
    return [(step, m) for step, m in logs if "smooth/beta_eff" in m]


@pytest.mark.xdist_group("dropout_cnn_pack")  # its programs are tests/test_trainer.py's scan-vs-python ones
def test_python_loop_probe_leaves_params_opt_state_and_running_stats_bit_identical():
    sched = schedule(
        epochs=1,
        log_every=1,
        max_steps_per_epoch=3,
        eval_batch_size=24,
        loop="python",
        probe_every=1,
        probe_multipliers=(1.0, 2.0),
    )  # two etas: a smaller program
    # Dropout on: the probe must reuse the step's dropout key, not consume one of its own.
    pt, probed, logs = train_pack(sched, dropout_placement=DROPOUT)
    hp = hparams([{"dropout_rate": 0.3}])
    state, _ = pt.compile(hp)
    perm = pt.permutation(hp, 0)
    step = pt.compiled.step(state, hp, perm)  # the same compiled step, with no probe anywhere
    for i in range(3):
        state, _ = step(state, hp, pt.data, perm, jnp.int32(i))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(probed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [step for step, _ in probes_of(logs)] == [0, 1, 2]
    assert all(np.isfinite(m[k]).all() for _, m in probes_of(logs) for k in metrics.SMOOTH_KEYS)
    assert "smooth/loss_range" in probed.final


@pytest.mark.xdist_group("dropout_cnn_pack")
def test_scan_loop_probe_inside_the_epoch_program_leaves_training_bit_identical():
    base = dict(epochs=1, log_every=1, max_steps_per_epoch=3, eval_batch_size=24, loop="scan")
    _, plain, plain_logs = train_pack(schedule(**base), dropout_placement=DROPOUT)
    probing = schedule(**base, probe_every=2, probe_multipliers=(1.0, 2.0))
    _, probed, probed_logs = train_pack(probing, dropout_placement=DROPOUT)
    for a, b in zip(jax.tree.leaves(plain.state), jax.tree.leaves(probed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = lambda logs: [m["train/loss"] for _, m in logs if "train/loss" in m]
    np.testing.assert_array_equal(losses(plain_logs), losses(probed_logs))
    assert [step for step, _ in probes_of(probed_logs)] == [0, 2]  # the skipped step logs no NaN record
    assert not probes_of(plain_logs)


# --------------------------------------------------------------------------- discrepancy (4.2)


@pytest.fixture(scope="module")
def whole_set_pack():
    """A pack of two trained for 2 steps on 32 images that are also the test set; one batch is all of them."""
    data = tiny_arrays(n_train=32, n_test=8)
    data = data._replace(test_images=data.train_images, test_labels=data.train_labels)
    sched = schedule(
        epochs=1,
        log_every=4,
        max_steps_per_epoch=2,
        eval_batch_size=24,
        discrepancy=True,
        population_batches=5,
        discrepancy_train_subset=32,
    )  # capped to the 1 batch there is
    rows = [{"seed": 0}, {"seed": 1, "lr": 0.1}]
    pt, result, _ = train_pack(sched, arrays=data, rows=rows, batch_size=32)
    return pt, result, hparams(rows)


LAYERS = ("conv1", "conv2", "dense1")


@pytest.mark.xdist_group("whole_set_pack")  # one worker trains the module fixture
def test_running_stats_set_to_population_stats_give_zero_shift_and_identical_evals(whole_set_pack):
    pt, result, hp = whole_set_pack
    pop, _ = pt.evaluator.population_stats(result.state, hp, epoch=0)
    out = pt.evaluator.evaluate(result.state.replace(batch_stats=pop), hp, epoch=0)

    for layer in LAYERS:
        np.testing.assert_array_equal(out[f"bn/{layer}/mean_shift"], 0.0)
        np.testing.assert_array_equal(out[f"bn/{layer}/log_var_ratio"], 0.0)
    for split in ("test", "train_subset"):
        for what in ("loss", "acc"):
            np.testing.assert_array_equal(out[f"{split}/{what}_running"], out[f"{split}/{what}_population"])
    np.testing.assert_array_equal(out["disc/ema_error"], 0.0)
    # ...while the trained running averages did differ from the population (the check is not vacuous).
    assert all((result.final[f"bn/{layer}/mean_shift"] > 0).all() for layer in LAYERS)


@pytest.mark.xdist_group("whole_set_pack")  # one worker trains the module fixture
def test_batch_of_the_whole_eval_set_normalizes_with_population_statistics(whole_set_pack):
    pt, result, hp = whole_set_pack
    setup, state = pt.setup, result.state
    pop, _ = pt.evaluator.population_stats(state, hp, epoch=0)
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)
    params, running = first(state.params), first(state.batch_stats)
    x = engine.normalize(setup, pt.data.test_images)
    batch_statistics = jax.jit(partial(metrics.batch_statistics, setup))  # op by op, each op would compile
    batch = batch_statistics(params, running, x)  # what batch mode normalizes with
    for (name, b), p in zip(metrics.bn_layers(batch).items(), metrics.bn_layers(first(pop)).values(), strict=True):
        np.testing.assert_allclose(b["mean"], p["mean"], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(b["var"], p["var"], rtol=1e-5, atol=1e-6, err_msg=name)
    out = pt.evaluator.evaluate(state, hp, epoch=0)
    np.testing.assert_allclose(out["test/loss_batch"], out["test/loss_population"], rtol=1e-5)
    np.testing.assert_array_equal(out["disc/train_test_inconsistency"], 0.0)
    assert (out["disc/kl"] > 0).all()  # running averages after 2 steps are not the population
    # Pooling is exact: two halves pool to the whole (first BN layer, whose input the halves share).
    halves = [batch_statistics(params, running, h) for h in (x[:16], x[16:])]
    pooled = metrics.bn_layers(metrics.pool(jax.tree.map(lambda *a: jnp.stack(a), *halves)))["conv1"]
    np.testing.assert_allclose(pooled["var"], metrics.bn_layers(batch)["conv1"]["var"], rtol=1e-5, atol=1e-6)


class DropoutThenBN(nn.Module):
    """Dropout directly before BN: the setting of Li et al.'s closed form."""

    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, *, train, dropout_rate=0.0, dropout_rng=None):
        x = models.dropout(x, dropout_rate, dropout_rng)
        bn = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon)
        return bn(x.reshape(x.shape[0], -1))


def test_dropout_variance_shift_matches_li_et_al_closed_form():
    c, v, keep = 1.5, 0.5, 0.7
    z = np.random.default_rng(0).normal(size=(8192, 32))
    z = (z - z.mean(0)) / z.std(0)  # exactly mean 0, variance 1 per channel
    x = jnp.asarray(c + np.sqrt(v) * z, jnp.float32)
    setup = setup_of(DropoutThenBN())
    variables = setup.model.init(jax.random.key(0), x[:2], train=False)
    stats = lambda *drop: metrics.batch_statistics(setup, variables["params"], variables["batch_stats"], x, *drop)
    # Off-dropout and on-dropout statistics of one batch, through the same pooling the trainer uses.
    pop, pop_dropout = metrics.population([(stats(), stats(1 - keep, jax.random.key(1)))])
    out = metrics.bn_metrics(("BatchNorm_0",), 1e-5, variables["batch_stats"], pop, pop_dropout)

    expected = v / ((c**2 + v) / keep - c**2)
    assert out["bn/BatchNorm_0/dropout_var_shift"] == pytest.approx(expected, rel=0.02)
    assert expected < 0.3  # far from 1: a missing 1/keep rescale or an unused mask would fail


# --------------------------------------------------------------------------- the app


@pytest.fixture
def small_mnist(monkeypatch):
    serve_generated_data(monkeypatch, n_train=128, n_test=48, shape=SHAPE)


def read_run(out):
    (folder,) = [p.parent for p in out.glob("*/*/summary.json")]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((folder / "summary.json").read_text())


def test_app_logs_discrepancy_keys_to_metrics_and_summary(small_mnist, run_app):
    records, summary = read_run(
        run_app(
            "discrepancy.enabled=true",
            "discrepancy.population_batches=2",
            "discrepancy.train_subset=48",
            "model.dropout.placement=after_block",
            "model.dropout.rate=0.2",
        )
    )
    logged = set().union(*records)
    expected = {
        "disc/acc_gap",
        "disc/loss_gap",
        "disc/train_test_inconsistency",
        "disc/ema_error",
        "disc/kl",
        *(
            f"{split}/{what}_{mode}"
            for split in ("test", "train_subset")
            for what in ("loss", "acc")
            for mode in metrics.MODES
        ),
    }
    expected |= {f"bn/{layer}/{m}" for layer in LAYERS for m in ("mean_shift", "log_var_ratio")}
    expected |= {"bn/conv2/dropout_var_shift", "bn/dense1/dropout_var_shift"}  # dropout feeds these, not conv1
    assert expected <= logged and expected <= set(summary)
    assert "bn/conv1/dropout_var_shift" not in logged
    assert all(summary[k] is not None for k in expected)


def test_app_logs_probe_keys_and_without_bn_no_disc_or_bn_keys(small_mnist, run_app):
    records, summary = read_run(
        run_app("model.norm=none", "probe.every=2", "probe.step_multipliers=[1,2]", "discrepancy.enabled=true")
    )
    assert [r["step"] for r in records if "smooth/beta_eff" in r] == [0, 2]
    assert set(metrics.SMOOTH_KEYS) <= set(summary) and all(summary[k] is not None for k in metrics.SMOOTH_KEYS)
    keys = set().union(*records) | set(summary)
    assert not [k for k in keys if k.startswith(("disc/", "bn/"))]
    assert "test/acc" in summary


# --------------------------------------------------------------------------- internal covariate shift (4.4)


def test_ics_rel_is_l2_over_the_gradient_norm_and_a_gradient_scale_moves_only_l2():
    """A two-layer linear net with closed-form gradients: rel = ||G - G'|| / ||G||, and scaling the loss by c
    (every gradient, G and G' alike, times c) multiplies l2 by c and leaves rel and cos unchanged."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 16)), rng.normal(size=(2, 16))
    p = {"w1": rng.normal(size=(4, 3)), "w2": rng.normal(size=(2, 4))}
    u = {"w1": 0.3 * rng.normal(size=(4, 3)), "w2": 0.3 * rng.normal(size=(2, 4))}

    def grad_w2(w1, w2):  # of 0.5 * ||w2 w1 x - y||^2 / n
        return (w2 @ w1 @ x - y) @ (w1 @ x).T / x.shape[1]

    g_old, g_new = grad_w2(p["w1"], p["w2"]), grad_w2(p["w1"] + u["w1"], p["w2"])
    params, update = ({k: jnp.asarray(v, jnp.float32) for k, v in d.items()} for d in (p, u))

    def measured(scale):
        loss = lambda q: scale * 0.5 * jnp.sum((q["w2"] @ q["w1"] @ x - y) ** 2) / x.shape[1]
        return metrics.internal_covariate_shift(loss, params, update, ("w1", "w2"), ("w1", "w2"))

    out, scaled = measured(1.0), measured(40.0)
    np.testing.assert_allclose(out["ics/w2/l2"], np.linalg.norm(g_new - g_old), rtol=1e-4)
    np.testing.assert_allclose(out["ics/w2/rel"], np.linalg.norm(g_new - g_old) / np.linalg.norm(g_old), rtol=1e-4)
    assert float(out["ics/w2/rel"]) > 0.05  # a real shift
    np.testing.assert_allclose(scaled["ics/w2/l2"], 40.0 * out["ics/w2/l2"], rtol=1e-4)
    np.testing.assert_allclose(scaled["ics/w2/rel"], out["ics/w2/rel"], rtol=1e-4)
    np.testing.assert_allclose(scaled["ics/w2/cos"], out["ics/w2/cos"], rtol=1e-4)
    assert float(out["ics/w1/rel"]) == 0.0  # nothing precedes the first layer
