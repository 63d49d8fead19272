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
        assert run["compile_time_s"] > 0 and 0.1 < run["test_accuracy"] <= 1.0
    assert report["jax_train_time_s"] == pytest.approx(statistics.median(sum(run["train_time_s"]) for run in runs))


def test_bfloat16_is_refused_against_keras_in_one_line():
    result = subprocess.run([sys.executable, "-m", "mnist_jax.bench", "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("--dtype bfloat16 needs --jax-only: the Keras reference computes in float32")
