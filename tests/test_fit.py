"""`fit` end to end on real MNIST: it learns, it is reproducible bit for bit, and resuming changes nothing."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from mnist_jax import Config, fit, restore_checkpoint
from mnist_jax.config import UserError
from tests.conftest import epoch_starts


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_learns_well_above_chance_on_a_few_thousand_images(tmp_path, mnist_dirs):
    config = Config(epochs=1, train_examples=4000, workdir=str(tmp_path), **mnist_dirs)
    state, history = fit(config, verbose=False)
    assert history["val_accuracy"][-1] > 0.9  # chance is 0.1
    assert history["loss"][0] < 1.0
    assert int(state.step) == 4000 // 32


def test_same_seed_same_parameters_and_resume_is_the_same_run(tmp_path, mnist_dirs, epochs_run):
    base = Config(epochs=2, train_examples=320, **mnist_dirs)
    a, history_a = fit(dataclasses.replace(base, workdir=str(tmp_path / "a")), verbose=False)
    b, _ = fit(dataclasses.replace(base, workdir=str(tmp_path / "b")), verbose=False)
    assert _leaves_equal(a.params, b.params) and _leaves_equal(a.opt_state, b.opt_state)

    other_seed, _ = fit(dataclasses.replace(base, seed=1, workdir=str(tmp_path / "s1")), verbose=False)
    assert not _leaves_equal(a.params, other_seed.params)

    # Stop after one epoch, then resume to two: identical to the uninterrupted run.
    fit(dataclasses.replace(base, epochs=1, workdir=str(tmp_path / "c")), verbose=False)
    assert _checkpoint_steps(tmp_path / "c") == [10]
    del epochs_run[:]
    c, history_c = fit(dataclasses.replace(base, workdir=str(tmp_path / "c")), resume=True, verbose=False)
    assert epoch_starts(epochs_run) == [(1, 0, 10)]  # it went on from the checkpoint: epoch 2 only, from step 10
    assert _leaves_equal(a.params, c.params)
    assert history_c["val_accuracy"] == history_a["val_accuracy"]
    assert _leaves_equal(restore_checkpoint(tmp_path / "c").params, c.params)


def test_tfdata_pipeline_trains_the_same_model(tmp_path, mnist_dirs, epochs_run, monkeypatch):
    from mnist_jax import data

    gathered = []  # the batches tf.data gathered on the host
    real_tf_batches = data.tf_batches

    def tf_batches(train, order):
        for batch in real_tf_batches(train, order):
            gathered.append(batch["label"])
            yield batch

    monkeypatch.setattr(data, "tf_batches", tf_batches)
    base = Config(epochs=1, train_examples=320, **mnist_dirs)
    device, _ = fit(dataclasses.replace(base, workdir=str(tmp_path / "d")), verbose=False)
    assert [(r["feed"], r["calls"]) for r in epochs_run] == [("DeviceChunks", [10])] and gathered == []
    host, _ = fit(dataclasses.replace(base, pipeline="tfdata", workdir=str(tmp_path / "h")), verbose=False)
    assert [(r["feed"], r["calls"]) for r in epochs_run[1:]] == [("TfDataBatches", [1] * 10)]  # the variant really ran
    assert len(gathered) == 10 and all(len(labels) == 32 for labels in gathered)
    assert _leaves_equal(device.params, host.params)


def test_scanned_steps_per_call_train_the_same_model_and_resume_mid_chunk(tmp_path, mnist_dirs, epochs_run):
    # 320 images / 32 = 10 steps an epoch; 4 per call gives chunks 4, 4, 2 (the tail compiles apart).
    base = Config(epochs=2, train_examples=320, **mnist_dirs)
    stepwise, history = fit(dataclasses.replace(base, steps_per_call=1, workdir=str(tmp_path / "one")), verbose=False)
    assert [(r["feed"], r["calls"]) for r in epochs_run] == [("DeviceSteps", [1] * 10)] * 2
    del epochs_run[:]
    scanned, scanned_history = fit(dataclasses.replace(base, steps_per_call=4, workdir=str(tmp_path / "scan")), verbose=False)
    assert [(r["feed"], r["calls"]) for r in epochs_run] == [("DeviceChunks", [4, 4, 2])] * 2  # the variant really ran
    assert int(scanned.step) == int(stepwise.step) == 20
    for x, y in zip(jax.tree.leaves(stepwise.params), jax.tree.leaves(scanned.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)  # same order, same dropout keys; fusion may differ
    np.testing.assert_allclose(scanned_history["val_accuracy"], history["val_accuracy"], atol=2e-3)
    assert scanned_history["compile_time_s"] > 0

    # A checkpoint every 3 steps lands at the first chunk end after each multiple (steps 4 and 8): resume from 8.
    every = dataclasses.replace(base, epochs=1, steps_per_call=4, checkpoint_every_steps=3, workdir=str(tmp_path / "r"))
    fit(every, verbose=False)
    assert _checkpoint_steps(tmp_path / "r") == [4, 8, 10]
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "10")  # so the newest is step 8, mid-epoch, before a 2-step chunk
    del epochs_run[:]
    resumed, _ = fit(dataclasses.replace(every, epochs=2), resume=True, verbose=False)
    assert epoch_starts(epochs_run) == [(0, 8, 8), (1, 0, 10)]  # from step 8: the 2-step chunk, then epoch 2
    assert [r["calls"] for r in epochs_run] == [[2], [4, 4, 2]]
    assert _leaves_equal(resumed.params, scanned.params)


def test_checkpoint_every_steps_writes_one_at_each_multiple_and_at_each_epoch_end(tmp_path, mnist_dirs):
    # 10 steps an epoch, a checkpoint every 3 steps (all kept): a crash loses at most 3 steps.
    config = Config(epochs=2, train_examples=320, checkpoint_every_steps=3, keep_checkpoints=100, workdir=str(tmp_path / "run"), **mnist_dirs)
    fit(config, verbose=False)
    written = _checkpoint_steps(tmp_path / "run")
    assert written == [3, 6, 9, 10, 12, 15, 18, 20]
    assert max(b - a for a, b in zip([0, *written], written)) <= 3


def test_tfdata_pipeline_runs_one_step_per_call_whatever_steps_per_call_says():
    from mnist_jax.loop import resolve_steps_per_call

    config = Config(pipeline="tfdata", steps_per_call=4)
    assert resolve_steps_per_call(config, 10) == 1
    assert resolve_steps_per_call(dataclasses.replace(config, pipeline="device"), 10) == 4


def test_auto_steps_per_call_on_cpu_is_chunks_of_100_or_one_with_step_checkpoints():
    from mnist_jax.loop import CPU_STEPS_PER_CALL, resolve_steps_per_call

    assert jax.default_backend() == "cpu"
    auto = Config(steps_per_call=0)
    assert CPU_STEPS_PER_CALL == 100
    assert resolve_steps_per_call(auto, 1875) == 100
    assert resolve_steps_per_call(auto, 30) == 30  # a short epoch is one call
    assert resolve_steps_per_call(dataclasses.replace(auto, checkpoint_every_steps=7), 1875) == 1


def test_auto_steps_per_call_on_accelerators_is_the_epoch_or_one_with_step_checkpoints(monkeypatch):
    from mnist_jax.loop import resolve_steps_per_call

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    auto = Config(steps_per_call=0)
    assert resolve_steps_per_call(auto, 1875) == 1875
    # Checkpoints are taken between calls: a whole epoch per call would never checkpoint inside it.
    assert resolve_steps_per_call(dataclasses.replace(auto, checkpoint_every_steps=500), 1875) == 1
    assert resolve_steps_per_call(dataclasses.replace(auto, steps_per_call=250, checkpoint_every_steps=500), 1875) == 250


def test_resume_refuses_a_changed_recipe_and_runs_latest_stays_on_the_run(tmp_path, mnist_dirs, monkeypatch, epochs_run):
    from mnist_jax import workdir

    monkeypatch.chdir(tmp_path)
    base = Config(epochs=1, train_examples=64, **mnist_dirs)
    fit(base, verbose=False)  # the default folder, runs/mnist-<timestamp>, linked as runs/latest
    latest = tmp_path / "runs" / "latest"
    run = latest.resolve()
    assert latest.is_symlink() and run.parent == tmp_path / "runs" and run.name.startswith("mnist-")
    with pytest.raises(UserError, match=r"this config changes batch_size=16 \(the run has 32\)"):
        fit(dataclasses.replace(base, epochs=2, batch_size=16, workdir="runs/latest"), resume=True, verbose=False)
    # Resumed through the link, to more epochs; before its epoch 2, a newer run starts in the default folder and
    # takes the link: the resumed run goes on writing to its own folder, which records the new target.
    monkeypatch.setattr(workdir, "default_workdir", lambda dataset: Path("runs") / f"{dataset}-newer")  # seconds may not tick
    newer = tmp_path / "runs" / "mnist-newer"

    def start_a_newer_run(epoch):
        if epoch == 1:
            fit(base, verbose=False)
            assert latest.resolve() == newer  # the link moved during the resume

    del epochs_run[:]
    state, history = fit(dataclasses.replace(base, epochs=2, workdir="runs/latest"), resume=True, verbose=False, before_epoch=start_a_newer_run)
    assert int(state.step) == 4 and len(history["val_accuracy"]) == 2
    assert epoch_starts(epochs_run) == [(0, 0, 0), (1, 0, 2)]  # the newer run's epoch, then the resumed run's second
    assert _checkpoint_steps(run) == [2, 4] and _checkpoint_steps(newer) == [2]
    assert len(json.loads((run / "history.json").read_text())["val_accuracy"]) == 2
    assert len(json.loads((newer / "history.json").read_text())["val_accuracy"]) == 1
    assert Config.load(run / "config.json").epochs == 2 and Config.load(newer / "config.json").epochs == 1
    assert _leaves_equal(restore_checkpoint(run).params, state.params)
    assert latest.resolve() == newer  # the resume did not take the link back
    # A folder of the user's choosing moves no link and makes none beside it.
    fit(dataclasses.replace(base, workdir=str(tmp_path / "mine" / "run")), verbose=False)
    assert latest.resolve() == newer and not (tmp_path / "mine" / "latest").exists()


def test_resume_conflicts_name_the_fields_that_decide_the_parameters():
    from mnist_jax.config import ModelConfig

    saved = Config()
    changed = Config(batch_size=64, model=ModelConfig(dropout_rate=0.5))
    assert changed.resume_conflicts(saved) == {"batch_size": (64, 32), "dropout_rate": (0.5, 0.25)}
    harmless = Config(epochs=9, data_dir="/elsewhere", arrays="m.npz", devices="1", keep_checkpoints=1, eval_batch_size=50)
    assert harmless.resume_conflicts(saved) == {}


def test_before_epoch_runs_once_the_previous_epochs_checkpoint_is_written(tmp_path, mnist_dirs):
    seen = {}
    checkpoints = tmp_path / "run" / "checkpoints"
    record = lambda epoch: seen.setdefault(epoch, sorted(p.name for p in checkpoints.iterdir()))  # noqa: E731
    config = Config(epochs=3, train_examples=64, workdir=str(tmp_path / "run"), **mnist_dirs)
    _, history = fit(config, verbose=False, before_epoch=record)
    assert seen == {0: [], 1: ["2"], 2: ["2", "4"]}  # committed, no Orbax temporary folder left writing
    assert history["fit_time_s"] >= sum(history["epoch_time_s"])


def test_several_processes_need_a_workdir(monkeypatch):
    from mnist_jax.workdir import prepare_workdir

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(UserError, match="several processes need one --workdir on a shared file system"):
        prepare_workdir(Config(), resume=False)


def test_a_stop_request_in_an_epochs_last_call_finishes_that_epoch_first(tmp_path, mnist_dirs, epochs_run):
    import os
    import signal

    from mnist_jax import checkpoint
    from mnist_jax.runtime import stop_on_signals
    from mnist_jax.train import Preempted, create_train_state

    # 10 steps an epoch in one call: a SIGTERM before epoch 1 starts is seen after that epoch's last call.
    config = Config(epochs=2, train_examples=320, steps_per_call=10, workdir=str(tmp_path / "run"), **mnist_dirs)
    uninterrupted, _ = fit(dataclasses.replace(config, workdir=str(tmp_path / "whole")), verbose=False)
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 10"), stop_on_signals() as stop:
        fit(config, verbose=False, stop=stop, before_epoch=lambda epoch: os.kill(os.getpid(), signal.SIGTERM) if epoch == 0 else None)
    # The checkpoint is the epoch's end, validated (not one "inside" epoch 0 at its last step).
    with checkpoint.make_manager(tmp_path / "run" / "checkpoints") as manager:
        assert manager.all_steps() == [10]
        _, meta = checkpoint.restore_latest(manager, create_train_state(jax.random.key(0), config))
    assert (meta["epoch"], meta["step_in_epoch"], len(meta["history"]["val_accuracy"])) == (1, 0, 1)
    del epochs_run[:]
    resumed, _ = fit(config, resume=True, verbose=False)
    assert epoch_starts(epochs_run) == [(1, 0, 10)]
    assert _leaves_equal(resumed.params, uninterrupted.params)
