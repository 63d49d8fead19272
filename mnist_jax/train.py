"""Train state, pure jit-compiled steps, evaluation and the `fit` loop.

`train_step(state, batch, rng)` and `eval_step(state, batch)` are pure: state in,
state out, nothing mutated, the dropout key passed explicitly. `fit` drives the
same step with the data resident on the device, the batch gathered inside the
compiled call and the old state's buffers donated.
"""

from __future__ import annotations

import dataclasses
import functools
import datetime
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from tqdm.auto import tqdm

from mnist_jax import checkpoint, data
from mnist_jax.config import Config, UserError
from mnist_jax.model import CNN, IMAGE_SHAPE, summary

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def make_model(config: Config) -> CNN:
    return CNN.from_config(config.model, dtype=jnp.dtype(config.compute_dtype))


def make_optimizer(config: Config) -> optax.GradientTransformation:
    # eps=1e-7 is Keras' Adam default (optax's is 1e-8): the seed's optimizer.
    return optax.adam(config.learning_rate, eps=1e-7)


def create_train_state(rng: jax.Array, config: Config) -> TrainState:
    """Fresh parameters (from `rng`) and optimizer state for `config`."""
    model = make_model(config)
    params = model.init(rng, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config))


def _loss_and_logits(params: Any, state: TrainState, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    train = rng is not None
    logits = state.apply_fn({"params": params}, batch["image"], train=train, rngs={"dropout": rng} if train else {})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, logits


def _train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    def loss_fn(params):
        losses, logits = _loss_and_logits(params, state, batch, rng)
        return losses.mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": accuracy}


def _eval_step(state: TrainState, batch: Batch) -> Metrics:
    losses, logits = _loss_and_logits(state.params, state, batch, None)
    mask = batch.get("mask", jnp.ones_like(losses, dtype=bool)).astype(jnp.float32)
    count = mask.sum()
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
        "loss": (losses * mask).sum() / jnp.maximum(count, 1.0),
        "accuracy": (correct * mask).sum() / jnp.maximum(count, 1.0),
        "count": count,
    }


# The public steps. Neither donates its inputs, so a research script may keep
# using the state it passed in; `fit` uses the donating variant below.
train_step = jax.jit(_train_step)
train_step.__doc__ = """One Adam step on `batch` with dropout key `rng`: (state, metrics). Pure."""
eval_step = jax.jit(_eval_step)
eval_step.__doc__ = """Mean loss and accuracy over `batch` (entries with batch["mask"] False are ignored)."""


@jax.jit
def predict(state: TrainState, images: jax.Array) -> jax.Array:
    """Class probabilities float32[N, classes] for images float32[N, 28, 28, 1] in [0, 1]."""
    return jax.nn.softmax(state.apply_fn({"params": state.params}, images, train=False))


@dataclasses.dataclass(frozen=True)
class StepKeys:
    """The run's PRNG streams: keys are folded with the step/epoch, so the step *is* the PRNG state."""

    init: jax.Array
    dropout: jax.Array
    data: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> "StepKeys":
        init, dropout, data_key = jax.random.split(jax.random.key(seed), 3)
        return cls(init, dropout, data_key)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _device_train_step(
    state: TrainState, sums: Metrics, images: jax.Array, labels: jax.Array, indices: jax.Array, dropout_key: jax.Array
) -> tuple[TrainState, Metrics]:
    """`train_step` on a batch gathered on the device; metric sums accumulate without a host sync."""
    batch = {"image": images[indices], "label": labels[indices]}
    state, metrics = _train_step(state, batch, jax.random.fold_in(dropout_key, state.step))
    return state, jax.tree.map(jnp.add, sums, metrics)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _host_train_step(
    state: TrainState, sums: Metrics, batch: Batch, dropout_key: jax.Array
) -> tuple[TrainState, Metrics]:
    state, metrics = _train_step(state, batch, jax.random.fold_in(dropout_key, state.step))
    return state, jax.tree.map(jnp.add, sums, metrics)


def evaluate(state: TrainState, arrays: dict[str, Any], batch_size: int = 1000) -> dict[str, float]:
    """Loss and accuracy over every example of `arrays`; the last batch is padded and masked, never dropped."""
    n = len(arrays["label"])
    padded = -(-n // batch_size) * batch_size
    pad = lambda x: np.concatenate([np.asarray(x), np.zeros((padded - n, *x.shape[1:]), x.dtype)])  # noqa: E731
    images, labels = pad(arrays["image"]), pad(arrays["label"])
    mask = np.arange(padded) < n
    loss_sum = correct = 0.0
    for start in range(0, padded, batch_size):
        window = slice(start, start + batch_size)
        m = eval_step(state, {"image": images[window], "label": labels[window], "mask": mask[window]})
        loss_sum += m["loss"] * m["count"]
        correct += m["accuracy"] * m["count"]
    return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}


