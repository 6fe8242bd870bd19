"""Pure training functions for one model: init, train_step, eval_batch; callers vmap them over a pack.

Everything a sweep varies numerically (learning rate, weight decay, init scale, dropout rate, seed)
arrives as a traced `HParams` leaf, never as a Python constant, so a pack of runs is one
`jax.vmap` of these same functions. Everything that changes the program (model, optimizer kind,
batch size, augmentation) lives in the static `Setup`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from bnstudy.core.lr_schedule import LrSchedule, learning_rate

# Independent random streams derived from a run's seed. STREAM_METRICS feeds measurements only
# (bnstudy.core.metrics), so turning a measurement on or off never shifts a training stream.
STREAM_INIT, STREAM_DROPOUT, STREAM_AUGMENT, STREAM_DATA, STREAM_METRICS = range(5)


class HParams(NamedTuple):
    """Per-run numeric hyperparameters; each leaf is a scalar (one run) or a [K] array (a pack)."""

    lr: Any
    weight_decay: Any
    init_scale: Any
    dropout_rate: Any
    seed: Any

    @classmethod
    def stack(cls, rows: list[dict]) -> HParams:
        """Pack a list of per-run dicts into [K]-shaped arrays (float32, seed int32)."""
        return cls(
            **{f: jnp.asarray([r[f] for r in rows], jnp.int32 if f == "seed" else jnp.float32) for f in cls._fields}
        )


class ArrayData(NamedTuple):
    """A dataset already on device: uint8 images [N, H, W, C] and int32 labels [N]. The validation split,
    when there is one, is held out of the training split (no training step ever sees it)."""

    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array
    val_images: jax.Array | None = None
    val_labels: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static part of a run: whatever, when changed, needs a new compiled program. No defaults here:
    `bnstudy.core.from_config.setup_from_config` fills every field from the config schema."""

    model: nn.Module
    optimizer: str  # sgd | adam
    momentum: float
    lr_schedule: LrSchedule  # the lr over training, a multiple of the run's peak `hp.lr`
    batch_size: int
    input_mean: tuple[float, ...]  # per channel, of images in [0, 1]
    input_std: tuple[float, ...]
    augment: bool  # random crop (pad 4) + horizontal flip


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    diverged: jax.Array  # bool: a non-finite loss or gradient was seen; the run is frozen since
    diverged_step: jax.Array  # int32: the step at which it diverged, -1 if it has not


def run_key(seed: jax.Array, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stream)


