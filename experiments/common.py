"""Shared pieces of the experiment scripts: flags, data, result files, plots, and the improved recipe.

Every script: `python experiments/<name>.py [--quick] [--dataset D] [--seeds N|a,b,c] [--out DIR]`
plus one flag per size knob (`--epochs`, `--train-examples`, ...). The full size is the default;
`--quick` shrinks it to run on a 2-core CPU in minutes (its results say `"quick": true`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnist_jax import Config, ModelConfig, load_split
from mnist_jax.cli import add_config_flags
from mnist_jax.config import DATASETS
from mnist_jax.model import Conv, Flatten, Pool2x2
from mnist_jax.runtime import cpu_flags, cpu_model, enable_compilation_cache, reuse_freed_host_memory

REPO = Path(__file__).resolve().parent.parent
FASHION_MANUAL_DIR = Path("/usr/share/datasets/fashion-mnist")


# --- flags ------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """'3' -> [0, 1, 2]; '0,4,7' -> [0, 4, 7]; '5,' -> [5]."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def _parse_value(default: Any, text: str) -> Any:
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, (list, tuple)):
        kind = type(default[0]) if default else str
        return [kind(x) for x in text.split(",") if x.strip()]
    if default is None:
        return int(text)
    return type(default)(text)


def parse_args(doc: str, full: dict[str, Any], quick: dict[str, Any], *, dataset: str = "mnist", seeds: str = "3",
               quick_seeds: str = "1", argv: Sequence[str] | None = None) -> argparse.Namespace:  # fmt: skip
    """Flags of an experiment. `full`/`quick` map size knobs (e.g. epochs) to their two defaults; each knob gets a flag."""
    name = Path(sys.argv[0]).stem
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a 2-core CPU (results are labelled quick)")
    add_config_flags(parser, ("dataset", "data_dir", "manual_dir", "arrays"), defaults=True)  # --dataset, --data-dir, --manual-dir, --arrays
    parser.set_defaults(dataset=dataset)  # the experiment's data set, not Config's
    parser.add_argument("--seeds", default=None, help=f"N seeds (0..N-1) or a comma list (default {seeds}, quick {quick_seeds})")
    parser.add_argument("--out", default=None, help=f"output folder (default results/{name})")
    for key, value in full.items():
        parser.add_argument("--" + key.replace("_", "-"), default=None, metavar=type(value).__name__.upper(),
                            help=f"default {value}, quick {quick.get(key, value)}")  # fmt: skip
    args = parser.parse_args(argv)
    if args.dataset not in DATASETS:  # add_config_flags lists the choices; Config.validate would check them
        parser.error(f"argument --dataset: invalid choice: {args.dataset!r} (choose from {', '.join(DATASETS)})")
    for key, value in full.items():
        given = getattr(args, key)
        chosen = quick.get(key, value) if args.quick else value
        setattr(args, key, chosen if given is None else _parse_value(value, given))
    args.seeds = parse_seeds(args.seeds or (quick_seeds if args.quick else seeds))
    args.name = name
    args.out = Path(args.out or REPO / "results" / name)
    args.sizes = {key: getattr(args, key) for key in full}
    setup()
    return args


def setup() -> None:
    """Large freed host blocks kept for reuse (`reuse_freed_host_memory`: on CPU, K vmapped models need
    > 32 MB of scratch per step; set before JAX starts its threads, which keep their malloc arenas), and a
    persistent XLA compilation cache shared by the scripts (same shapes compile once)."""
    reuse_freed_host_memory()
    enable_compilation_cache(REPO / "results" / ".jax-cache")


# --- data -------------------------------------------------------------------


def load(args: argparse.Namespace, train_examples: int | None = None, test_examples: int | None = None, with_test: bool = True):
    """(train, test) arrays (test None without `with_test`); Fashion-MNIST reads the Debian package's files when no --manual-dir is given."""
    manual = args.manual_dir
    if manual is None and args.dataset == "fashion_mnist" and FASHION_MANUAL_DIR.is_dir():
        manual = str(FASHION_MANUAL_DIR)
    kw = dict(data_dir=args.data_dir, manual_dir=manual, arrays=args.arrays)
    train = load_split(args.dataset, "train", num_examples=train_examples, **kw)
    test = load_split(args.dataset, "test", num_examples=test_examples, **kw) if with_test else None
    return train, test