def default_workdir(dataset: str) -> Path:
    return Path("runs") / f"{dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def _link_latest(workdir: Path) -> None:
    latest = workdir.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = workdir.parent / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(workdir.name)
        tmp.replace(latest)


def _epoch_line(epoch: int, epochs: int, seconds: float, row: dict[str, float]) -> str:
    metrics = " - ".join(f"{k}: {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy"))
    return f"Epoch {epoch}/{epochs} - {seconds:.1f}s - {metrics}"


def fit(config: Config, *, resume: bool = False, verbose: bool = True) -> tuple[TrainState, dict[str, Any]]:
    """Train `config` end to end: data, state, epochs, checkpoints, history. Returns (state, history).

    With `resume`, continues from the latest checkpoint in `config.workdir`.
    """
    config.validate()
    say = print if verbose else (lambda *a, **k: None)
    workdir = Path(config.workdir) if config.workdir else default_workdir(config.dataset)
    if resume and not checkpoint.has_checkpoint(workdir):
        raise UserError(f"nothing to resume: {workdir} has no checkpoint")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create workdir {workdir}: {err.strerror}") from None
    config = dataclasses.replace(config, workdir=str(workdir))

    train = data.load_split(
        config.dataset, "train", num_examples=config.train_examples,
        data_dir=config.data_dir, manual_dir=config.manual_dir,
    )  # fmt: skip
    test = data.load_split(config.dataset, "test", data_dir=config.data_dir, manual_dir=config.manual_dir)
    steps_per_epoch = len(train["label"]) // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch size {config.batch_size} is larger than the {len(train['label'])} training examples")

    keys = StepKeys.from_seed(config.seed)
    state = create_train_state(keys.init, config)
    history: dict[str, Any] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "epoch_time_s": []}
    manager = checkpoint.make_manager(workdir / "checkpoints", config.keep_checkpoints)
    start_epoch = 0
    if resume:
        state, meta = checkpoint.restore_latest(manager, state)
        history, start_epoch = meta["history"], meta["epoch"]
        say(f"Resumed from {workdir / 'checkpoints'} at epoch {start_epoch}, step {int(state.step)}")
    else:
        config.save(workdir / "config.json")
    _link_latest(workdir)
    say(summary(make_model(config)))

    if config.pipeline == "device":
        images, labels = jax.device_put(train["image"]), jax.device_put(train["label"])
    fit_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        order = data.epoch_permutation(keys.data, epoch, len(train["label"]), config.batch_size)
        sums = {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}
        bar = tqdm(total=steps_per_epoch, desc=f"Epoch {epoch + 1}/{config.epochs}", disable=not verbose, leave=False)
        if config.pipeline == "device":
            batches = (order[i] for i in range(steps_per_epoch))
        else:
            batches = data.tf_batches(train, np.asarray(order))
        for i, batch in enumerate(batches):
            if config.pipeline == "device":
                state, sums = _device_train_step(state, sums, images, labels, batch, keys.dropout)
            else:
                state, sums = _host_train_step(state, sums, batch, keys.dropout)
            if (i + 1) % 100 == 0 or i + 1 == steps_per_epoch:  # a host sync: not every step
                running = {k: float(v) / (i + 1) for k, v in sums.items()}
                bar.set_postfix(loss=f"{running['loss']:.4f}", accuracy=f"{running['accuracy']:.4f}", refresh=False)
                bar.update((i + 1) - bar.n)
        bar.close()
        val = evaluate(state, test, config.eval_batch_size)
        row = {k: float(v) / steps_per_epoch for k, v in sums.items()}
        row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        seconds = time.perf_counter() - epoch_start
        for key, value in {**row, "epoch_time_s": seconds}.items():
            history[key].append(value)
        say(_epoch_line(epoch + 1, config.epochs, seconds, row))
        checkpoint.save(manager, state, {"epoch": epoch + 1, "history": history}, metrics=val)
    history["fit_time_s"] = history.get("fit_time_s", 0.0) + (time.perf_counter() - fit_start)
    manager.wait_until_finished()

    test_metrics = evaluate(state, test, config.eval_batch_size)
    (workdir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    (workdir / "metrics.json").write_text(json.dumps({"test_loss": test_metrics["loss"], "test_accuracy": test_metrics["accuracy"]}, indent=2) + "\n")
    say(f"Fit Time : {history['fit_time_s']:.1f} s")
    say(f"Test Loss : {test_metrics['loss']:.4f}")
    say(f"Test Accuracy : {test_metrics['accuracy']:.4f}")
    say(f"Workdir : {workdir}")
    return state, history
