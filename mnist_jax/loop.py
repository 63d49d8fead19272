"""The epoch runner: how training steps are fed to the device, and what happens between compiled calls.

A *one-step function* `(state, sums, images, labels, indices, dropout_key) -> (state, sums)` trains on the
batch `images[indices]`: one model (`one_model_step`) or K vmapped ones (`mnist_jax.multi`). A *feed*
runs steps `start .. start+n` of an epoch in one compiled call, with the old state and sums donated:

- `DeviceChunks`: the steps under `lax.scan`, slicing the epoch's order on the device (the default);
- `DeviceSteps`: one compiled call per step, the batch's indices sent from the host;
- `TfDataBatches`: one call per step on batches a tf.data pipeline gathers on the host.

`run_epoch(feed, ...)` calls the feed until the epoch ends, with `EpochHooks` around each call: that is
where `fit` checkpoints, stops on request, checks for NaN, logs and traces. `evaluate` covers every example.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from mnist_jax import data, steps
from mnist_jax.config import EVAL_BATCH_SIZE, Config, UserError
from mnist_jax.parallel import DataParallel

OneStep = Callable[..., tuple[Any, steps.Metrics]]

# Auto steps per call on CPU: chunks of 100 scanned steps, the progress bar's interval (docs/performance.md).
CPU_STEPS_PER_CALL = 100


def resolve_steps_per_call(config: Config, steps_per_epoch: int) -> int:
    """`config.steps_per_call`, with 0 (auto) meaning the whole epoch on accelerators and, on CPU, chunks
    of `CPU_STEPS_PER_CALL`; and 1 everywhere with `checkpoint_every_steps`, so that checkpoints land
    on its multiples (checkpoints are taken between calls). The tfdata pipeline always runs 1."""
    if config.pipeline != "device":
        return 1
    if config.steps_per_call == 0:
        if config.checkpoint_every_steps:
            return 1
        return steps_per_epoch if jax.default_backend() != "cpu" else min(CPU_STEPS_PER_CALL, steps_per_epoch)
    return min(config.steps_per_call, steps_per_epoch)


def donation_compiler_options(platform: str) -> dict[str, Any] | None:
    """XLA options for programs that donate the train state: on XLA:CPU, region analysis in copy insertion,
    which removes a copy of every donated parameter read before its update (docs/performance.md)."""
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if platform == "cpu" else None


def one_model_step(step_fn: Any, dp: DataParallel) -> OneStep:
    """The one-step function of a single model trained with `step_fn` (`steps.train_step` or one like it),
    data parallel over `dp`: each device gathers its part of the batch."""

    def one_step(state, sums, images, labels, indices, dropout_key):
        indices = jax.lax.with_sharding_constraint(indices, dp.batch)
        return steps.gathered_train_step(step_fn, state, sums, images, labels, indices, dropout_key)

    return one_step


def scan_steps(
    one_step: OneStep, state: Any, sums: steps.Metrics, images: jax.Array, labels: jax.Array, order: jax.Array,
    start: jax.Array, dropout_key: jax.Array, *, num_steps: int, unroll: int = 1,
) -> tuple[Any, steps.Metrics]:
    """Steps `start .. start+num_steps` of an epoch under one `lax.scan`; `order` is the epoch's indices
    [steps, ...] (`epoch_order`), `unroll` steps per iteration of the scan's loop."""  # fmt: skip

    def body(carry, indices):
        return one_step(*carry, images, labels, indices, dropout_key), None

    chunk = jax.lax.dynamic_slice_in_dim(order, start, num_steps)
    (state, sums), _ = jax.lax.scan(body, (state, sums), chunk, unroll=unroll)
    return state, sums


def jit_chunk(one_step: OneStep, dp: DataParallel, num_steps: int, unroll: int = 1) -> Any:
    """`scan_steps` jitted for a mesh and a chunk length, everything replicated, old state and sums donated:
    (state, sums, images, labels, order, start, dropout_key) -> (state, sums)."""
    rep = dp.replicated
    fn = functools.partial(scan_steps, one_step, num_steps=num_steps, unroll=unroll)
    options = donation_compiler_options(dp.platform)
    return jax.jit(fn, in_shardings=(rep,) * 7, out_shardings=(rep, rep), donate_argnums=(0, 1), compiler_options=options)


def jit_step(one_step: OneStep, dp: DataParallel) -> Any:
    """`one_step` jitted for a mesh, the batch's indices split over it, old state and sums donated:
    (state, sums, images, labels, indices, dropout_key) -> (state, sums)."""
    rep, split = dp.replicated, dp.batch
    options = donation_compiler_options(dp.platform)
    return jax.jit(
        one_step, in_shardings=(rep, rep, rep, rep, split, rep), out_shardings=(rep, rep), donate_argnums=(0, 1), compiler_options=options
    )


