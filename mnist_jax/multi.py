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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from mnist_jax import data, loop, steps
from mnist_jax.config import EVAL_BATCH_SIZE, Config, UserError
from mnist_jax.model import IMAGE_SHAPE
from mnist_jax.parallel import data_parallel
from mnist_jax.steps import StepKeys, make_model, predict
from mnist_jax.tblog import TensorBoardLog

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

    `sequential=True` is for forward passes: the CNN then evaluates with XLA's convolution, which
    vmapped over models would become a slow grouped convolution on XLA:CPU; a single model is then
    simply `fn` on the squeezed arguments. Training steps stay vmapped even for one model: squeezing
    a donated state made XLA:CPU copy the Dense kernel and Adam's moments every step (docs/performance.md).
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


def vmap_step(step_fn: StepFn = steps.train_step) -> Callable:
    """`step_fn(state, batch, rng)` for K models at once: (states, batch shared or [K, ...], rngs[K]) -> (states, metrics[K])."""

    def steps(states, batch, rngs):
        return map_models(step_fn, (0, _batch_axis(batch), 0), states, batch, rngs)

    return steps


train_steps = jax.jit(vmap_step(steps.train_step))
train_steps.__doc__ = """One Adam step for each of K stacked models: (states, batch, rngs[K]) -> (states, metrics[K]). Pure.

`batch["image"]` is f32[B, 28, 28, 1] (all models see it) or f32[K, B, 28, 28, 1] (one batch per model)."""


def _eval_steps(states: TrainState, batch: dict) -> dict:
    return map_models(steps.eval_step, (0, _batch_axis(batch)), states, batch, sequential=True)


eval_steps = jax.jit(_eval_steps)
eval_steps.__doc__ = """`eval_step` for K stacked models on one shared batch (or one per model): metrics of shape [K]."""


@jax.jit
def _predict_many(states: TrainState, images: jax.Array) -> jax.Array:
    return map_models(lambda state: predict(state, images), (0,), states, sequential=True)


def evaluate_many(states: TrainState, arrays: dict[str, Any], batch_size: int = EVAL_BATCH_SIZE) -> dict[str, np.ndarray]:
    """Loss and accuracy of each model over every example of `arrays` (last batch padded and masked): arrays of shape [K]."""
    return loop.evaluate(states, arrays, batch_size, step=eval_steps)


