import jax
import jax.numpy as jnp
import pytest

from mnist_jax import CNN, ModelConfig, count_params, summary
from mnist_jax.model import Pool2x2


def init(model, batch=2):
    return model.init(jax.random.key(0), jnp.zeros((batch, 28, 28, 1)), train=False)["params"]


def test_seed_model_has_exactly_the_tutorials_parameters():
    params = init(CNN())
    assert count_params(params) == 3_156_098
    sizes = {name: count_params(p) for name, p in params.items()}
    assert sizes == {"conv1": 832, "conv2": 8_256, "dense1": 3_137_000, "dense2": 10_010}


def test_logits_shape_and_dropout_only_in_training():
    model = CNN()
    params = init(model)
    x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1))
    logits = model.apply({"params": params}, x, train=False)
    assert logits.shape == (5, 10) and logits.dtype == jnp.float32
    a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not jnp.allclose(a, b)  # dropout active
    assert jnp.array_equal(logits, model.apply({"params": params}, x, train=False))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"padding": "VALID"}, 1_620_098), ({"dense_features": 10}, 832 + 8_256 + 31_370 + 110), ({"conv1_kernel": 3}, 3_155_586)],
)
def test_architecture_fields_change_the_network(kwargs, expected):
    assert count_params(init(CNN(ModelConfig(**kwargs)))) == expected


def test_pool_matches_lax_reduce_window_and_floors_odd_sizes():
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
    pooled = Pool2x2("max").apply({}, x)
    assert pooled.shape == (2, 3, 4, 3)
    assert jnp.array_equal(pooled, nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))
    assert jnp.allclose(Pool2x2("avg").apply({}, x), nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID"))


def test_training_max_pool_sends_the_gradient_to_each_windows_first_maximum():
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (2, 6, 8, 3))  # no ties: JAX's own gradient
    loss = lambda pool: lambda x: (pool(x) * jnp.arange(1.0, 37.0).reshape(1, 3, 4, 3)).sum()  # noqa: E731
    reference = jax.grad(loss(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")))(x)
    assert jnp.array_equal(jax.grad(loss(lambda x: Pool2x2("max").apply({}, x)))(x), reference)
    # Ties, as a constant background makes: TensorFlow's rule, all of it to the first in row-major order.
    window = jnp.array([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: Pool2x2("max").apply({}, x).sum())(window)
    assert grad.reshape(2, 2).tolist() == [[0.0, 1.0], [0.0, 0.0]]
    flat = jnp.zeros((1, 2, 2, 1))
    assert jax.grad(lambda x: Pool2x2("max").apply({}, x).sum())(flat).reshape(-1).tolist() == [1.0, 0.0, 0.0, 0.0]
    # Outside training it is the plain reduction, differentiable in forward mode too.
    _, tangent = jax.jvp(lambda x: Pool2x2("max").apply({}, x, train=False), (window,), (jnp.ones_like(window),))
    assert tangent.reshape(-1).tolist() == [1.0]


def test_summary_lists_layers_in_order_with_keras_shapes():
    text = summary(CNN())
    lines = text.splitlines()
    names = [line.split()[0] for line in lines[2:10]]
    assert names == ["conv1", "pool1", "conv2", "pool2", "dropout", "flatten", "dense1", "dense2"]
    assert "(None, 28, 28, 32)" in text and "(None, 3136)" in text
    assert "Total params: 3,156,098" in text


@pytest.mark.parametrize("channels", [4, 1])  # one channel: XLA's convolution forward, the kernel gradient a matmul
@pytest.mark.parametrize(("kernel", "padding"), [(5, "SAME"), (2, "SAME"), (3, "VALID"), (2, "VALID")])
def test_matmul_conv_equals_flax_conv(kernel, padding, channels):
    import flax.linen as nn

    from mnist_jax.model import Conv

    x = jax.random.normal(jax.random.key(0), (3, 14, 13, channels))
    ours = Conv(6, kernel, padding=padding)
    params = ours.init(jax.random.key(1), x)
    flax_conv = nn.Conv(6, (kernel, kernel), padding=padding)  # same parameter tree
    reference = flax_conv.apply(params, x)
    assert jnp.allclose(ours.apply(params, x), reference, atol=1e-5)  # the matmul form, for training
    assert jnp.allclose(ours.apply(params, x, train=False), reference, atol=1e-5)  # XLA's convolution, for inference

    def gradients(conv):  # of the parameters and of the input
        return jax.grad(lambda p, x: (conv.apply(p, x) ** 2).sum(), argnums=(0, 1))(params, x)

    def assert_close(grads, ref):
        assert all(jnp.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)))

    ref_grads = gradients(flax_conv)
    assert_close(gradients(ours), ref_grads)
    xla = Conv(6, kernel, padding=padding, form="xla")  # trains with XLA's convolution: same result and gradients
    assert jnp.allclose(xla.apply(params, x), reference, atol=1e-5)
    assert_close(gradients(xla), ref_grads)
    with pytest.raises(ValueError, match="Conv form must be one of matmul, xla"):
        Conv(6, kernel, form="fft").init(jax.random.key(1), x)


def test_training_step_convolves_once_and_skips_the_images_gradient():
    # conv1 (one-channel images) trains with XLA's convolution forward and a matmul kernel gradient; the
    # gradient of its input, which training never asks for, must not be computed (no second convolution).
    import re

    from mnist_jax import Config, create_train_state, train_step

    state = create_train_state(jax.random.key(0), Config())
    batch = {"image": jnp.zeros((32, 28, 28, 1)), "label": jnp.zeros(32, jnp.int32)}
    hlo = train_step.lower(state, batch, jax.random.key(1)).compile().as_text()
    assert len(re.findall(r"= f32\[[\d,]+\]\{[\d,]*\} convolution\(", hlo)) == 1


@pytest.mark.parametrize("models", [1, 2])
def test_one_channel_conv_vmapped_over_models_has_each_models_gradients(models):
    # Under jax.vmap (mnist_jax.multi) several models' first layer is the patch matmul, not a grouped convolution.
    from mnist_jax.model import Conv

    x = jax.random.normal(jax.random.key(0), (models, 3, 14, 13, 1))
    conv = Conv(6, 5)
    params = jax.vmap(lambda key: conv.init(key, x[0]))(jax.random.split(jax.random.key(1), models))
    loss = lambda p, x: (conv.apply(p, x) ** 2).sum()  # noqa: E731
    vmapped = jax.vmap(jax.grad(loss, argnums=(0, 1)))(params, x)
    for k in range(models):
        alone = jax.grad(loss, argnums=(0, 1))(jax.tree.map(lambda a: a[k], params), x[k])
        assert all(jnp.allclose(a[k], b, rtol=1e-4, atol=1e-4) for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(alone)))
    if models > 1:  # the parameters' gradient, as training asks for it, holds no (grouped) convolution
        import re

        hlo = jax.jit(jax.vmap(jax.grad(loss))).lower(params, x).compile().as_text()
        assert re.findall(r"convolution\(", hlo) == []
        # Positive control: the plain vmapped XLA convolution (same parameters) is a grouped one, and the same
        # search finds it in the same kind of program.
        xla = Conv(6, 5, form="xla")
        plain = lambda p, x: (xla.apply(p, x) ** 2).sum()  # noqa: E731
        assert re.findall(r"convolution\(", jax.jit(jax.vmap(jax.grad(plain))).lower(params, x).compile().as_text())
