"""The tutorial's CNN as a Flax Linen module, and a Keras-style summary table."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnist_jax.config import ModelConfig

IMAGE_SHAPE = (28, 28, 1)


def _windows(x: jax.Array) -> jax.Array:
    """[N, H, W, C] (H, W even) as [N, H/2, 2, W/2, 2, C]: each 2x2 window on axes 2 and 4."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels)


def _max_of_windows(x: jax.Array) -> jax.Array:
    return _windows(x).max(axis=(2, 4))


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, of [N, H, W, C] with H and W even.

    Its gradient goes whole to each window's first maximum in row-major order, as TensorFlow's
    MaxPoolGrad (the seed's) does, rather than JAX's even split among tied maxima, which costs a
    count of them per window (docs/performance.md). Ties come from ReLU zeros (no gradient either
    way) and a constant background, where the parameters' gradients are the same under both rules.
    Reverse mode only (a `custom_vjp`); `Pool2x2(train=False)` is a plain max.
    """
    return _max_of_windows(x)


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    pooled = max_pool_2x2(x)
    return pooled, (x, pooled)


def _max_pool_backward(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    x, pooled = residuals
    is_max = _windows(x) == pooled[:, :, None, :, None, :]
    taken = is_max[:, :, 0, :, 0]
    first = [taken]
    for i, j in ((0, 1), (1, 0), (1, 1)):
        first.append(is_max[:, :, i, :, j] & ~taken)
        taken = taken | first[-1]
    d = [jnp.where(m, g, 0) for m in first]  # window order (0,0), (0,1), (1,0), (1,1)
    dx = jnp.stack([jnp.stack(d[:2], axis=3), jnp.stack(d[2:], axis=3)], axis=2)
    return (dx.reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


class Pool2x2(nn.Module):
    """2x2 pooling with stride 2, floor-cropping odd sizes like Keras' 'valid' pooling.

    Written as reshape + max/mean rather than `nn.max_pool`, whose reduce_window backward pass is
    slow on XLA:CPU (docs/performance.md). Max pooling trains with `max_pool_2x2`'s gradient
    (TensorFlow's tie rule); with `train=False` it is the plain reduction, differentiable in any mode.
    """

    kind: str = "max"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        height, width = x.shape[1], x.shape[2]
        x = x[:, : height // 2 * 2, : width // 2 * 2, :]
        if self.kind == "max":
            return max_pool_2x2(x) if train else _max_of_windows(x)
        return _windows(x).mean(axis=(2, 4))


CONV_FORMS = ("matmul", "xla")


def _xla_conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted_views(x: jax.Array, k: int, padding: str) -> list[jax.Array]:
    """The k*k views [N, H', W', C] of `x` that a k x k stride-1 convolution weighs, in the kernel's (row, column)
    order. 'SAME' pads as TensorFlow does: the extra row/column goes after."""
    if padding == "SAME":
        before, after = (k - 1) // 2, (k - 1) - (k - 1) // 2
        x = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
    height, width = x.shape[1] - k + 1, x.shape[2] - k + 1
    return [x[:, i : i + height, j : j + width, :] for i in range(k) for j in range(k)]


def _patch_matmul_conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """The convolution as one 2-D matmul (pixels x patch) over the input's shifted views."""
    k, channels, features = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    patches = jnp.concatenate(_shifted_views(x, k, padding), axis=-1)
    # 2-D, so that its kernel gradient contracts dimension 0 of the patches and of the output gradient as laid
    # out; on the 4-D form XLA:CPU first transposed each output gradient (docs/performance.md).
    y = patches.reshape(-1, k * k * channels) @ kernel.reshape(k * k * channels, features)
    return y.reshape(*patches.shape[:3], features)


@functools.lru_cache(maxsize=None)
def _unbatched_xla_conv(padding: str) -> Any:
    """XLA's convolution, except under `jax.vmap` of several (models stacked by `mnist_jax.multi`), where it is the
    patch matmul: a vmapped convolution becomes a grouped one, slower on XLA:CPU (docs/performance.md)."""

    @jax.custom_batching.custom_vmap
    def conv(x, kernel):
        return _xla_conv(x, kernel, padding)

    @conv.def_vmap
    def _(axis_size, in_batched, x, kernel):
        if axis_size == 1:  # one model: a plain convolution
            x, kernel = (a[0] if batched else a for a, batched in zip((x, kernel), in_batched))
            return _xla_conv(x, kernel, padding)[None], True
        axes = tuple(0 if batched else None for batched in in_batched)
        return jax.vmap(functools.partial(_patch_matmul_conv, padding=padding), in_axes=axes)(x, kernel), True

    return conv


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def single_channel_conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """XLA's convolution of a one-channel input [N, H, W, 1], whose kernel gradient is one matmul over the
    input's shifted views stacked on a leading axis ([k*k, pixels] @ [pixels, features]).

    For the first layer of a CNN (images in, no input gradient needed) this trains faster on XLA:CPU than
    the patch matmul both ways: with one channel, concatenating the views on the minor axis is slow
    (docs/performance.md). The input gradient, XLA's, is dead code unless something asks for it.
    """
    return _unbatched_xla_conv(padding)(x, kernel)


def _single_channel_conv_forward(x: jax.Array, kernel: jax.Array, padding: str) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _unbatched_xla_conv(padding)(x, kernel), (x, kernel)


def _single_channel_conv_backward(padding: str, residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    k, features = kernel.shape[0], kernel.shape[-1]
    views = jnp.stack(_shifted_views(x, k, padding)).reshape(k * k, -1)
    dkernel = (views @ g.reshape(-1, features)).reshape(kernel.shape)
    dx = jax.vjp(lambda x: _xla_conv(x, kernel, padding), x)[1](g)[0]
    return dx, dkernel


single_channel_conv.defvjp(_single_channel_conv_forward, _single_channel_conv_backward)


class Conv(nn.Module):
    """A stride-1 2-D convolution with `nn.Conv`'s parameters (kernel [k, k, in, out], bias [out]).

    For training (`form="matmul"`, the default) it is one matmul over shifted views of the input,
    whose gradients (plain matmuls) are faster on XLA:CPU than those of `conv_general_dilated`
    (docs/performance.md). A one-channel input (the first layer) runs XLA's convolution forward
    and only its kernel gradient as a matmul (`single_channel_conv`). Without gradients
    (`train=False`: evaluation, prediction), or with `form="xla"`, it is XLA's own convolution,
    the faster one forward-only. All give the same result up to float summation order.
    """

    features: int
    kernel_size: int
    padding: str = "SAME"
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.glorot_uniform()
    form: str = "matmul"  # how it trains: one of CONV_FORMS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if self.form not in CONV_FORMS:
            raise ValueError(f"Conv form must be one of {', '.join(CONV_FORMS)}, got {self.form!r}")
        k, channels = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, channels, self.features)).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        x = x.astype(self.dtype)
        if not train or self.form == "xla":
            return _xla_conv(x, kernel, self.padding) + bias
        if channels == 1:
            return single_channel_conv(x, kernel, self.padding) + bias
        return _patch_matmul_conv(x, kernel, self.padding) + bias


class Flatten(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)


class CNN(nn.Module):
    """Conv5x5·32 → pool → Conv2x2·64 → pool → Dropout → Dense 1000 → Dense 10 (logits).

    `config` (a `ModelConfig`) is the architecture; its defaults are the seed's 3,156,098-parameter
    network. `dtype` is the compute dtype; parameters stay float32.
    """

    config: ModelConfig = ModelConfig()  # the architecture
    dtype: Any = jnp.float32
    # Keras' defaults, so the seed trains as the tutorial's program does.
    kernel_init: Any = nn.initializers.glorot_uniform()
    conv_form: str = "matmul"  # how the convolutions train (`Conv.form`); measured per device by experiments/conv_forms.py

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: Any = jnp.float32) -> "CNN":
        return cls(config, dtype=dtype)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        conv = lambda features, kernel, name: Conv(  # noqa: E731
            features, kernel, padding=c.padding, dtype=self.dtype, kernel_init=self.kernel_init, form=self.conv_form, name=name
        )
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, kernel_init=self.kernel_init, name=name
        )
        x = images.astype(self.dtype)
        x = nn.relu(conv(c.conv1_features, c.conv1_kernel, "conv1")(x, train))
        x = Pool2x2(c.pool, name="pool1")(x, train)
        x = nn.relu(conv(c.conv2_features, c.conv2_kernel, "conv2")(x, train))
        x = Pool2x2(c.pool, name="pool2")(x, train)
        x = nn.Dropout(c.dropout_rate, deterministic=not train, name="dropout")(x)
        x = Flatten(name="flatten")(x)
        x = nn.relu(dense(c.dense_features, "dense1")(x))
        x = dense(c.num_classes, "dense2")(x)
        return x.astype(jnp.float32)


