"""Many models in one compiled step: K train states stacked on a leading axis, trained with `jax.vmap`.

    from mnist_jax.multi import create_train_states, train_steps, fit_many

    keys = jax.random.split(jax.random.key(0), 4)
    states = create_train_states(keys, Config(), learning_rates=[5e-4, 1e-3, 2e-3, 4e-3])
    states, metrics = train_steps(states, batch, jax.random.split(key, 4))  # metrics["loss"]: f32[4]

    states, histories = fit_many([Config(seed=s) for s in range(5)], train, test)  # = 5 x `fit`, in one jit

Every leaf of a stacked state has a leading axis of size K; `apply_fn` and `tx` are shared, so the K
models share an architecture and an optimizer *structure*. What may differ per model is whatever
is an array: parameters, optimizer state, the learning rate (kept in the optimizer state by
`optax.inject_hyperparams`), the dropout key, the data order. A batch is either shared (image
f32[B, 28, 28, 1]) or one per model (f32[K, B, 28, 28, 1]).

`fit_many(configs, ...)` trains model k exactly as `fit(configs[k])` would, up to float summation
order: the same init key, dropout key per step and data order (`StepKeys.from_seed(seed)`), the
batch gathered inside the compiled step from arrays resident on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from mnist_jax import data
from mnist_jax.config import EVAL_BATCH_SIZE, Config
from mnist_jax.model import IMAGE_SHAPE
from mnist_jax.train import (
    StepKeys,
    _accumulate,
    _eval_step,
    _train_step,
    _zero_sums,
    donation_compiler_options,
    make_model,
    predict,
    resolve_steps_per_call,
)

StepFn = Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]


def default_optimizer(config: Config) -> optax.GradientTransformation:
    """The library's Adam (eps=1e-7) with the learning rate held in the optimizer state, so it can differ per model.

    Only the learning rate is injected: b1, b2 and eps stay Python floats, as in `optax.adam`, because
    `1 - float32(0.999)` differs from `1 - 0.999` by 1e-5 relative, enough to drift from `fit`."""
    static = ("b1", "b2", "eps", "eps_root", "mu_dtype", "nesterov")
    return optax.inject_hyperparams(optax.adam, static_args=static)(learning_rate=config.learning_rate, eps=1e-7)


def num_models(states: Any) -> int:
    return int(jax.tree.leaves(states)[0].shape[0])


def create_train_states(
    rngs: jax.Array,
    config: Config,
    *,
    learning_rates: Sequence[float] | np.ndarray | None = None,
    model: Any = None,
    optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """K fresh train states stacked on a leading axis, model k initialised from `rngs[k]`.

    `model` (a Flax module called as `model.apply(v, images, train=..., rngs=...)`) defaults to the
    config's `CNN`; `optimizer` to `default_optimizer(config)`. `learning_rates` (K values) needs an
    optimizer built with `optax.inject_hyperparams` taking `learning_rate`.
    """
    model = make_model(config) if model is None else model
    tx = default_optimizer(config) if optimizer is None else optimizer

    def init(rng):  # one by one and un-jitted, as `create_train_state` does: bit-identical initial parameters
        params = model.init(rng, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False)["params"]
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    states = stack([init(rng) for rng in rngs])
    if learning_rates is not None:
        states = set_learning_rates(states, learning_rates)
    return states


def _hyperparams(states: TrainState) -> dict[str, jax.Array]:
    hyperparams = getattr(states.opt_state, "hyperparams", None)
    if hyperparams is None or "learning_rate" not in hyperparams:
        raise ValueError("per-model learning rates need an optimizer made with optax.inject_hyperparams(...)(learning_rate=...)")
    return hyperparams


def set_learning_rates(states: TrainState, learning_rates: Sequence[float] | np.ndarray) -> TrainState:
    """The same states with model k's learning rate set to `learning_rates[k]`."""
    hyperparams = _hyperparams(states)
    old = hyperparams["learning_rate"]
    lrs = jnp.asarray(np.asarray(learning_rates, np.float32)).astype(old.dtype)
    if lrs.shape != old.shape:
        raise ValueError(f"need {old.shape[0]} learning rates (one per model), got {lrs.shape}")
    opt_state = states.opt_state._replace(hyperparams={**hyperparams, "learning_rate": lrs})
    return states.replace(opt_state=opt_state)


