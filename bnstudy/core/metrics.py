"""What BN does, measured for one model: loss smoothness, train/inference discrepancy, internal
covariate shift and dead units.

Like `engine`, every function here is written for ONE model and vmapped over a pack by the trainer,
and none of them returns a new TrainState: a measurement never changes what is trained.
Definitions are those of docs/design.md §4.1 (Santurkar et al. 2018), §4.2 (Ioffe 2017;
Wu & Johnson 2021; Li et al. 2019), §4.4 (Santurkar et al. 2018 sec. 2.2) and §4.5.

BN layers are found by their variables (`<block>_norm/bn/{mean,var}`) and reported under the block
name, e.g. `bn/conv1/mean_shift`.

Keys (each a scalar per model):
  smooth/loss_min, smooth/loss_max, smooth/loss_range   L(w - eta g) over eta in multipliers x the step's lr
  smooth/grad_pred, smooth/grad_pred_min                max / min over eta of ||grad L(w - eta g) - g||
  smooth/beta_eff                                       max over eta of that / ||eta g||
  <split>/loss_<mode>, <split>/acc_<mode>               split: test, train_subset; mode: running
                                                        (running averages), batch (each evaluation
                                                        batch's own statistics, training batch size),
                                                        population (pooled statistics, see `pool`)
  disc/acc_gap = acc_batch - acc_running; disc/loss_gap = loss_running - loss_batch;
  disc/train_test_inconsistency = err_population - err_batch; disc/ema_error = err_running -
  err_population; disc/kl = mean over examples of KL(p_batch || p_running)   (all on the test split)
  bn/<layer>/mean_shift         mean over channels |mu_run - mu_pop| / sqrt(var_pop + eps)
  bn/<layer>/log_var_ratio      mean over channels log((var_run + eps) / (var_pop + eps))
  bn/<layer>/dropout_var_shift  mean over channels (Var_eval + eps) / (Var_train + eps) of the layer's
                                input, dropout off / on, only for layers downstream of a dropout
Population statistics are collected as precise BN does: the network in train mode (every BN layer on
its batch's statistics, dropout off) over whole training batches, pooled exactly across batches.
  ics/<layer>/l2, ics/<layer>/rel,  ||G - G'||, ||G - G'|| / ||G|| and cos(G, G') for every layer with
  ics/<layer>/cos                   weights (conv*, dense*, classifier); see `internal_covariate_shift`
  relu/<layer>/dead_frac            fraction of a hidden block's ReLU units (a conv's channels, a dense
                                    layer's features) never positive over the evaluated examples
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from bnstudy.core import engine, models
from bnstudy.core.engine import ArrayData, HParams, Setup, TrainState

SMOOTH_KEYS = (
    "smooth/loss_min",
    "smooth/loss_max",
    "smooth/loss_range",
    "smooth/grad_pred",
    "smooth/grad_pred_min",
    "smooth/beta_eff",
)
MODES = ("running", "batch", "population")


# ---------------------------------------------------------------------------------------------
# 4.1 Loss smoothness
# ---------------------------------------------------------------------------------------------


def smoothness(loss_fn: Callable, params, etas: jax.Array, vectorize: bool = True) -> dict[str, jax.Array]:
    """Santurkar's probes along the gradient: for each eta, w' = w - eta * g with g = grad L(w).

    loss range over eta, l2 gradient predictiveness max/min ||grad L(w') - g||, and the effective
    beta-smoothness max ||grad L(w') - g|| / ||eta g||. All etas in one program: vmapped over eta,
    or (vectorize=False) unrolled, which XLA:CPU runs about twice as fast because the vmapped convs
    become grouped convs there.
    """
    g = jax.grad(loss_fn)(params)
    g_norm = optax.global_norm(g)

    def at(eta):
        loss, g_new = jax.value_and_grad(loss_fn)(jax.tree.map(lambda w, gi: w - eta * gi, params, g))
        return loss, optax.global_norm(jax.tree.map(jnp.subtract, g_new, g))

    if vectorize:
        losses, changes = jax.vmap(at)(etas)
    else:
        losses, changes = (jnp.stack(v) for v in zip(*(at(etas[j]) for j in range(etas.shape[0]))))
    return {
        "smooth/loss_min": losses.min(),
        "smooth/loss_max": losses.max(),
        "smooth/loss_range": losses.max() - losses.min(),
        "smooth/grad_pred": changes.max(),
        "smooth/grad_pred_min": changes.min(),
        "smooth/beta_eff": jnp.max(changes / (etas * g_norm)),
    }


def smoothness_probe(
    setup: Setup,
    multipliers: Sequence[float],
    vectorize: bool,
    state: TrainState,
    hp: HParams,
    data: ArrayData,
    perm,
    index,
) -> dict[str, jax.Array]:
    """The probe at the step `state` is about to take: its batch, its dropout mask, BN on batch statistics.

    The loss is the data loss the step differentiates (weight decay is the optimizer's, not the
    loss's). The running statistics forward_train would update are dropped, so nothing changes.
    """
    x, labels, dropout_key = engine.step_inputs(setup, state, hp, data, perm, index)

    def loss_fn(params):
        return engine.forward_train(setup, params, state.batch_stats, x, labels, hp.dropout_rate, dropout_key)[0]

    etas = jnp.asarray(multipliers, jnp.float32) * engine.step_lr(setup, state, hp)  # x this step's lr
    out = smoothness(loss_fn, state.params, etas, vectorize)
    # A diverged run is frozen at its last finite weights: that landscape is not the one it diverged on.
    return {k: jnp.where(state.diverged, jnp.nan, v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# 4.2 BN statistics: batch, population, and their shift from the running averages
# ---------------------------------------------------------------------------------------------


def _is_bn(tree) -> bool:
    return isinstance(tree, dict) and set(tree) == {"mean", "var"}


def bn_layers(batch_stats) -> dict[str, dict]:
    """{readable layer name: {"mean", "var"}}: `conv1_norm/bn` -> `conv1`."""
    found = {}

    def visit(tree, path):
        if _is_bn(tree):
            found["/".join(p.removesuffix("_norm") for p in path if p != "bn")] = tree
        elif isinstance(tree, dict):
            for key, sub in tree.items():
                visit(sub, (*path, key))

    visit(batch_stats, ())
    return found


def batch_statistics(setup: Setup, params, batch_stats, x, dropout_rate=0.0, dropout_key=None):
    """Each BN layer's mean and biased variance (what BN normalizes by) of its input over the batch `x`, train mode.

    Runs a copy of the model with BN momentum 0 and the biased running variance on zeroed running
    stats, so the "updated running averages" are exactly this batch's statistics: 0 * 0 + 1 * batch,
    no rounding. Biased, so that `pool` gives the exact variance over all the pooled examples.
    """
    # A model on flax's own nn.BatchNorm has no such field: its running variance is the biased one already.
    biased = {"bn_running_var": "biased"} if hasattr(setup.model, "bn_running_var") else {}
    model = setup.model.clone(bn_momentum=0.0, **biased)
    stats_program = dataclasses.replace(setup, model=model)
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    no_labels = jnp.zeros(x.shape[0], jnp.int32)  # forward_train wants labels; its loss is not used
    _, (_, stats) = engine.forward_train(stats_program, params, zeros, x, no_labels, dropout_rate, dropout_key)
    return stats


def population_batch(setup: Setup, with_dropout: bool, params, batch_stats, hp: HParams, data, perm, index):
    """BN input statistics of training batch `index` with dropout off, and (if asked) with it on.

    Keys come from the measurement stream, so measuring never shifts a training stream.
    """
    key = jax.random.fold_in(engine.run_key(hp.seed, engine.STREAM_METRICS), index)
    augment_key, dropout_key = jax.random.split(key)
    x, _ = engine.train_inputs(setup, data, perm, index, augment_key)
    off = batch_statistics(setup, params, batch_stats, x)
    on = batch_statistics(setup, params, batch_stats, x, hp.dropout_rate, dropout_key) if with_dropout else None
    return off, on


def pool(per_batch):
    """Population mean/var from equal-sized batches' statistics (leading axis = batch): exact pooled moments.

    var = mean_b(var_b) + mean_b((mean_b - mean)^2): the two-pass form, free of cancellation and
    exactly the batch's own statistics when there is one batch.
    """

    def one(s):
        mean = s["mean"].mean(0)
        return {"mean": mean, "var": s["var"].mean(0) + jnp.square(s["mean"] - mean).mean(0)}

    return jax.tree.map(one, per_batch, is_leaf=_is_bn)


def bn_shift(running, population, eps: float) -> dict[str, jax.Array]:
    """Per BN layer: mean over channels of |mu_run - mu_pop| / sqrt(var_pop + eps) and of log var ratio.

    The variances in the ratio carry BN's eps (what BN divides by), so a dead channel with zero
    variance in both gives 0, not NaN.
    """
    pop = bn_layers(population)
    out = {}
    for name, run in bn_layers(running).items():
        p = pop[name]
        out[f"bn/{name}/mean_shift"] = jnp.mean(jnp.abs(run["mean"] - p["mean"]) / jnp.sqrt(p["var"] + eps))
        out[f"bn/{name}/log_var_ratio"] = jnp.mean(jnp.log((run["var"] + eps) / (p["var"] + eps)))
    return out


def dropout_var_shift(eval_stats, train_stats, layers: Sequence[str], eps: float) -> dict[str, jax.Array]:
    """Li et al.'s variance shift, Var_eval / Var_train of each named BN layer's input, mean over channels."""
    ev, tr = bn_layers(eval_stats), bn_layers(train_stats)
    return {f"bn/{n}/dropout_var_shift": jnp.mean((ev[n]["var"] + eps) / (tr[n]["var"] + eps)) for n in layers}


def population(per_batch: Sequence[tuple]):
    """Pooled statistics from `population_batch`'s per-batch (dropout off, dropout on or None) pairs."""
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    off, on = zip(*per_batch)
    return pool(stack(off)), (None if on[0] is None else pool(stack(on)))


def bn_metrics(dropout_layers: Sequence[str], eps: float, running, pop, pop_dropout) -> dict[str, jax.Array]:
    """bn/* metrics. Kept apart from `population` so they compare materialized statistics: with
    running == population they are exactly 0, which a fused recomputation of the mean would not be."""
    out = bn_shift(running, pop, eps)
    if dropout_layers:
        out |= dropout_var_shift(pop, pop_dropout, dropout_layers, eps)
    return out


# ---------------------------------------------------------------------------------------------
# 4.2 Evaluation in the three BN modes
# ---------------------------------------------------------------------------------------------


def batch_mode_logits(setup: Setup, params, batch_stats, images):
    """Logits with BN normalizing by this batch's own statistics (train mode, dropout off); nothing kept."""
    x = engine.normalize(setup, images)
    no_labels = jnp.zeros(x.shape[0], jnp.int32)
    _, (logits, _) = engine.forward_train(setup, params, batch_stats, x, no_labels, 0.0, None)
    return logits


def split_metrics(split: str, logits: dict[str, jax.Array], labels) -> dict[str, jax.Array]:
    """Loss and accuracy of each mode on one split ({mode: [N, classes]}); for the test split, the gaps too."""
    out, err = {}, {}
    for mode in MODES:
        out[f"{split}/loss_{mode}"] = engine.cross_entropy(logits[mode], labels).mean()
        out[f"{split}/acc_{mode}"] = acc = jnp.mean(jnp.argmax(logits[mode], -1) == labels)
        err[mode] = 1.0 - acc
    if split != "test":
        return out
    log_p_batch = jax.nn.log_softmax(logits["batch"])
    log_p_running = jax.nn.log_softmax(logits["running"])
    kl = jnp.sum(jnp.exp(log_p_batch) * (log_p_batch - log_p_running), -1)
    out |= {
        "disc/acc_gap": out["test/acc_batch"] - out["test/acc_running"],
        "disc/loss_gap": out["test/loss_running"] - out["test/loss_batch"],
        "disc/train_test_inconsistency": err["population"] - err["batch"],
        "disc/ema_error": err["running"] - err["population"],
        "disc/kl": kl.mean(),
    }
    return out


# ---------------------------------------------------------------------------------------------
# 4.4 Internal covariate shift
# ---------------------------------------------------------------------------------------------


def internal_covariate_shift(
    loss_fn: Callable, params: dict, update: dict, order: Sequence[str], layers: Sequence[str], grads=None
) -> dict[str, jax.Array]:
    """Santurkar et al.'s ICS of each layer in `layers` for one step with parameter update `update`.

    G = grad of loss_fn w.r.t. params[layer]; G' = the same gradient once every parameter group that
    comes before `layer` in `order` (top-level keys of `params`, input to output) has taken its
    update (params + update, as optax.apply_updates does), the layer itself and all later groups
    unchanged. Returns ics/<layer>/l2 = ||G - G'||_2, ics/<layer>/rel = ||G - G'||_2 / ||G||_2 and
    ics/<layer>/cos = cos(G, G'), each over the layer's whole subtree (kernel and bias). The first group
    has nothing before it: G' = G exactly. `grads` = grad loss_fn(params) when the caller already has it.

    BN rescales the gradients themselves, so l2 compares arms on different scales; rel and cos do not move
    when a layer's G and G' are scaled by the same factor (docs/design.md §4.4), and the studies decide on them.
    """
    g = jax.grad(loss_fn)(params) if grads is None else grads
    present = [k for k in order if k in params]
    out = {}
    for layer in layers:
        before = set(present[: present.index(layer)])
        if before:
            moved = {k: optax.apply_updates(v, update[k]) if k in before else v for k, v in params.items()}
            g_new = jax.grad(lambda w, moved=moved, layer=layer: loss_fn({**moved, layer: w}))(params[layer])
        else:
            g_new = g[layer]
        g_old = g[layer]
        dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_old), jax.tree.leaves(g_new), strict=True))
        l2, norm_old = optax.global_norm(jax.tree.map(jnp.subtract, g_new, g_old)), optax.global_norm(g_old)
        out[f"ics/{layer}/l2"] = l2
        out[f"ics/{layer}/rel"] = l2 / norm_old
        out[f"ics/{layer}/cos"] = dot / (norm_old * optax.global_norm(g_new))
    return out


