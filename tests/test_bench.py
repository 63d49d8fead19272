"""The benchmark's accelerator mode runs where TensorFlow cannot be imported, and reports the steps' time."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import REPO
from mnist_jax import data


def test_jax_only_bench_runs_without_tensorflow_and_reports_training_time(tmp_path, mnist_dirs):
    arrays = data.export_arrays(tmp_path / "mnist.npz", "mnist", **mnist_dirs)
    # As on the GPU machine: TensorFlow and tfds are not installed (here: importing them fails).
    blocker = tmp_path / "no_tensorflow"
    for name in ("tensorflow", "tensorflow_datasets"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text("raise ImportError('no TensorFlow on this machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)]), "MNIST_JAX_COMPILATION_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mnist_jax.bench", "--jax-only", "--arrays", str(arrays), "--epochs", "2", "--train-examples", "320",
           "--repeats", "2", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(out.read_text())
    assert lines[-1] == f"jax_train_time_s={report['jax_train_time_s']:.2f}"
    assert "keras" not in report and "speedup_vs_keras" not in report
    runs = report["jax"]["runs"]
    assert len(runs) == 2 and report["jax_device"] == "1 x cpu (cpu)" and report["dtype"] == "float32"
    for run in runs:
        # The steps alone: shorter than each whole epoch (which also validates on 10,000 images and checkpoints).
        assert len(run["train_time_s"]) == 2 and all(0 < t < e for t, e in zip(run["train_time_s"], run["epoch_time_s"]))
        # 2 epochs on 320 images reach ~0.8 (chance is 0.1): a run that did not learn fails here.
        assert run["compile_time_s"] > 0 and 0.6 < run["test_accuracy"] <= 1.0, run["test_accuracy"]
    assert report["jax_train_time_s"] == pytest.approx(statistics.median(sum(run["train_time_s"]) for run in runs))


def test_bfloat16_is_refused_against_keras_in_one_line():
    result = subprocess.run([sys.executable, "-m", "mnist_jax.bench", "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("--dtype bfloat16 needs --jax-only: the Keras reference computes in float32")


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_keras_and_jax_take_turns_epoch_by_epoch_and_the_ratio_comes_last(tmp_path, mnist_dirs):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mnist_jax.bench", "--data-dir", mnist_dirs["data_dir"], "--epochs", "3", "--train-examples", "320",
           "--repeats", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "MNIST_JAX_COMPILATION_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert result.stdout.strip().splitlines()[-1] == f"speedup_vs_keras={report['speedup_vs_keras']:.2f}"
    keras, jax_run = report["keras"]["runs"][0], report["jax"]["runs"][0]
    assert len(keras["epoch_time_s"]) == len(jax_run["epoch_time_s"]) == 3
    # One side's epoch never overlaps the other's, and who goes first alternates: K J, J K, K J.
    turns = sorted([(*t, "keras") for t in keras["turns_wall"]] + [(*t, "jax") for t in jax_run["turns_wall"]])
    assert [kind for _, _, kind in turns] == ["keras", "jax", "jax", "keras", "keras", "jax"]
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(turns, turns[1:]))
    # Each timed epoch lies within its turn.
    for run in (keras, jax_run):
        assert all(0 < t <= end - start for t, (start, end) in zip(run["epoch_time_s"], run["turns_wall"]))
    steady = statistics.median(keras["epoch_time_s"][1:]) / statistics.median(jax_run["epoch_time_s"][1:])
    assert report["speedup_vs_keras"] == pytest.approx(steady)