def get_learning_rates(states: TrainState) -> np.ndarray:
    return np.asarray(_hyperparams(states)["learning_rate"])


def stack(states: Sequence[Any]) -> Any:
    """Stack same-structured pytrees (e.g. single train states) on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack(states: Any, k: int) -> Any:
    """Model k of stacked states, as an ordinary single-model pytree (usable with `train_step`, `predict`, ...)."""
    return jax.tree.map(lambda x: x[k], states)


def _batch_axis(batch: dict) -> int | None:
    return 0 if batch["image"].ndim == len(IMAGE_SHAPE) + 2 else None


def map_models(fn: Callable, in_axes: Sequence[int | None], *args: Any, sequential: bool = False) -> Any:
    """`jax.vmap(fn, in_axes)(*args)`, or with `sequential=True` the models one after another.

    `sequential=True` is for forward passes: the CNN then evaluates with XLA's convolution,
    which vmapped over models would become a grouped convolution, several times slower on
    XLA:CPU; a single model is then simply `fn` on the squeezed arguments. Training steps
    stay vmapped even for one model: squeezing a donated state (x[0], then x[None]) made
    XLA:CPU copy the 12.5 MB Dense kernel and both Adam moments every step and doubled the
    step's scratch memory (30 -> 64 MB, above glibc's largest mmap threshold, so each step
    also faulted in fresh pages): 67-74 ms/step against 34-43 ms vmapped, which is what
    `fit`'s step costs.
    """
    if not sequential:
        return jax.vmap(fn, in_axes=tuple(in_axes))(*args)
    k = jax.tree.leaves(next(a for a, axis in zip(args, in_axes) if axis == 0))[0].shape[0]
    if k == 1:
        squeezed = [jax.tree.map(lambda x: x[0], a) if axis == 0 else a for a, axis in zip(args, in_axes)]
        return jax.tree.map(lambda x: x[None], fn(*squeezed))
    mapped = [a for a, axis in zip(args, in_axes) if axis == 0]

    def one(xs):
        it = iter(xs)
        return fn(*[next(it) if axis == 0 else a for a, axis in zip(args, in_axes)])

    return jax.lax.map(one, mapped)


def vmap_step(step_fn: StepFn = _train_step) -> Callable:
    """`step_fn(state, batch, rng)` for K models at once: (states, batch shared or [K, ...], rngs[K]) -> (states, metrics[K])."""

    def steps(states, batch, rngs):
        return map_models(step_fn, (0, _batch_axis(batch), 0), states, batch, rngs)

    return steps


train_steps = jax.jit(vmap_step(_train_step))
train_steps.__doc__ = """One Adam step for each of K stacked models: (states, batch, rngs[K]) -> (states, metrics[K]). Pure.

`batch["image"]` is f32[B, 28, 28, 1] (all models see it) or f32[K, B, 28, 28, 1] (one batch per model)."""


def _eval_steps(states: TrainState, batch: dict) -> dict:
    return map_models(_eval_step, (0, _batch_axis(batch)), states, batch, sequential=True)


eval_steps = jax.jit(_eval_steps)
eval_steps.__doc__ = """`eval_step` for K stacked models on one shared batch (or one per model): metrics of shape [K]."""


@jax.jit
def _predict_many(states: TrainState, images: jax.Array) -> jax.Array:
    return map_models(lambda state: predict(state, images), (0,), states, sequential=True)


def evaluate_many(states: TrainState, arrays: dict[str, Any], batch_size: int = EVAL_BATCH_SIZE) -> dict[str, np.ndarray]:
    """Loss and accuracy of each model over every example of `arrays` (last batch padded and masked): arrays of shape [K]."""
    n = len(arrays["label"])
    loss = correct = 0.0
    for batch in data.padded_batches(arrays, batch_size):
        m = eval_steps(states, batch)
        loss = loss + m["loss"] * m["count"]
        correct = correct + m["accuracy"] * m["count"]
    return {"loss": np.asarray(loss) / n, "accuracy": np.asarray(correct) / n}


def predict_many(states: TrainState, images: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Class probabilities of each model: float32[K, N, classes]. `.mean(0)` is the ensemble's."""
    n = len(images)
    chunks = [
        np.asarray(_predict_many(states, b["image"]))
        for b in data.padded_batches({"image": np.asarray(images), "label": np.zeros(n, np.int32)}, batch_size)
    ]
    return np.concatenate(chunks, axis=1)[:, :n]


