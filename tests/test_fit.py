"""`fit` end to end on real MNIST: it learns, it is reproducible bit for bit, and resuming changes nothing."""

import dataclasses
import shutil

import jax
import numpy as np

from mnist_jax import Config, fit, restore_checkpoint


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_learns_well_above_chance_on_a_few_thousand_images(tmp_path, mnist_dirs):
    config = Config(epochs=1, train_examples=4000, workdir=str(tmp_path), **mnist_dirs)
    state, history = fit(config, verbose=False)
    assert history["val_accuracy"][-1] > 0.9  # chance is 0.1
    assert history["loss"][0] < 1.0
    assert int(state.step) == 4000 // 32


def test_same_seed_same_parameters_and_resume_is_the_same_run(tmp_path, mnist_dirs):
    base = Config(epochs=2, train_examples=320, **mnist_dirs)
    a, history_a = fit(dataclasses.replace(base, workdir=str(tmp_path / "a")), verbose=False)
    b, _ = fit(dataclasses.replace(base, workdir=str(tmp_path / "b")), verbose=False)
    assert _leaves_equal(a.params, b.params) and _leaves_equal(a.opt_state, b.opt_state)

    other_seed, _ = fit(dataclasses.replace(base, seed=1, workdir=str(tmp_path / "s1")), verbose=False)
    assert not _leaves_equal(a.params, other_seed.params)

    # Stop after one epoch, then resume to two: identical to the uninterrupted run.
    fit(dataclasses.replace(base, epochs=1, workdir=str(tmp_path / "c")), verbose=False)
    c, history_c = fit(dataclasses.replace(base, workdir=str(tmp_path / "c")), resume=True, verbose=False)
    assert _leaves_equal(a.params, c.params)
    assert history_c["val_accuracy"] == history_a["val_accuracy"]
    assert _leaves_equal(restore_checkpoint(tmp_path / "c").params, c.params)


def test_tfdata_pipeline_trains_the_same_model(tmp_path, mnist_dirs):
    base = Config(epochs=1, train_examples=320, **mnist_dirs)
    device, _ = fit(dataclasses.replace(base, workdir=str(tmp_path / "d")), verbose=False)
    host, _ = fit(dataclasses.replace(base, pipeline="tfdata", workdir=str(tmp_path / "h")), verbose=False)
    assert _leaves_equal(device.params, host.params)


def test_scanned_steps_per_call_train_the_same_model_and_resume_mid_chunk(tmp_path, mnist_dirs):
    # 320 images / 32 = 10 steps an epoch; 4 per call gives chunks 4, 4, 2 (the tail compiles apart).
    base = Config(epochs=2, train_examples=320, **mnist_dirs)
    stepwise, history = fit(dataclasses.replace(base, steps_per_call=1, workdir=str(tmp_path / "one")), verbose=False)
    scanned, scanned_history = fit(dataclasses.replace(base, steps_per_call=4, workdir=str(tmp_path / "scan")), verbose=False)
    assert int(scanned.step) == int(stepwise.step) == 20
    for x, y in zip(jax.tree.leaves(stepwise.params), jax.tree.leaves(scanned.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)  # same order, same dropout keys; fusion may differ
    np.testing.assert_allclose(scanned_history["val_accuracy"], history["val_accuracy"], atol=2e-3)
    assert scanned_history["compile_time_s"] > 0

    # A checkpoint every 3 steps lands at the first chunk end after each multiple (steps 4 and 8): resume from 8.
    every = dataclasses.replace(base, epochs=1, steps_per_call=4, checkpoint_every_steps=3, workdir=str(tmp_path / "r"))
    fit(every, verbose=False)
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "10")  # so the newest is step 8, mid-epoch, before a 2-step chunk
    resumed, _ = fit(dataclasses.replace(every, epochs=2), resume=True, verbose=False)
    assert _leaves_equal(resumed.params, scanned.params)


def test_tfdata_pipeline_runs_one_step_per_call_whatever_steps_per_call_says(mnist_dirs):
    from mnist_jax.train import resolve_steps_per_call

    config = Config(pipeline="tfdata", steps_per_call=4, **mnist_dirs)
    assert resolve_steps_per_call(config, 10) == 1
    assert resolve_steps_per_call(dataclasses.replace(config, pipeline="device"), 10) == 4


def test_auto_steps_per_call_on_cpu_is_chunks_of_100_or_one_with_step_checkpoints():
    from mnist_jax.train import CPU_STEPS_PER_CALL, resolve_steps_per_call

    assert jax.default_backend() == "cpu"
    auto = Config(steps_per_call=0)
    assert CPU_STEPS_PER_CALL == 100
    assert resolve_steps_per_call(auto, 1875) == 100
    assert resolve_steps_per_call(auto, 30) == 30  # a short epoch is one call
    assert resolve_steps_per_call(dataclasses.replace(auto, checkpoint_every_steps=7), 1875) == 1
