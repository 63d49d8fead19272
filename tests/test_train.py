import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mnist_jax import Config, create_train_state, eval_step, train_step
from mnist_jax.data import epoch_permutation


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.random((n, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, n).astype(np.int32)}


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_same_seed_gives_identical_state_and_other_seed_differs():
    a = create_train_state(jax.random.key(0), Config())
    b = create_train_state(jax.random.key(0), Config())
    c = create_train_state(jax.random.key(1), Config())
    assert _leaves_equal(a.params, b.params)
    assert not _leaves_equal(a.params, c.params)


def test_train_step_is_pure_and_deterministic():
    state = create_train_state(jax.random.key(0), Config())
    batch = _batch()
    before = jax.tree.map(np.array, (state.params, state.opt_state, batch))
    s1, m1 = train_step(state, batch, jax.random.key(7))
    s2, m2 = train_step(state, batch, jax.random.key(7))
    assert _leaves_equal(s1.params, s2.params) and _leaves_equal(m1, m2)  # same inputs, same outputs
    assert _leaves_equal(before, (state.params, state.opt_state, batch))  # inputs untouched
    assert int(s1.step) == 1 and int(state.step) == 0
    assert not _leaves_equal(s1.params, state.params)
    s3, _ = train_step(state, batch, jax.random.key(8))
    assert not _leaves_equal(s1.params, s3.params)  # the dropout key matters


def test_eval_step_masks_padding():
    state = create_train_state(jax.random.key(0), Config())
    batch = _batch(8)
    full = eval_step(state, {k: v[:5] for k, v in batch.items()})
    masked = eval_step(state, {**batch, "mask": np.arange(8) < 5})
    assert float(masked["count"]) == 5
    np.testing.assert_allclose(masked["loss"], full["loss"], rtol=1e-5)
    np.testing.assert_allclose(masked["accuracy"], full["accuracy"])


def test_loss_decreases_on_a_real_batch(mnist_small):
    train, _ = mnist_small
    batch = {k: v[:64] for k, v in train.items()}
    state = create_train_state(jax.random.key(0), Config())
    first = float(eval_step(state, batch)["loss"])
    for i in range(20):
        state, _ = train_step(state, batch, jax.random.key(i))
    last = eval_step(state, batch)
    assert float(last["loss"]) < 0.5 * first
    assert float(last["accuracy"]) > 0.9


def test_epoch_permutation_covers_each_example_at_most_once():
    order = np.asarray(epoch_permutation(jax.random.key(0), 3, 100, 32))
    assert order.shape == (3, 32)
    assert len(np.unique(order)) == 96 and order.max() < 100
    again = np.asarray(epoch_permutation(jax.random.key(0), 3, 100, 32))
    other = np.asarray(epoch_permutation(jax.random.key(0), 4, 100, 32))
    assert np.array_equal(order, again) and not np.array_equal(order, other)


def test_predict_returns_probabilities():
    from mnist_jax import predict

    state = create_train_state(jax.random.key(0), Config())
    probs = predict(state, _batch(4)["image"])
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    state = create_train_state(jax.random.key(0), Config(compute_dtype="bfloat16"))
    new, metrics = train_step(state, _batch(), jax.random.key(1))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new.params))
    assert np.isfinite(float(metrics["loss"]))
    f32 = create_train_state(jax.random.key(0), Config())
    # Same parameters, logits within bf16 rounding of the float32 model's.
    a = f32.apply_fn({"params": f32.params}, _batch()["image"], train=False)
    b = state.apply_fn({"params": state.params}, _batch()["image"], train=False)
    np.testing.assert_allclose(a, b, atol=0.1)
    assert not np.array_equal(a, b)  # rounded to bfloat16 on the way
    # The step really computes in bfloat16: every convolution and matmul of the lowered program takes bf16
    # operands, and none of the float32 program's (the same search finds all of its 11).
    def products(state):
        text = train_step.lower(state, _batch(), jax.random.key(1)).as_text()
        return [line for line in text.splitlines() if re.search(r"stablehlo\.(convolution|dot_general)\b", line)]

    in_bf16, in_f32 = products(state), products(f32)
    assert len(in_bf16) == len(in_f32) > 0
    assert all("xbf16>" in line for line in in_bf16), [line for line in in_bf16 if "xbf16>" not in line]
    assert not any("bf16" in line for line in in_f32)


