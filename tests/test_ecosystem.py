"""TensorBoard curves (plain and resumed), the profiler switch, config files, run comparison, pinned installs."""

from __future__ import annotations

import importlib.metadata
import json
import signal
from pathlib import Path

import pytest

from mnist_jax import Config, fit
from mnist_jax.runtime import StopRequest
from mnist_jax.train import Preempted
from tests.conftest import REPO, tb_steps
from tests.test_cli import run_cli

EPOCH_TAGS = {f"epoch/{k}" for k in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s", "train_time_s", "learning_rate")}


def one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# 3,200 images, batch 32: 100 steps an epoch, so the training scalars land every 100 steps.
SMALL = dict(epochs=2, train_examples=3200)


def test_a_run_writes_its_curves_to_tensorboard(tmp_path, mnist_dirs):
    fit(Config(**SMALL, workdir=str(tmp_path / "run"), **mnist_dirs), verbose=False)
    steps = tb_steps(tmp_path / "run" / "tb")
    assert set(steps) == {"train/loss", "train/accuracy"} | EPOCH_TAGS
    assert all(s == [100, 200] for s in steps.values()), steps
    assert list((tmp_path / "run" / "tb" / "hparams").glob("events.out.tfevents.*"))  # the config as hyperparameters
    fit(Config(**SMALL, workdir=str(tmp_path / "off"), tensorboard=False, **mnist_dirs), verbose=False)
    assert not (tmp_path / "off" / "tb").exists()


def test_a_stopped_and_resumed_run_continues_the_same_curves(tmp_path, mnist_dirs):
    config = Config(**SMALL, checkpoint_every_steps=30, workdir=str(tmp_path / "run"), **mnist_dirs)
    stop = StopRequest()
    with pytest.raises(Preempted, match="at step 101"):  # stopped after epoch 2's first call (one step per call)
        fit(config, verbose=False, stop=stop, before_epoch=lambda epoch: setattr(stop, "signal", signal.SIGTERM if epoch == 1 else None))
    assert tb_steps(tmp_path / "run" / "tb")["epoch/val_loss"] == [100]
    fit(config, resume=True, verbose=False)
    steps = tb_steps(tmp_path / "run" / "tb")
    assert set(steps) == {"train/loss", "train/accuracy"} | EPOCH_TAGS
    assert all(s == [100, 200] for s in steps.values()), steps  # one sequence: no step twice, none missing


def test_profile_steps_writes_a_trace(tmp_path, mnist_dirs):
    fit(Config(epochs=1, train_examples=320, steps_per_call=1, profile_steps="3:5", workdir=str(tmp_path / "run"), **mnist_dirs), verbose=False)
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces), traces


def test_bad_profile_steps_are_one_line_errors():
    one_line_error(run_cli("train", "--profile-steps", "5:3"), "--profile-steps A:B needs 1 <= A <= B")
    one_line_error(run_cli("train", "--profile-steps", "x"), "--profile-steps must be A:B")


def test_a_config_file_starts_the_run_and_flags_override_it(tmp_path, mnist_dirs):
    saved = tmp_path / "saved.json"
    Config(epochs=1, train_examples=320, batch_size=64, learning_rate=3e-4, workdir=str(tmp_path / "old"), **mnist_dirs).save(saved)
    result = run_cli("train", "--config", saved, "--seed", "5", "--workdir", tmp_path / "new")
    assert result.returncode == 0, result.stderr[-2000:]
    config = Config.load(tmp_path / "new" / "config.json")
    assert (config.epochs, config.batch_size, config.learning_rate, config.seed) == (1, 64, 3e-4, 5)
    assert Path(config.workdir) == (tmp_path / "new").resolve()


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ["cannot read config file", "No such file"]),
        ("{not json", ["is not valid JSON"]),
        ('{"epoch": 3}', ["unknown key 'epoch'"]),
        ('{"model": {"dense": 3}}', ["unknown key 'model.dense'"]),
        ('{"epochs": "3"}', ["config key 'epochs' must be int", "'3'"]),
        ('{"tensorboard": 1}', ["config key 'tensorboard' must be bool"]),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_problem(tmp_path, content, fragments):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    one_line_error(run_cli("train", "--config", path, "--workdir", tmp_path / "run"), *fragments)
    assert not (tmp_path / "run").exists()


def test_compare_draws_the_runs_and_tabulates_their_differences(tmp_path, mnist_dirs):
    for name, rate in (("slow", 1e-4), ("fast", 1e-3)):
        fit(Config(epochs=2, train_examples=320, learning_rate=rate, workdir=str(tmp_path / name), **mnist_dirs), verbose=False)
    result = run_cli("compare", tmp_path / "slow", tmp_path / "fast", "--out", tmp_path / "compare.png")
    assert result.returncode == 0, result.stderr
    header, _, slow, fast = result.stdout.splitlines()[:4]
    assert header == "| run | learning_rate | epochs trained | test accuracy | wrong | fit time s |"
    assert slow.startswith("| slow | 0.0001 | 2 | ") and fast.startswith("| fast | 0.001 | 2 | ")
    accuracy = json.loads((tmp_path / "fast" / "metrics.json").read_text())["test_accuracy"]
    assert f"| {100 * accuracy:.2f} % | {round((1 - accuracy) * 10_000)} |" in fast
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    one_line_error(run_cli("compare", tmp_path, tmp_path / "fast"), "is not a mnist_jax run folder")
    one_line_error(run_cli("compare", tmp_path / "nope"), "is not a mnist_jax run folder")


def test_the_installed_versions_are_the_constraints_files():
    pinned = [line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#")]
    assert {"jax", "flax", "optax", "orbax-checkpoint", "tensorboardX"} <= {name for name, _ in pinned}
    wrong = {name: (version, importlib.metadata.version(name)) for name, version in pinned if importlib.metadata.version(name) != version}
    assert not wrong, f"installed differently from constraints.txt (pinned, installed): {wrong}"


def test_the_extras_pull_the_accelerators_jax():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cuda12"] == ["jax[cuda12]>=0.10.2"] and extras["tpu"] == ["jax[tpu]>=0.10.2"]


def test_a_config_json_written_before_the_tensorboard_fields_still_loads():
    values = Config().to_dict()
    for key in ("tensorboard", "profile_steps"):
        values.pop(key)
    assert Config.from_dict(values) == Config()