def make_optimizer(setup: Setup, lr, weight_decay) -> optax.GradientTransformation:
    """The optimizer of one run, built from its (traced) lr and weight decay.

    `train_step` rebuilds it at every step from that step's lr (`step_lr`: the peak `hp.lr` on the
    setup's schedule), so `step_lr` is the one source of the learning rate: the value logged, the value
    that scales the probes and the value the update uses. The optimizer state holds only what the
    update accumulates (momentum, Adam's moments), never the lr.
    """
    if setup.optimizer == "sgd":
        # Coupled L2 (added to the gradient before momentum), as in torch.optim.SGD.
        momentum = setup.momentum or None
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum))
    if setup.optimizer == "adam":
        return optax.adamw(lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {setup.optimizer!r}; expected 'sgd' or 'adam'")


def step_lr(setup: Setup, state: TrainState, hp: HParams):
    """The lr of the step taken from `state`: the run's peak `hp.lr` on the schedule, at the state's own
    step counter (so a resumed run continues its schedule where it stopped)."""
    return learning_rate(setup.lr_schedule, hp.lr, state.step)


def scale_kernels(params, scale):
    """Multiply every kernel by `scale`: He-normal std x init_scale, biases and BN untouched."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if getattr(path[-1], "key", None) == "kernel" else x, params
    )


def init_state(setup: Setup, input_shape: tuple[int, ...], hp: HParams) -> TrainState:
    """A fresh model and optimizer for one run."""
    variables = setup.model.init(run_key(hp.seed, STREAM_INIT), jnp.zeros((1, *input_shape)), train=False)
    params = scale_kernels(variables["params"], hp.init_scale)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=make_optimizer(setup, hp.lr, hp.weight_decay).init(params),
        diverged=jnp.zeros((), bool),
        diverged_step=jnp.full((), -1, jnp.int32),
    )


def normalize(setup: Setup, images_uint8: jax.Array) -> jax.Array:
    x = images_uint8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(setup.input_mean)) / jnp.asarray(setup.input_std)


def augment(images: jax.Array, key: jax.Array) -> jax.Array:
    """Random crop with 4-pixel zero padding and random horizontal flip, per example."""
    n, h, w, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 9)
    crop = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))
    cropped = crop(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
    return jnp.where(flip, cropped[:, :, ::-1, :], cropped)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def forward_train(setup, params, batch_stats, x, y, dropout_rate, dropout_key):
    """Loss in train mode (batch statistics) and the updated running statistics."""
    variables = {"params": params, "batch_stats": batch_stats}
    logits, updates = setup.model.apply(
        variables, x, train=True, dropout_rate=dropout_rate, dropout_rng=dropout_key, mutable=["batch_stats"]
    )
    return cross_entropy(logits, y).mean(), (logits, updates.get("batch_stats", {}))


def batch_at(setup: Setup, data: ArrayData, perm: jax.Array, index: jax.Array):
    """The `index`-th training batch of an epoch ordered by `perm`."""
    idx = jax.lax.dynamic_slice_in_dim(perm, index * setup.batch_size, setup.batch_size)
    return data.train_images[idx], data.train_labels[idx]


def train_inputs(setup: Setup, data: ArrayData, perm: jax.Array, index, augment_key: jax.Array):
    """Normalized (and, where the dataset asks for it, augmented) training batch `index` with its labels."""
    images, labels = batch_at(setup, data, perm, index)
    x = normalize(setup, images)
    if setup.augment:
        x = augment(x, augment_key)
    return x, labels


def step_inputs(setup: Setup, state: TrainState, hp: HParams, data: ArrayData, perm: jax.Array, index):
    """Exactly what the step at `state.step` sees: its batch, labels and dropout key (shared with the probes)."""
    augment_key = jax.random.fold_in(run_key(hp.seed, STREAM_AUGMENT), state.step)
    x, labels = train_inputs(setup, data, perm, index, augment_key)
    return x, labels, jax.random.fold_in(run_key(hp.seed, STREAM_DROPOUT), state.step)


def train_step(setup: Setup, state: TrainState, hp: HParams, data: ArrayData, perm: jax.Array, index):
    """One SGD/Adam step on batch `index` of the epoch order `perm`; frozen once diverged."""
    x, labels, dropout_key = step_inputs(setup, state, hp, data, perm, index)
    grad_fn = jax.value_and_grad(forward_train, argnums=1, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(
        setup, state.params, state.batch_stats, x, labels, hp.dropout_rate, dropout_key
    )
    lr = step_lr(setup, state, hp)
    tx = make_optimizer(setup, lr, hp.weight_decay)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_new = finite & ~state.diverged
    choose = lambda new, old: jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)
    newly_diverged = ~finite & ~state.diverged
    new_state = state.replace(
        step=state.step + 1,
        params=choose(params, state.params),
        batch_stats=choose(batch_stats, state.batch_stats),
        opt_state=choose(opt_state, state.opt_state),
        diverged=state.diverged | ~finite,
        diverged_step=jnp.where(newly_diverged, state.step, state.diverged_step),
    )
    metrics = {
        "loss": loss,
        "acc": jnp.mean(jnp.argmax(logits, -1) == labels),
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(new_state.params),
        "lr": jnp.asarray(lr, jnp.float32),
        "diverged": new_state.diverged.astype(jnp.float32),
    }
    return new_state, metrics


def train_steps(setup: Setup, k: int, state: TrainState, hp: HParams, data: ArrayData, perm: jax.Array, index):
    """`k` consecutive `train_step`s on batches `index`, ..., `index + k - 1`; metrics stacked to [k, ...].

    A `lax.scan` unrolled completely, so one jitted call runs a chunk of k steps as straight-line code: on
    XLA:CPU that beats one call per step, while a rolled scan over the same steps is several times slower.
    The scan traces the step once (a Python loop would trace it k times: ~0.05 s per step at every start).
    """

    def one_step(state, i):
        return train_step(setup, state, hp, data, perm, index + i)

    return jax.lax.scan(one_step, state, jnp.arange(k), unroll=True)


def epoch_permutation(seed: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    """This run's order of the training set in `epoch`, from its own seed."""
    return jax.random.permutation(jax.random.fold_in(run_key(seed, STREAM_DATA), epoch), num_examples)


def eval_logits(setup: Setup, params, batch_stats, images):
    """Inference-mode logits: BN normalizes with `batch_stats` (running averages, or any stats put there)."""
    return setup.model.apply({"params": params, "batch_stats": batch_stats}, normalize(setup, images), train=False)


def eval_batch(setup: Setup, params, batch_stats, images, labels, mask):
    """Sums of loss and correct predictions over the masked examples, BN with running averages."""
    logits = eval_logits(setup, params, batch_stats, images)
    loss = cross_entropy(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return {"loss_sum": jnp.sum(loss * mask), "correct_sum": jnp.sum(correct * mask)}