def state_copies(compiled) -> list[str]:
    """Shapes of the float32 buffers a compiled step copies straight from its (donated) state: an argument
    of the program (one step per call) or the state carried by the scan's loop (a chunk of steps)."""
    return re.findall(r"= (f32\[[\d,]+\])\{[\d,]*\} copy\(%(?:state|get-tuple-element)", compiled.as_text())


@pytest.mark.parametrize("path", ["one step per call", "a chunk of steps"])
def test_fit_steps_update_the_donated_params_in_place_without_copying_them(path, monkeypatch):
    # XLA:CPU's default copy insertion copied each donated kernel before its in-place update
    # (the 12.5 MB Dense kernel: one extra pass per step); region analysis removes the copies.
    from mnist_jax import loop
    from mnist_jax.parallel import data_parallel
    from mnist_jax.steps import zero_sums

    dp = data_parallel(1)
    state = dp.put_replicated(create_train_state(jax.random.key(0), Config()))
    images, labels = jnp.zeros((64, 28, 28, 1)), jnp.zeros(64, jnp.int32)
    one_step = loop.one_model_step(train_step, dp)

    def compiled():  # as fit's feeds compile them (loop.DeviceSteps, loop.DeviceChunks)
        if path == "one step per call":
            return loop.jit_step(one_step, dp).lower(state, zero_sums(), images, labels, jnp.arange(32), jax.random.key(1)).compile()
        order = jnp.zeros((2, 32), jnp.int32)
        return loop.jit_chunk(one_step, dp, 2).lower(state, zero_sums(), images, labels, order, jnp.int32(0), jax.random.key(1)).compile()

    assert state_copies(compiled()) == []
    # Positive control: compiled without the donation options, the program copies the donated kernels, and the
    # search above finds them (were the text's format to change, this fails rather than the check passing vacuously).
    monkeypatch.setattr(loop, "donation_compiler_options", lambda platform: None)
    assert "f32[3136,1000]" in state_copies(compiled())


def test_an_unrolled_chunk_of_steps_trains_the_same_model():
    # `unroll` only changes how many steps one iteration of the scan's loop holds.
    from mnist_jax import loop
    from mnist_jax.parallel import data_parallel
    from mnist_jax.steps import StepKeys, zero_sums

    train = _batch(320)
    dp, keys = data_parallel(1), StepKeys.from_seed(0)
    images, labels = dp.put_replicated(train["image"][:320]), dp.put_replicated(train["label"][:320])
    results = []
    for unroll in (1, 3):  # 3 does not divide the 10 steps: the scan's remainder runs too
        state = dp.put_replicated(create_train_state(keys.init, Config()))
        zero = dp.put_replicated(np.int32(0))
        order = loop.epoch_order(dp, keys.data, 320, 32)(0)
        chunk = loop.jit_chunk(loop.one_model_step(train_step, dp), dp, 10, unroll)
        state, sums = chunk(state, zero_sums(), images, labels, order, zero, keys.dropout)
        results.append((state, sums))
    (plain, plain_sums), (unrolled, unrolled_sums) = results
    assert int(plain.step) == int(unrolled.step) == 10
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(unrolled.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(plain_sums["loss"], unrolled_sums["loss"], rtol=1e-5)
    assert not _leaves_equal(plain.params, create_train_state(keys.init, Config()).params)  # it trained


def test_reuse_freed_host_memory_stops_page_faults_on_large_blocks():
    # A 100 MB block malloc'ed, written and freed 10 times: by default glibc maps it afresh each time (~24,000 page
    # faults each); with reuse_freed_host_memory the freed block is reused. Each in its own process (it is process-wide).
    code = (
        "import ctypes, resource, sys\n"
        "from mnist_jax.runtime import reuse_freed_host_memory\n"
        "applied = reuse_freed_host_memory() if sys.argv[1] == 'reuse' else False\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    block = libc.malloc(100_000_000); ctypes.memset(block, 1, 100_000_000); libc.free(block)\n"
        "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {}
    for mode in ("default", "reuse"):
        result = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        applied, faults[mode] = result.stdout.split()
        assert applied == str(mode == "reuse")
    assert int(faults["default"]) > 200_000 and int(faults["reuse"]) < 60_000, faults
