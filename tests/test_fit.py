"""`fit` end to end on real MNIST: it learns, it is reproducible bit for bit, and resuming changes nothing."""

import dataclasses

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