def _device_steps(step_fn: StepFn, states, sums, images, labels, indices, dropout_keys):
    """One step of every model on batches gathered on the device; per-model metric sums, no host sync."""

    def one(state, sums, idx, key):
        step = state.step
        state, metrics = step_fn(state, {"image": images[idx], "label": labels[idx]}, jax.random.fold_in(key, step))
        return state, _accumulate(sums, metrics, step)

    return map_models(one, (0, 0, 0 if indices.ndim == 2 else None, 0), states, sums, indices, dropout_keys)


def _device_step_chunk(step_fn: StepFn, states, sums, images, labels, indices, dropout_keys):
    """`_device_steps` over indices[n, ...] (n steps) under one `lax.scan`: n steps per compiled call."""

    def body(carry, step_indices):
        return _device_steps(step_fn, *carry, images, labels, step_indices, dropout_keys), None

    (states, sums), _ = jax.lax.scan(body, (states, sums), indices)
    return states, sums


@functools.lru_cache(maxsize=None)
def compiled_device_steps(step_fn: StepFn = _train_step, chunk: bool = False) -> Callable:
    """The jitted fit_many step for `step_fn`: (states, sums, images, labels, indices, dropout_keys[K]); old states donated.

    indices: [K, B] (per-model batches) or [B] (shared) for one step; with `chunk`, [n, K, B] or
    [n, B] for n steps under one `lax.scan` (one program per n)."""
    fn = functools.partial(_device_step_chunk if chunk else _device_steps, step_fn)
    return jax.jit(fn, donate_argnums=(0, 1), compiler_options=donation_compiler_options())


# Every model's data order of an epoch: [K, steps, batch] indices.
_epoch_orders = jax.jit(jax.vmap(data.epoch_permutation, in_axes=(0, None, None, None)), static_argnums=(2, 3))

_SHARED_FIELDS_EXEMPT = ("seed", "learning_rate", "workdir")


def _check_compatible(configs: Sequence[Config]) -> None:
    blank = lambda c: dataclasses.replace(c, **{f: getattr(configs[0], f) for f in _SHARED_FIELDS_EXEMPT})  # noqa: E731
    for c in configs[1:]:
        if blank(c) != configs[0]:
            fields = [f.name for f in dataclasses.fields(Config) if getattr(blank(c), f.name) != getattr(configs[0], f.name)]
            raise ValueError(f"fit_many trains models that differ only in seed and learning_rate; these differ: {', '.join(fields)}")


