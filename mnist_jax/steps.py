"""The pure functions of training: state, loss, one train step, one eval step, prediction, metric sums.

Every function here is pure: state in, state out, nothing mutated, PRNG keys passed explicitly.
`train_step`, `eval_step` and `predict` are jitted; they compose under `jax.vmap`, `lax.scan` and an
outer `jax.jit` (an inner jit is inlined), which is how `mnist_jax.loop` and `mnist_jax.multi` use them.

    state = create_train_state(jax.random.key(0), Config())
    state, metrics = train_step(state, {"image": f32[B, 28, 28, 1], "label": i32[B]}, dropout_key)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from mnist_jax.config import Config
from mnist_jax.model import CNN, IMAGE_SHAPE

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def make_model(config: Config) -> CNN:
    return CNN.from_config(config.model, dtype=jnp.dtype(config.compute_dtype))


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam with Keras's eps (1e-7; optax's default is 1e-8): the seed's optimizer."""
    return optax.adam(config.learning_rate, eps=1e-7)


def create_train_state(rng: jax.Array, config: Config) -> TrainState:
    """Fresh parameters (from `rng`) and optimizer state for `config`."""
    model = make_model(config)
    params = model.init(rng, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config))


@dataclasses.dataclass(frozen=True)
class StepKeys:
    """A run's PRNG streams. Keys are folded with the step (dropout) or the epoch (data order), so the
    step is the whole PRNG state: a resumed run draws what an uninterrupted one would."""

    init: jax.Array
    dropout: jax.Array
    data: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> "StepKeys":
        init, dropout, data_key = jax.random.split(jax.random.key(seed), 3)
        return cls(init, dropout, data_key)


def loss_and_logits(params: Any, state: TrainState, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy f32[B] and logits f32[B, classes]; dropout on when `rng` is given."""
    train = rng is not None
    logits = state.apply_fn({"params": params}, batch["image"], train=train, rngs={"dropout": rng} if train else {})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, logits


@jax.jit
def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    """One optimizer step on `batch` with dropout key `rng`: (new state, {"loss", "accuracy"} of the batch)."""

    def loss_fn(params):
        losses, logits = loss_and_logits(params, state, batch, rng)
        return losses.mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": accuracy}


@jax.jit
def eval_step(state: TrainState, batch: Batch) -> Metrics:
    """Mean loss and accuracy over `batch`, and the count of examples; entries with batch["mask"] False are ignored."""
    losses, logits = loss_and_logits(state.params, state, batch, None)
    mask = batch.get("mask", jnp.ones_like(losses, dtype=bool)).astype(jnp.float32)
    count = mask.sum()
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
        "loss": (losses * mask).sum() / jnp.maximum(count, 1.0),
        "accuracy": (correct * mask).sum() / jnp.maximum(count, 1.0),
        "count": count,
    }


@jax.jit
def predict(state: TrainState, images: jax.Array) -> jax.Array:
    """Class probabilities float32[N, classes] for images float32[N, 28, 28, 1] in [0, 1]."""
    return jax.nn.softmax(state.apply_fn({"params": state.params}, images, train=False))


def zero_sums() -> Metrics:
    """An epoch's metric sums before its first step (see `accumulate`)."""
    return {"loss": jnp.zeros(()), "accuracy": jnp.zeros(()), "first_nonfinite_step": jnp.full((), -1, jnp.int32)}


def sums_from_host(values: dict[str, float] | None) -> Metrics:
    """Sums as a checkpoint recorded them (Python numbers; None: an epoch's start), in `zero_sums`'s dtypes."""
    return {k: jnp.asarray((values or {}).get(k, zero), zero.dtype) for k, zero in zero_sums().items()}


def accumulate(sums: Metrics, metrics: Metrics, step: jax.Array) -> Metrics:
    """Add a step's metrics to the epoch's sums on the device (no host sync); remember the first step whose
    loss was not finite in "first_nonfinite_step" (-1: none yet)."""
    bad = (sums["first_nonfinite_step"] < 0) & ~jnp.isfinite(metrics["loss"])
    return {
        "loss": sums["loss"] + metrics["loss"],
        "accuracy": sums["accuracy"] + metrics["accuracy"],
        "first_nonfinite_step": jnp.where(bad, step.astype(jnp.int32), sums["first_nonfinite_step"]),
    }


def train_step_with_sums(step_fn: Any, state: TrainState, sums: Metrics, batch: Batch, dropout_key: jax.Array) -> tuple[TrainState, Metrics]:
    """`step_fn(state, batch, rng)` (`train_step` or one like it) with the run's dropout key folded with the
    step, its metrics added to `sums`."""
    step = state.step
    state, metrics = step_fn(state, batch, jax.random.fold_in(dropout_key, step))
    return state, accumulate(sums, metrics, step)


def gathered_train_step(
    step_fn: Any, state: TrainState, sums: Metrics, images: jax.Array, labels: jax.Array, indices: jax.Array, dropout_key: jax.Array
) -> tuple[TrainState, Metrics]:
    """`train_step_with_sums` on the batch images[indices], labels[indices], gathered on the device."""
    return train_step_with_sums(step_fn, state, sums, {"image": images[indices], "label": labels[indices]}, dropout_key)