def epoch_order(dp: DataParallel, data_keys: jax.Array, num_examples: int, batch_size: int) -> Callable[[int], jax.Array]:
    """`epoch -> indices [steps, batch]` (`data.epoch_permutation`), compiled once, replicated over `dp`.
    With K data keys [K], the order is [steps, K, batch]: model k's batch of each step on the middle axis."""
    permutation = functools.partial(data.epoch_permutation, num_examples=num_examples, batch_size=batch_size)

    def order(keys: jax.Array, epoch: jax.Array) -> jax.Array:
        if keys.ndim == 0:
            return permutation(keys, epoch)
        return jax.vmap(permutation, in_axes=(0, None))(keys, epoch).swapaxes(0, 1)

    fn = jax.jit(order, in_shardings=(dp.replicated,) * 2, out_shardings=dp.replicated)
    compiled = fn.lower(data_keys, dp.put_replicated(np.int32(0))).compile()
    return lambda epoch: compiled(data_keys, dp.put_replicated(np.int32(epoch)))


class Feed(Protocol):
    """Runs steps of an epoch: `compile` once (for the epoch's order's shape [steps, ...]), `start_epoch`
    once per epoch, then calls of `n` steps from step `start`."""

    def compile(self, state: Any, sums: steps.Metrics, order_shape: tuple[int, ...]) -> None: ...

    def start_epoch(self, order: jax.Array, first_step: int) -> None: ...

    def __call__(self, state: Any, sums: steps.Metrics, start: int, n: int) -> tuple[Any, steps.Metrics]: ...


@dataclasses.dataclass
class DeviceChunks:
    """Chunks of `per_call` steps under `lax.scan` (and the epoch's last, shorter one), the whole training
    split resident on the device and the epoch's order sliced there: one host dispatch per chunk."""

    one_step: OneStep
    dp: DataParallel
    images: jax.Array
    labels: jax.Array
    dropout_key: jax.Array
    per_call: int
    steps_per_epoch: int
    unroll: int = 1

    def compile(self, state: Any, sums: steps.Metrics, order_shape: tuple[int, ...]) -> None:
        order = jax.ShapeDtypeStruct(order_shape, jnp.int32, sharding=self.dp.replicated)
        start = self.dp.put_replicated(np.int32(0))
        self.compiled = {
            n: jit_chunk(self.one_step, self.dp, n, self.unroll).lower(state, sums, self.images, self.labels, order, start, self.dropout_key).compile()
            for n in sorted({self.per_call, self.steps_per_epoch % self.per_call} - {0})
        }  # fmt: skip

    def start_epoch(self, order: jax.Array, first_step: int) -> None:
        self.order = order

    def __call__(self, state: Any, sums: steps.Metrics, start: int, n: int) -> tuple[Any, steps.Metrics]:
        start_ = self.dp.put_replicated(np.int32(start))
        return self.dp.settle(self.compiled[n](state, sums, self.images, self.labels, self.order, start_, self.dropout_key))


@dataclasses.dataclass
class DeviceSteps:
    """One compiled call per step, the training split resident on the device, each batch's indices sent from the host."""

    one_step: OneStep
    dp: DataParallel
    images: jax.Array
    labels: jax.Array
    dropout_key: jax.Array

    def compile(self, state: Any, sums: steps.Metrics, order_shape: tuple[int, ...]) -> None:
        indices = self.dp.put_batch(np.zeros(order_shape[1:], np.int32))
        self.compiled = jit_step(self.one_step, self.dp).lower(state, sums, self.images, self.labels, indices, self.dropout_key).compile()

    def start_epoch(self, order: jax.Array, first_step: int) -> None:
        self.order = np.asarray(order)

    def __call__(self, state: Any, sums: steps.Metrics, start: int, n: int) -> tuple[Any, steps.Metrics]:
        indices = self.dp.put_batch(self.order[start])
        return self.dp.settle(self.compiled(state, sums, self.images, self.labels, indices, self.dropout_key))