def predict_many(states: TrainState, images: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Class probabilities of each model: float32[K, N, classes]. `.mean(0)` is the ensemble's."""
    n = len(images)
    chunks = [
        np.asarray(_predict_many(states, b["image"]))
        for b in data.padded_batches({"image": np.asarray(images), "label": np.zeros(n, np.int32)}, batch_size)
    ]
    return np.concatenate(chunks, axis=1)[:, :n]


def many_models_step(step_fn: StepFn = steps.train_step) -> loop.OneStep:
    """The one-step function (`mnist_jax.loop`) of K stacked models: model k's batch gathered from
    indices [K, B] (or all models' from one [B]), its dropout key dropout_keys[k], its own metric sums."""

    def one_step(states, sums, images, labels, indices, dropout_keys):
        in_axes = (0, 0, None, None, 0 if indices.ndim == 2 else None, 0)
        return map_models(functools.partial(steps.gathered_train_step, step_fn), in_axes, states, sums, images, labels, indices, dropout_keys)

    return one_step


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
    step_fn: StepFn = steps.train_step,
    eval_train: bool = False,
    shared_order: bool = False,
    sequential: bool = False,
    verbose: bool = False,
    tb_dir: str | Path | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train K models in one compiled step (or, with `sequential`, one after another): model k as
    `fit(configs[k])` would, without a workdir.

    `configs` may differ only in `seed` and `learning_rate`; `epochs`, `batch_size`, `train_examples`,
    `eval_batch_size` and the model come from `configs[0]`. `train`/`test` are `load_split` arrays
    (`test` None: no validation). `model`, `optimizer` and `step_fn` (a function like
    `mnist_jax.steps.train_step`) replace the library's defaults for the whole group. With
    `eval_train`, each epoch also evaluates every model on its training set in eval mode (no dropout).
    With `shared_order`, all models see the batches of configs[0]'s data order. With `tb_dir`, model k's
    per-epoch scalars go to TensorBoard event files in `tb_dir/model-k` (`mnist_jax.tblog`). With `sequential`,
    each model trains alone (a group of one) and the states are stacked after: on
    XLA:CPU, vmapped models gain no speed and turn XLA's convolution into a slow grouped one
    (experiments/README.md, improved recipe). `shared_order` is then moot. Steps are dispatched
    `config.steps_per_call` at a time, as in `fit` (auto: 100 on CPU, a whole epoch on GPU/TPU, under `lax.scan`).

    Returns the stacked final states and one history per model: loss, accuracy (running train means,
    with dropout), val_loss, val_accuracy[, train_eval_loss, train_eval_accuracy] per epoch, and
    epoch_time_s (the group's training time per epoch, evaluation excluded), eval_time_s,
    compile_time_s, fit_time_s, nonfinite_step (first step whose loss was NaN/Inf, or None). Vmapped models
    share their group's times; sequential ones have their own.
    """
    configs = [configs] if isinstance(configs, Config) else list(configs)
    _check_compatible(configs)
    [c.validate() for c in configs]  # every model's seed and learning rate, not only the first's
    model = make_model(configs[0]) if model is None else model  # one model and optimizer: the states stack
    optimizer = default_optimizer(configs[0]) if optimizer is None else optimizer
    kw = dict(model=model, optimizer=optimizer, built_learning_rate=configs[0].learning_rate, step_fn=step_fn, eval_train=eval_train, verbose=verbose)
    tb_dirs = [None if tb_dir is None else Path(tb_dir) / f"model-{k}" for k in range(len(configs))]
    if not sequential:
        return _fit_group(configs, train, test, shared_order=shared_order, tb_dirs=tb_dirs, **kw)
    trained = []
    for k, (config, tb) in enumerate(zip(configs, tb_dirs)):
        if verbose:
            print(f"-- model {k + 1}/{len(configs)} (seed {config.seed}), trained alone", flush=True)
        trained.append(_fit_group([config], train, test, tb_dirs=[tb], **kw))
    return stack([unstack(states, 0) for states, _ in trained]), [history for _, (history,) in trained]


def _fit_group(
    configs: Sequence[Config],
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray] | None,
    *,
    model: Any,
    optimizer: optax.GradientTransformation,
    built_learning_rate: float,
    step_fn: StepFn,
    eval_train: bool,
    shared_order: bool = False,
    verbose: bool,
    tb_dirs: Sequence[Path | None],
) -> tuple[TrainState, list[dict[str, Any]]]:
    """`fit_many`'s vmapped group: `configs` (checked compatible and valid) in one compiled step, model k's
    TensorBoard scalars in `tb_dirs[k]` (None: none); `optimizer` was built with `built_learning_rate`."""
    config = configs[0]
    if config.train_examples is not None:
        train = {k: v[: config.train_examples] for k, v in train.items()}
    steps_per_epoch = loop.check_steps_per_epoch(len(train["label"]), config.batch_size)
    dp = data_parallel(1)
    keys = [StepKeys.from_seed(c.seed) for c in configs]
    init_keys, dropout_keys, data_keys = (jnp.stack([getattr(k, f) for k in keys]) for f in ("init", "dropout", "data"))
    states = create_train_states(init_keys, config, model=model, optimizer=optimizer)
    if any(c.learning_rate != built_learning_rate for c in configs):
        states = set_learning_rates(states, [c.learning_rate for c in configs])
    zero_sums = lambda: dp.put_replicated(jax.tree.map(lambda x: jnp.tile(x, len(configs)), steps.zero_sums()))  # noqa: E731

    compile_clock, per_call = loop.Stopwatch(), loop.resolve_steps_per_call(config, steps_per_epoch)
    order = loop.epoch_order(dp, data_keys[0] if shared_order else data_keys, len(train["label"]), config.batch_size)
    images, labels = dp.put_replicated(train["image"]), dp.put_replicated(train["label"])
    feed = loop.device_feed(many_models_step(step_fn), dp, images, labels, dropout_keys, per_call, steps_per_epoch)
    feed.compile(states, zero_sums(), order(0).shape)
    compile_time, fit_clock = compile_clock.elapsed(), loop.Stopwatch()  # fit_time_s, as in `fit`: compilation apart

    names = ["loss", "accuracy", "val_loss", "val_accuracy"] + (["train_eval_loss", "train_eval_accuracy"] if eval_train else [])
    histories = [{**{n: [] for n in names}, "epoch_time_s": [], "eval_time_s": [], "nonfinite_step": None} for _ in configs]
    logs = [TensorBoardLog(tb) for tb in tb_dirs]
    for epoch in range(config.epochs):
        epoch_clock = loop.Stopwatch()
        feed.start_epoch(order(epoch), 0)
        states, sums = loop.run_epoch(feed, states, zero_sums(), first_step=0, num_steps=steps_per_epoch, per_call=per_call)
        sums = jax.device_get(sums)
        train_time = epoch_clock.elapsed()
        rows = {"loss": sums["loss"] / steps_per_epoch, "accuracy": sums["accuracy"] / steps_per_epoch}
        for prefix, arrays in (("val_", test), ("train_eval_", train if eval_train else None)):
            if arrays is not None:
                rows.update({prefix + k: v for k, v in evaluate_many(states, arrays, config.eval_batch_size).items()})
        eval_time = epoch_clock.elapsed() - train_time
        for k, history in enumerate(histories):
            for name, values in rows.items():
                history[name].append(float(values[k]))
            history["epoch_time_s"].append(train_time)
            history["eval_time_s"].append(eval_time)
            logs[k].epoch((epoch + 1) * steps_per_epoch, {name: history[name][-1] for name in [*rows, "epoch_time_s", "eval_time_s"]})
            if history["nonfinite_step"] is None and sums["first_nonfinite_step"][k] >= 0:
                history["nonfinite_step"] = int(sums["first_nonfinite_step"][k])
        if verbose:
            shown = "val_accuracy" if test is not None else "accuracy"
            values = " ".join(f"{a:.4f}" for a in rows[shown])
            print(f"Epoch {epoch + 1}/{config.epochs} - {train_time:.1f}s train, {eval_time:.1f}s eval - {len(configs)} model(s) - {shown} {values}", flush=True)
    fit_time = fit_clock.elapsed()
    for log in logs:
        log.close()
    for config_k, history in zip(configs, histories):
        history.update(compile_time_s=compile_time, fit_time_s=fit_time, seed=config_k.seed, learning_rate=config_k.learning_rate)
    return states, histories