def seed_configs(config: Config, seeds: Sequence[int]) -> list[Config]:
    return [dataclasses.replace(config, seed=s) for s in seeds]


# --- numbers and files ------------------------------------------------------


def machine() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "cpu": cpu_model(), "avx512": has_avx512(cpu_flags()), "cores": os.cpu_count(), "jax_backend": jax.default_backend(), "device": device.device_kind,
        "jax": jax.__version__, "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
    }  # fmt: skip


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """'99.21 ± 0.05' (percent by default); a single value has no ± part."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Run:
    """Collects an experiment's results and writes results.json, table.md (and the plot the script adds)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.start = args, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "experiment": args.name, "quick": args.quick, "dataset": args.dataset, "seeds": args.seeds,
            "sizes": args.sizes, "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]), "machine": machine(),
        }  # fmt: skip
        print(f"[{args.name}] {'QUICK size' if args.quick else 'full size'}: {args.sizes}, seeds {args.seeds}, {args.dataset}", flush=True)

    def finish(self, results: dict[str, Any], table: str, figure=None) -> None:
        wall = time.perf_counter() - self.start
        label = f"**{'QUICK' if self.args.quick else 'full'} size** ({self.args.sizes}, seeds {self.args.seeds}, {self.args.dataset}); "
        cpu = self.meta["machine"]["cpu"] + {True: " (AVX-512)", False: " (no AVX-512)", None: ""}[self.meta["machine"]["avx512"]]
        label += f"{cpu}, {self.meta['machine']['cores']} cores, {self.meta['machine']['jax_backend']}; {wall:.0f} s"
        text = f"{table}\n\n{label}\n"
        (self.out / "results.json").write_text(json.dumps({**self.meta, "wall_time_s": wall, **results}, indent=2, default=_json) + "\n")
        (self.out / "table.md").write_text(text)
        if figure is not None:
            figure.savefig(self.out / "plot.png", dpi=100)
        print(text + f"-> {self.out}", flush=True)