@dataclasses.dataclass
class TfDataBatches:
    """One compiled call per step on batches that a tf.data pipeline gathers on the host, in the epoch's order."""

    step_fn: Any
    dp: DataParallel
    train: dict[str, np.ndarray]
    dropout_key: jax.Array

    def compile(self, state: Any, sums: steps.Metrics, order_shape: tuple[int, ...]) -> None:
        batch_size = order_shape[1]
        rep, split = self.dp.replicated, self.dp.batch
        fn = functools.partial(steps.train_step_with_sums, self.step_fn)
        options = donation_compiler_options(self.dp.platform)
        jitted = jax.jit(fn, in_shardings=(rep, rep, split, rep), out_shardings=(rep, rep), donate_argnums=(0, 1), compiler_options=options)
        batch = self.dp.put_batch({"image": self.train["image"][:batch_size], "label": self.train["label"][:batch_size]})
        self.compiled = jitted.lower(state, sums, batch, self.dropout_key).compile()

    def start_epoch(self, order: jax.Array, first_step: int) -> None:
        self.batches: Iterator[dict[str, np.ndarray]] = data.tf_batches(self.train, np.asarray(order)[first_step:])

    def __call__(self, state: Any, sums: steps.Metrics, start: int, n: int) -> tuple[Any, steps.Metrics]:
        return self.dp.settle(self.compiled(state, sums, self.dp.put_batch(next(self.batches)), self.dropout_key))


def device_feed(
    one_step: OneStep, dp: DataParallel, images: jax.Array, labels: jax.Array, dropout_key: jax.Array, per_call: int, steps_per_epoch: int
) -> DeviceChunks | DeviceSteps:
    """`DeviceChunks` of `per_call` steps, or `DeviceSteps` when that is 1."""
    if per_call == 1:
        return DeviceSteps(one_step, dp, images, labels, dropout_key)
    return DeviceChunks(one_step, dp, images, labels, dropout_key, per_call, steps_per_epoch)


class EpochHooks(Protocol):
    """What runs around each call of a feed: `before_call(done, n)` with the epoch's steps done and the
    call's; `after_call(state, sums, done, n)` once it is dispatched (may raise to end the epoch)."""

    def before_call(self, done: int, n: int) -> None: ...

    def after_call(self, state: Any, sums: steps.Metrics, done: int, n: int) -> None: ...


def run_epoch(
    feed: Feed, state: Any, sums: steps.Metrics, *, first_step: int, num_steps: int, per_call: int, hooks: EpochHooks | None = None
) -> tuple[Any, steps.Metrics]:
    """Steps `first_step .. num_steps` of an epoch, `per_call` per call of `feed`, `hooks` around each call."""
    done = first_step
    while done < num_steps:
        n = min(per_call, num_steps - done)
        if hooks is not None:
            hooks.before_call(done, n)
        state, sums = feed(state, sums, done, n)
        done += n
        if hooks is not None:
            hooks.after_call(state, sums, done, n)
    return state, sums


class Stopwatch:
    """Seconds since it started plus `offset`, less the time spent inside `paused()`."""

    def __init__(self, offset: float = 0.0) -> None:
        self.start = time.perf_counter() - offset

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - begin


def checkpoint_due(every: int, step: int, n: int) -> bool:
    """Whether the `n` steps that ended at global `step` crossed a multiple of `every` (0: never)."""
    return bool(every) and step // every > (step - n) // every


def first_nonfinite_step(sums: steps.Metrics) -> int | None:
    """The 1-based step whose loss first became NaN/Inf in the epoch's sums, or None (a host sync)."""
    step = int(sums["first_nonfinite_step"])
    return step + 1 if step >= 0 else None


def eval_batch_size(batch_size: int, dp: DataParallel | None) -> int:
    """`batch_size` rounded up to a multiple of the mesh's devices, so each batch splits evenly."""
    return batch_size if dp is None else -(-batch_size // dp.num_devices) * dp.num_devices


def evaluate(
    state: TrainState, arrays: dict[str, Any], batch_size: int = EVAL_BATCH_SIZE, dp: DataParallel | None = None,
    step: Callable[[TrainState, steps.Batch], steps.Metrics] = steps.eval_step,
) -> dict[str, Any]:
    """Loss and accuracy over every example of `arrays`; the last batch is padded and masked, never dropped.

    With `dp`, each batch is split over the mesh (the batch is rounded up to a multiple of its devices).
    `step` may be `eval_step` compiled ahead for the batch's shape, or one for K models (floats become arrays [K])."""  # fmt: skip
    n = len(arrays["label"])
    loss_sum = correct = 0.0
    for batch in data.padded_batches(arrays, eval_batch_size(batch_size, dp)):
        m = step(state, batch) if dp is None else dp.settle(step(state, dp.put_batch(batch)))
        loss_sum += m["loss"] * m["count"]
        correct += m["accuracy"] * m["count"]
    mean = lambda total: float(total) / n if np.ndim(total) == 0 else np.asarray(total) / n  # noqa: E731 - K models: arrays [K]
    return {"loss": mean(loss_sum), "accuracy": mean(correct)}


def check_steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps per epoch (the partial last batch is dropped); a UserError if there are none."""
    if num_examples < batch_size:
        raise UserError(f"batch size {batch_size} is larger than the {num_examples} training examples")
    return num_examples // batch_size
