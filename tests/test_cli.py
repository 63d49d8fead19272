"""The command line as a user meets it: one-line errors with a non-zero exit, and a real short run."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "mnist_jax", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["train", "--learning-rate", "abc"], "invalid float value: 'abc'"),
        (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["train", "--epochs", "-1"], "--epochs must be >= 1"),
        (["train", "--resume"], "--resume needs --workdir"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_workdir_without_checkpoint(tmp_path):
    for args, message in [
        (["evaluate", "--workdir", str(tmp_path)], "no config.json"),
        (["train", "--resume", "--workdir", str(tmp_path)], "no config.json"),
        (["evaluate", "--workdir", str(tmp_path / "nope")], "does not exist"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_missing_data_offline_names_the_files(tmp_path):
    empty = tmp_path / "manual"
    empty.mkdir()
    result = run_cli("train", "--data-dir", str(tmp_path / "tfds"), "--workdir", str(tmp_path / "run"), env_extra={"MNIST_JAX_MANUAL_DIR": str(empty)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "train-images-idx3-ubyte.gz" in result.stderr and "t10k-labels-idx1-ubyte.gz" in result.stderr


def test_summary_prints_the_table():
    result = run_cli("summary")
    assert result.returncode == 0 and "Total params: 3,156,098" in result.stdout


def test_train_then_evaluate_from_the_checkpoint(tmp_path, mnist_dirs):
    workdir = tmp_path / "run"
    flags = ["--data-dir", mnist_dirs["data_dir"], "--manual-dir", mnist_dirs["manual_dir"]]
    result = run_cli("train", "--epochs", "2", "--train-examples", "1024", "--workdir", str(workdir), *flags)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Total params: 3,156,098" in out and "Epoch 1/2 - " in out and "Epoch 2/2 - " in out
    assert "val_accuracy" in out and "Fit Time : " in out
    accuracy_line = next(line for line in out.splitlines() if line.startswith("Test Accuracy : "))

    history = json.loads((workdir / "history.json").read_text())
    assert len(history["loss"]) == len(history["val_accuracy"]) == len(history["epoch_time_s"]) == 2
    assert history["fit_time_s"] > 0
    assert json.loads((workdir / "config.json").read_text())["train_examples"] == 1024
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert accuracy_line == f"Test Accuracy : {metrics['test_accuracy']:.4f}"

    evaluated = run_cli("evaluate", "--workdir", str(workdir), *flags)
    assert evaluated.returncode == 0, evaluated.stderr
    assert accuracy_line in evaluated.stdout.splitlines()
