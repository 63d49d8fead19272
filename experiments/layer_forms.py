"""layer_forms: which form of convolution trains each layer of the improved recipe's network fastest, on this device.

For each convolution of `common.DeepCNN` (its input shape at batch 128) and each form of
`mnist_jax.model.Conv` (`matmul`: one matmul over shifted views; `xla`: XLA's convolution), the time of one
jitted forward + backward pass (the kernel's gradient, and the input's except for the first layer), vmapped
over K models as `fit_many` trains them (K = 1: one model, as the improved recipe trains seeds on CPU). Then
one whole training step of the network (augmentation, dropout, AdamW) with every layer in one form and with
each layer in its faster form. Then whole epochs as `fit_recipe` trains one seed with every layer in one form
(steps per call from `common.recipe_steps_per_call`: on CPU, `xla` one per call, `matmul` in `lax.scan` chunks)
on `--epoch-examples` random images: the second of 2 epochs. Forms alternate within each of `--rounds` rounds, so machine drift falls on
both; the medians are reported. `common.recipe_forms` gives the choice made from these tables, per device.
"""

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import DeepCNN, Recipe, Run, fit_recipe, layer_shapes, markdown_table, parse_args, recipe_steps_per_call
from mnist_jax.model import CONV_FORMS, Conv
from mnist_jax.multi import create_train_states, vmap_step
from mnist_jax import Config


def time_call(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` (compiled before timing), each call waited for."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_pass(form: str, features: int, input_grad: bool):
    """Jitted forward + backward of one Conv layer vmapped over models: (params[K], x[K, ...]) -> grads."""
    conv = Conv(features, 3, form=form)

    def loss(params, x):
        return jnp.sum(conv.apply({"params": params}, x, train=True) ** 2)

    grad = jax.grad(loss, argnums=(0, 1) if input_grad else 0)
    return conv, jax.jit(jax.vmap(grad))


def main() -> None:
    args = parse_args(__doc__, full=dict(width=Recipe.width, batch_size=Recipe.batch_size, models=1, repeats=20, rounds=3, epoch_examples=60000),
                      quick=dict(repeats=5, rounds=2, epoch_examples=2560), seeds="1")  # fmt: skip
    run = Run(args)
    k, b, w = args.models, args.batch_size, args.width
    shapes = layer_shapes(DeepCNN(w, forms=("xla",) * 4))
    inputs = {"conv1_1": (28, 28, 1), "conv1_2": shapes["conv1_1"], "conv2_1": shapes["pool1"], "conv2_2": shapes["conv2_1"]}
    rng = np.random.default_rng(0)
    layer_times = {name: {form: [] for form in CONV_FORMS} for name in inputs}
    passes = {}
    for name, shape in inputs.items():
        features = w if name.startswith("conv1") else 2 * w
        x = jnp.asarray(rng.random((k, b, *shape), dtype=np.float32))
        for form in CONV_FORMS:
            conv, fn = layer_pass(form, features, input_grad=name != "conv1_1")
            params = jax.vmap(lambda key: conv.init(key, x[0])["params"])(jax.random.split(jax.random.key(0), k))
            passes[name, form] = (fn, params, x)
    for round_ in range(args.rounds):
        for name in inputs:
            for form in CONV_FORMS if round_ % 2 == 0 else CONV_FORMS[::-1]:
                fn, params, x = passes[name, form]
                layer_times[name][form].append(time_call(fn, params, x, repeats=args.repeats))
    median = {name: {form: statistics.median(t) for form, t in times.items()} for name, times in layer_times.items()}
    best = tuple(min(CONV_FORMS, key=lambda form: median[name][form]) for name in inputs)

    recipe = Recipe(width=w, batch_size=b)
    config = Config(batch_size=b)
    images = jnp.asarray(rng.random((b, 28, 28, 1), dtype=np.float32))
    batch = {"image": images, "label": jnp.asarray(rng.integers(0, 10, b).astype(np.int32))}
    variants = {f"all {form}": (form,) * 4 for form in CONV_FORMS} | {"fastest per layer": best}
    step_times = {label: [] for label in variants}
    steps = {}
    for label, forms in variants.items():
        model = DeepCNN(w, recipe.dense_features, recipe.dropout_rate, forms=forms)
        states = create_train_states(jax.random.split(jax.random.key(0), k), config, model=model, optimizer=recipe.optimizer(100))
        steps[label] = (jax.jit(vmap_step(recipe.step_fn())), states)
    rngs = jax.random.split(jax.random.key(1), k)
    for round_ in range(args.rounds):
        for label in variants if round_ % 2 == 0 else list(variants)[::-1]:
            fn, states = steps[label]
            step_times[label].append(time_call(fn, states, batch, rngs, repeats=args.repeats))

    epoch_times = whole_epochs(recipe, args.epoch_examples, args.rounds, rng)

    rows = [[f"`{name}` {inputs[name]} -> {w if name.startswith('conv1') else 2 * w}",
             *(f"{1000 * median[name][form]:.2f}" for form in CONV_FORMS), f"`{form}`"] for name, form in zip(inputs, best)]  # fmt: skip
    table = markdown_table(["layer (input -> features)", *(f"`{f}` ms" for f in CONV_FORMS), "faster"], rows)
    step_median = {label: statistics.median(t) for label, t in step_times.items()}
    rows = [[label, ", ".join(variants[label]), f"{1000 * step_median[label]:.1f}", f"{step_median[label] * 60000 / b:.0f}"] for label in variants]
    table += "\n\n" + markdown_table(["whole training step", "forms (conv1_1, conv1_2, conv2_1, conv2_2)", "ms/step", "s per 60,000 images"], rows)
    per_call = {form: recipe_steps_per_call((form,) * 4, jax.default_backend()) for form in epoch_times}
    rows = [[f"`{form}`", per_call[form] or "auto (`lax.scan` chunks)", f"{statistics.median(t):.1f}", ", ".join(f"{x:.1f}" for x in t)]
            for form, t in epoch_times.items()]  # fmt: skip
    table += "\n\n" + markdown_table([f"whole epoch, one seed, {args.epoch_examples:,} images", "steps per call", "s (median)", "s per round"], rows)
    device = f"{run.meta['machine']['device']} ({run.meta['machine']['jax_backend']})"
    table += f"\n\nDevice: {device}; width {w}, batch {b}, {k} model(s) vmapped; medians of {args.rounds} rounds x {args.repeats} calls."
    run.finish({"device": device, "layer_times_s": layer_times, "fastest": best, "step_times_s": step_times, "epoch_times_s": epoch_times}, table)


def whole_epochs(recipe: Recipe, examples: int, rounds: int, rng: np.random.Generator) -> dict[str, list[float]]:
    """Seconds of the second of 2 epochs of `fit_recipe` (one seed, one after another) per form and round, forms in turns."""
    train = {"image": rng.random((examples, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, examples).astype(np.int32)}
    times = {form: [] for form in CONV_FORMS}
    for round_ in range(rounds):
        for form in CONV_FORMS if round_ % 2 == 0 else CONV_FORMS[::-1]:
            _, (history,) = fit_recipe(dataclasses.replace(recipe, epochs=2), [0], train, None, verbose=False, sequential=True, forms=(form,) * 4)
            times[form].append(history["epoch_time_s"][1])
    return times


if __name__ == "__main__":
    main()