def _json(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


# --- models that model.py does not have --------------------------------------


class PoolVariantCNN(nn.Module):
    """The seed CNN with its two pooling layers replaced: 'strided' (a learned 2x2 conv with stride 2,
    same channels) or 'none' (no downsampling: Dense 1000 sees 28x28x64). 'max'/'avg' are the library's CNN."""

    pool: str = "strided"
    config: ModelConfig = ModelConfig()

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        x = nn.relu(Conv(c.conv1_features, c.conv1_kernel, padding=c.padding, name="conv1")(images))
        x = self._down(x, "down1")
        x = nn.relu(Conv(c.conv2_features, c.conv2_kernel, padding=c.padding, name="conv2")(x))
        x = self._down(x, "down2")
        x = nn.Dropout(c.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(c.dense_features, kernel_init=nn.initializers.glorot_uniform())(Flatten()(x)))
        return nn.Dense(c.num_classes, kernel_init=nn.initializers.glorot_uniform())(x)

    def _down(self, x: jax.Array, name: str) -> jax.Array:
        if self.pool in ("max", "avg"):
            return Pool2x2(self.pool, name=name)(x)
        if self.pool == "none":
            return x
        # 2x2 stride-2 conv as a matmul over non-overlapping 2x2 patches (= nn.Conv(C, 2, strides=2, 'VALID')).
        b, h, w, ch = x.shape
        x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, ch).transpose(0, 1, 3, 2, 4, 5)
        return nn.Dense(ch, kernel_init=nn.initializers.glorot_uniform(), name=name)(x.reshape(b, h // 2, w // 2, 4 * ch))


class DeepCNN(nn.Module):
    """The improved recipe's network: [Conv3x3·w → Conv3x3·w → MaxPool] x2 (w, 2w) → Dropout → Dense → Dropout → Dense 10.

    `forms` is how each of the four convolutions trains (`mnist_jax.model.Conv.form`), in call order;
    `recipe_forms` gives the measured choice per device. Every form computes the same function.
    """

    width: int = 32
    dense_features: int = 256
    dropout_rate: float = 0.4
    forms: tuple[str, ...] = ("matmul",) * 4

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        init = nn.initializers.he_uniform()
        forms = iter(self.forms)
        x = images
        for block, features in enumerate((self.width, 2 * self.width)):
            for i in range(2):
                x = nn.relu(Conv(features, 3, kernel_init=init, form=next(forms), name=f"conv{block + 1}_{i + 1}")(x, train))
            x = Pool2x2("max", name=f"pool{block + 1}")(x, train)
        x = nn.Dropout(self.dropout_rate / 2, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.dense_features, kernel_init=init)(Flatten()(x)))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(10)(x)


# --- the improved recipe: augmentation, schedule, AdamW, label smoothing ------


def augment(key: jax.Array, images: jax.Array, max_shift: float = 2.0, max_degrees: float = 10.0, max_scale: float = 0.1) -> jax.Array:
    """Random affine warp per image (shift in pixels, rotation, zoom), bilinear, zeros outside: on the device, jittable."""
    n = images.shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    shift = jax.random.uniform(k1, (n, 2), minval=-max_shift, maxval=max_shift)
    degrees = jax.random.uniform(k2, (n,), minval=-max_degrees, maxval=max_degrees)
    scale = 1.0 + jax.random.uniform(k3, (n,), minval=-max_scale, maxval=max_scale)
    return warp(images, shift, degrees, scale)


def warp(images: jax.Array, shift: jax.Array, degrees: jax.Array, scale: jax.Array) -> jax.Array:
    """Each image float32[N, H, W, 1] shifted by shift[n] = (down, right) pixels, rotated by degrees[n] and zoomed by
    scale[n] about its centre; bilinear, zeros outside. Shift 0, 0 degrees, scale 1 is the identity."""
    _, h, w, _ = images.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2

    def one(image, shift, angle, scale):  # output pixel -> source pixel (inverse map)
        cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
        dy, dx = ys - cy - shift[0], xs - cx - shift[1]
        src_y, src_x = cos * dy - sin * dx + cy, sin * dy + cos * dx + cx
        return jax.scipy.ndimage.map_coordinates(image[..., 0], [src_y, src_x], order=1, mode="constant")[..., None]

    return jax.vmap(one)(images, shift, jnp.deg2rad(degrees), scale)


# Test-time views (down, right, degrees, scale) whose predictions `predict_views` averages; the recipe's choice is made on
# the validation split (experiments/README.md).
_IDENTITY, _SHIFTS, _ROTATIONS = (0, 0, 0, 1), ((1, 0, 0, 1), (-1, 0, 0, 1), (0, 1, 0, 1), (0, -1, 0, 1)), ((0, 0, 6, 1), (0, 0, -6, 1))
VIEWS = {
    "none": (_IDENTITY,),
    "shifts": (_IDENTITY, *_SHIFTS),
    "rotations": (_IDENTITY, *_ROTATIONS),
    "shifts+rotations": (_IDENTITY, *_SHIFTS, *_ROTATIONS),
}


def predict_views(states, images: np.ndarray, views: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
    """Each model's class probabilities averaged over the warped `views` of `images` (`VIEWS`): float32[K, N, classes]."""
    from mnist_jax.multi import predict_many

    n, total = len(images), 0.0
    for down, right, degrees, scale in views:
        view = images
        if (down, right, degrees, scale) != _IDENTITY:
            view = np.asarray(_warp_all(images, np.tile(np.float32([down, right]), (n, 1)), np.full(n, degrees, np.float32),
                                        np.full(n, scale, np.float32)))  # fmt: skip
        total = total + predict_many(states, view)
    return total / len(views)


_warp_all = jax.jit(warp)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The improved recipe: common MNIST practice; its size (width, Dense, epochs) chosen on a held-out split, never the test set (experiments/README.md)."""

    epochs: int = 60
    batch_size: int = 128
    peak_learning_rate: float = 2e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05  # AdamW, decoupled (multiplied by the learning rate)
    label_smoothing: float = 0.1
    width: int = 16
    dense_features: int = 128
    dropout_rate: float = 0.4
    max_shift: float = 2.0
    max_degrees: float = 10.0
    max_scale: float = 0.1
    views: str = "none"  # test-time views averaged (`VIEWS`)

    def config(self, seed: int = 0, dataset: str = "mnist") -> Config:
        return Config(dataset=dataset, epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.peak_learning_rate, seed=seed)

    def model(self, forms: tuple[str, ...] = ("matmul",) * 4) -> DeepCNN:
        return DeepCNN(self.width, self.dense_features, self.dropout_rate, forms=forms)

    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        """AdamW: linear warmup (1 epoch, at most 10 % of the run), then cosine decay to 0; the peak rate is injected (can differ per model)."""
        total = self.epochs * steps_per_epoch
        warmup = max(1, min(int(self.warmup_epochs * steps_per_epoch), total // 10))  # short runs: at most 10 % warmup
        shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total, warmup + 1))

        def make(learning_rate):
            return optax.chain(
                optax.scale_by_adam(eps=1e-7),
                optax.add_decayed_weights(self.weight_decay),
                optax.scale_by_schedule(shape),
                optax.scale(-learning_rate),
            )

        return optax.inject_hyperparams(make)(learning_rate=self.peak_learning_rate)

    def step_fn(self):
        """A train step like `mnist_jax.steps.train_step`, plus augmentation and label smoothing."""
        return recipe_step_fn(self.label_smoothing, self.max_shift, self.max_degrees, self.max_scale)


def recipe_step_fn(label_smoothing: float, max_shift: float = 0.0, max_degrees: float = 0.0, max_scale: float = 0.0):
    """Train step with label smoothing and (when any is non-zero) random affine augmentation."""

    def step(state, batch, rng):
        aug_key, dropout_key = jax.random.split(rng)
        images = batch["image"]
        if max_shift or max_degrees or max_scale:
            images = augment(aug_key, images, max_shift, max_degrees, max_scale)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], 10), label_smoothing)

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images, train=True, rngs={"dropout": dropout_key})
            return optax.softmax_cross_entropy(logits, targets).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": accuracy}

    return step


def recipe_forms(backend: str, flags: frozenset[str], sequential: bool) -> tuple[str, ...]:
    """How DeepCNN's four convolutions train (`mnist_jax.model.Conv.form`) for a backend, the CPU's flags and
    whether seeds train one after another: XLA's convolution on a CPU with AVX-512 when one after another, the
    matmul form otherwise (the faster on each CPU measured: docs/performance.md)."""
    return ("xla",) * 4 if sequential and backend == "cpu" and has_avx512(flags) else ("matmul",) * 4


def has_avx512(flags: frozenset[str]) -> bool | None:
    """Whether CPU `flags` (`mnist_jax.runtime.cpu_flags`) include AVX-512 Foundation; None when the flags are unknown (empty)."""
    return "avx512f" in flags if flags else None


def device_forms(sequential: bool) -> tuple[str, ...]:
    """`recipe_forms` for this process's default backend and CPU."""
    return recipe_forms(jax.default_backend(), cpu_flags(), sequential)


def recipe_steps_per_call(forms: Sequence[str], backend: str) -> int:
    """`Config.steps_per_call` for `forms` on `backend`: 1 when XLA's convolution trains on CPU (inside `lax.scan`
    it is many times slower there: docs/performance.md), else 0 (auto: `lax.scan` chunks)."""
    return 1 if "xla" in forms and backend == "cpu" else 0


def seeds_one_after_another() -> bool:
    """On CPU seeds train one after another (vmapping gains nothing there); on accelerators, vmapped."""
    return jax.default_backend() == "cpu"


def fit_recipe(recipe: Recipe, seeds: Sequence[int], train: dict[str, np.ndarray], test: dict[str, np.ndarray] | None, dataset: str = "mnist",
               verbose: bool = True, sequential: bool | None = None, tb_dir: Path | None = None, forms: Sequence[str] | None = None,
               ) -> tuple[Any, list[dict[str, Any]]]:  # fmt: skip
    """Train the improved recipe for each seed: (stacked states, histories). `sequential` None: `seeds_one_after_another()`;
    `tb_dir`: each model's per-epoch scalars as TensorBoard event files while it trains (`fit_many`); `forms` (the four
    convolutions' `Conv.form`) None: `device_forms`, steps per call from `recipe_steps_per_call`."""
    from mnist_jax.multi import fit_many

    sequential = seeds_one_after_another() if sequential is None else sequential
    forms = tuple(device_forms(sequential) if forms is None else forms)
    steps = len(train["label"]) // recipe.batch_size
    per_call = recipe_steps_per_call(forms, jax.default_backend())
    configs = [dataclasses.replace(recipe.config(s, dataset), steps_per_call=per_call) for s in seeds]
    return fit_many(configs, train, test, model=recipe.model(forms), optimizer=recipe.optimizer(steps), step_fn=recipe.step_fn(),
                    sequential=sequential, verbose=verbose, tb_dir=tb_dir)  # fmt: skip


def ensemble_summary(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Each model's accuracy and wrong count, and those of the mean-probability ensemble; `probs` is
    `mnist_jax.multi.predict_many`'s float32[K, N, classes], `labels` int[N]."""
    wrong = (probs.argmax(-1) != labels[None]).sum(-1)
    ensemble_wrong = int((probs.mean(0).argmax(-1) != labels).sum())
    n = len(labels)
    return {
        "accuracy": [1 - w / n for w in wrong.tolist()], "wrong": wrong.tolist(),
        "ensemble_accuracy": 1 - ensemble_wrong / n, "ensemble_wrong": ensemble_wrong, "test_examples": n,
    }  # fmt: skip


def recipe_times(histories: Sequence[dict[str, Any]], sequential: bool) -> dict[str, float]:
    """Mean seconds per epoch per model, and the whole training time, of `fit_recipe`'s histories:
    one after another, each model's own times (summed); vmapped, the group's times shared by all."""
    epoch_times = [t for h in histories for t in h["epoch_time_s"]]
    per_model = sum(epoch_times) / len(epoch_times) / (1 if sequential else len(histories))
    fit_time = sum(h["fit_time_s"] for h in histories) if sequential else histories[0]["fit_time_s"]
    return {"epoch_time_s_per_model": per_model, "fit_time_s": fit_time}


# --- one group of vmapped models, evaluated on the test split ----------------


def run_group(label: str, configs: Sequence[Config], train, test, *, per_epoch_test: bool = False, **fit_kw) -> dict[str, Any]:
    """`fit_many` on `configs`, then each model (and their ensemble) on `test`; numbers for a table row."""
    from mnist_jax import count_params
    from mnist_jax.multi import fit_many, predict_many, unstack

    print(f"-- {label}: {len(configs)} model(s) vmapped", flush=True)
    states, histories = fit_many(configs, train, test if per_epoch_test else None, verbose=True, **fit_kw)
    k, times = len(configs), histories[0]["epoch_time_s"]
    return {
        "label": label, **ensemble_summary(predict_many(states, test["image"]), test["label"]), "params": count_params(unstack(states.params, 0)),
        "models": k, "epoch_time_s_per_model": statistics.mean(times) / k, "group_epoch_time_s": times,
        "compile_time_s": histories[0]["compile_time_s"], "fit_time_s": histories[0]["fit_time_s"],
        "final_train_loss": [h["loss"][-1] for h in histories], "nonfinite_step": [h["nonfinite_step"] for h in histories],
        "histories": histories,
    }  # fmt: skip


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of every top-level layer, in call order; computed with eval_shape only."""
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)

    def trace(x):
        v = model.init(jax.random.key(0), x, train=False)
        return model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])[1]["intermediates"]

    inter = jax.eval_shape(trace, x)
    return {name: tuple(value["__call__"][0].shape[1:]) for name, value in inter.items() if name != "__call__"}