def count_params(params: Any) -> int:
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))


def summary(model: CNN) -> str:
    """A Keras-style table: layer (type), output shape, params, and the total.

    Shapes come from `jax.eval_shape`, so nothing is computed or allocated.
    """
    dummy = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)

    def trace(x):
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
        return variables["params"], state["intermediates"]

    params, intermediates = jax.eval_shape(trace, dummy)
    rows = []
    for name in _LAYER_TYPES:  # call order; `intermediates` comes back sorted by name
        if name not in intermediates:
            continue
        shape = intermediates[name]["__call__"][0].shape
        layer_params = count_params(params.get(name, {}))
        rows.append((name, _LAYER_TYPES.get(name, "Module"), "(None, " + ", ".join(map(str, shape[1:])) + ")", layer_params))
    total = count_params(params)
    header = ("Layer (type)", "Output Shape", "Param #")
    lines = [f"{header[0]:<28}{header[1]:<22}{header[2]:>12}", "=" * 62]
    for name, kind, shape, n in rows:
        lines.append(f"{name + ' (' + kind + ')':<28}{shape:<22}{n:>12,}")
    lines += ["=" * 62, f"Total params: {total:,}", f"Trainable params: {total:,}", "Non-trainable params: 0"]
    return "\n".join(lines)


_LAYER_TYPES = {
    "conv1": "Conv",
    "pool1": "Pool2x2",
    "conv2": "Conv",
    "pool2": "Pool2x2",
    "dropout": "Dropout",
    "flatten": "Flatten",
    "dense1": "Dense",
    "dense2": "Dense",
}