def optimizer_update(setup: Setup, state: TrainState, hp: HParams, grads):
    """The parameter update the train step takes from `state` with gradient `grads`: its optimizer,
    learning rate at that step, weight decay and momentum buffers (engine.train_step's `updates`)."""
    tx = engine.make_optimizer(setup, engine.step_lr(setup, state, hp), hp.weight_decay)
    return tx.update(grads, state.opt_state, state.params)[0]


def ics_probe(setup: Setup, state: TrainState, hp: HParams, data: ArrayData, perm, index) -> dict[str, jax.Array]:
    """ICS at the step `state` is about to take: its batch, its dropout mask, BN on batch statistics
    (running statistics not updated), and that step's own optimizer update. Call it with the state
    *before* the step, on the same (perm, index) as the step."""
    x, labels, dropout_key = engine.step_inputs(setup, state, hp, data, perm, index)

    def loss_fn(params):
        return engine.forward_train(setup, params, state.batch_stats, x, labels, hp.dropout_rate, dropout_key)[0]

    grads = jax.grad(loss_fn)(state.params)
    update = optimizer_update(setup, state, hp, grads)
    model = setup.model
    out = internal_covariate_shift(loss_fn, state.params, update, model.param_order(), model.weight_layers(), grads)
    return {k: jnp.where(state.diverged, jnp.nan, v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# 4.5 Dead units
# ---------------------------------------------------------------------------------------------


def _relu_maxima(sown) -> dict[str, jax.Array]:
    """{block: [N, units]} from the `relu` collection the model sows (`conv1_norm/max` -> `conv1`)."""
    return {name.removesuffix("_norm"): tree["max"][0] for name, tree in sown.items()}


def relu_positive_counts_from(sown, mask) -> dict[str, jax.Array]:
    """Per block and unit: on how many of the masked examples the ReLU output was positive somewhere."""
    return {name: jnp.sum((m > 0) * mask[:, None], axis=0) for name, m in _relu_maxima(sown).items()}


def eval_batch_with_units(setup: Setup, params, batch_stats, images, labels, mask) -> dict:
    """engine.eval_batch's sums plus, from the same inference pass, `relu_positive`: per hidden block
    and ReLU unit, the number of masked examples on which it fired. Counts add up over batches
    like the sums do; `dead_unit_fractions` turns the totals into relu/<layer>/dead_frac."""
    variables = {"params": params, "batch_stats": batch_stats}
    x = engine.normalize(setup, images)
    logits, sown = setup.model.apply(variables, x, train=False, mutable=[models.RELU_COLLECTION])
    loss = engine.cross_entropy(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return {
        "loss_sum": jnp.sum(loss * mask),
        "correct_sum": jnp.sum(correct * mask),
        "relu_positive": relu_positive_counts_from(sown[models.RELU_COLLECTION], mask),
    }


def dead_unit_fractions(relu_positive: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """relu/<layer>/dead_frac: the fraction of the layer's units that never fired (count 0)."""
    return {f"relu/{name}/dead_frac": jnp.mean(counts == 0) for name, counts in relu_positive.items()}