def fit_many(
    configs: Config | Sequence[Config],
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray] | None = None,
    *,
    model: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    step_fn: StepFn = _train_step,
    eval_train: bool = False,
    shared_order: bool = False,
    verbose: bool = False,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train K models in one compiled step: model k as `fit(configs[k])` would, without a workdir.

    `configs` may differ only in `seed` and `learning_rate`; `epochs`, `batch_size`, `train_examples`,
    `eval_batch_size` and the model come from `configs[0]`. `train`/`test` are `load_split` arrays
    (`test` None: no validation). `model`, `optimizer` and `step_fn` (a function like
    `mnist_jax.train._train_step`) replace the library's defaults for the whole group. With
    `eval_train`, each epoch also evaluates every model on its training set in eval mode (no dropout).
    With `shared_order`, all models see the batches of configs[0]'s data order. Steps are dispatched
    `config.steps_per_call` at a time, as in `fit` (auto: 100 on CPU, a whole epoch on GPU/TPU, under `lax.scan`).

    Returns the stacked final states and one history per model: loss, accuracy (running train means,
    with dropout), val_loss, val_accuracy[, train_eval_loss, train_eval_accuracy] per epoch, and
    epoch_time_s (the group's training time per epoch, evaluation excluded), eval_time_s,
    compile_time_s, fit_time_s, nonfinite_step (first step whose loss was NaN/Inf, or None).
    """
    configs = [configs] if isinstance(configs, Config) else list(configs)
    _check_compatible(configs)
    config = configs[0].validate()
    if config.train_examples is not None:
        train = {k: v[: config.train_examples] for k, v in train.items()}
    num_train, k_models = len(train["label"]), len(configs)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {config.batch_size} is larger than the {num_train} training examples")

    keys = [StepKeys.from_seed(c.seed) for c in configs]
    init_keys, dropout_keys, data_keys = (jnp.stack([getattr(k, f) for k in keys]) for f in ("init", "dropout", "data"))
    states = create_train_states(init_keys, config, model=model, optimizer=optimizer)
    if any(c.learning_rate != config.learning_rate for c in configs):
        states = set_learning_rates(states, [c.learning_rate for c in configs])
    images, labels = jax.device_put(train["image"]), jax.device_put(train["label"])
    zero_sums = lambda: jax.tree.map(lambda x: jnp.tile(x, k_models), _zero_sums())  # noqa: E731

    per_call = resolve_steps_per_call(config, steps_per_epoch)

    def step_indices(order: np.ndarray, i: int, n: int) -> np.ndarray:
        """Batches of steps i..i+n from order[K, steps, B]: [K, B] ([B] with shared_order) for one step, [n, K, B] ([n, B]) for more."""
        chunk = order[0, i : i + n] if shared_order else order[:, i : i + n].swapaxes(0, 1)
        return chunk[0] if n == 1 else chunk

    start = time.perf_counter()
    # Compiled before the clock too: jitted at its first call, the first epoch's time held this compilation.
    order_fn = _epoch_orders.lower(data_keys, 0, num_train, config.batch_size).compile()
    shape_only = np.zeros((k_models, per_call, config.batch_size), np.int32)  # lowering needs the indices' shape alone
    compiled = {}  # chunk length -> executable: the full chunk, and the epoch's last, shorter one
    for n in {per_call, steps_per_epoch % per_call} - {0}:
        fn = compiled_device_steps(step_fn, chunk=n > 1)
        compiled[n] = fn.lower(states, zero_sums(), images, labels, step_indices(shape_only, 0, n), dropout_keys).compile()
    compile_time = time.perf_counter() - start
    fit_start = time.perf_counter()  # as in `fit`: fit_time_s is the epochs', compilation apart

    names = ["loss", "accuracy", "val_loss", "val_accuracy"] + (["train_eval_loss", "train_eval_accuracy"] if eval_train else [])
    histories = [{**{n: [] for n in names}, "epoch_time_s": [], "eval_time_s": []} for _ in configs]
    nonfinite = [None] * k_models
    for epoch in range(config.epochs):
        epoch_start = time.perf_counter()
        order = np.asarray(order_fn(data_keys, epoch))  # [K, steps, B]
        sums = zero_sums()
        for i in range(0, steps_per_epoch, per_call):
            n = min(per_call, steps_per_epoch - i)
            states, sums = compiled[n](states, sums, images, labels, step_indices(order, i, n), dropout_keys)
        sums = jax.device_get(sums)
        train_time = time.perf_counter() - epoch_start
        rows = {"loss": sums["loss"] / steps_per_epoch, "accuracy": sums["accuracy"] / steps_per_epoch}
        if test is not None:
            val = evaluate_many(states, test, config.eval_batch_size)
            rows.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        if eval_train:
            tr = evaluate_many(states, train, config.eval_batch_size)
            rows.update(train_eval_loss=tr["loss"], train_eval_accuracy=tr["accuracy"])
        eval_time = time.perf_counter() - epoch_start - train_time
        for k, history in enumerate(histories):
            for name, values in rows.items():
                history[name].append(float(values[k]))
            history["epoch_time_s"].append(train_time)
            history["eval_time_s"].append(eval_time)
            bad = int(sums["first_nonfinite_step"][k])
            if nonfinite[k] is None and bad >= 0:
                nonfinite[k] = bad
        if verbose:
            shown = "val_accuracy" if test is not None else "accuracy"
            values = " ".join(f"{a:.4f}" for a in rows[shown])
            print(f"Epoch {epoch + 1}/{config.epochs} - {train_time:.1f}s train, {eval_time:.1f}s eval - {k_models} model(s) - {shown} {values}", flush=True)
    fit_time = time.perf_counter() - fit_start
    for k, history in enumerate(histories):
        history.update(compile_time_s=compile_time, fit_time_s=fit_time, nonfinite_step=nonfinite[k], seed=configs[k].seed,
                       learning_rate=configs[k].learning_rate)  # fmt: skip
    return states, histories
