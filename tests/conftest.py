"""Shared fixtures: real MNIST prepared once per session from the manual dir, in a private tfds data_dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MANUAL_DIR = REPO.parent / "shared" / "data" / "mnist"


def mnist_manual_dir() -> Path | None:
    candidate = Path(os.environ.get("MNIST_JAX_MANUAL_DIR", DEFAULT_MANUAL_DIR))
    files = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return candidate if all((candidate / f).is_file() for f in files) else None


@pytest.fixture(scope="session")
def mnist_dirs(tmp_path_factory) -> dict[str, str]:
    """{"data_dir", "manual_dir"} with MNIST prepared; skips when the four files are absent."""
    manual = mnist_manual_dir()
    if manual is None:
        pytest.skip("real MNIST not found: set MNIST_JAX_MANUAL_DIR to a folder with the four .gz files")
    from mnist_jax import data

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("mnist", data_dir=data_dir, manual_dir=str(manual))
    return {"data_dir": data_dir, "manual_dir": str(manual)}


@pytest.fixture(scope="session")
def mnist_small(mnist_dirs):
    """The first 2,000 training and all 10,000 test images, as arrays."""
    from mnist_jax import data

    train = data.load_split("mnist", "train", num_examples=2000, **mnist_dirs)
    test = data.load_split("mnist", "test", **mnist_dirs)
    return train, test


# Whole-process scenarios of tens of seconds each: `make test-slow` (and CI) runs them, `make test` skips them.
SLOW_TESTS = {
    "test_sigkill_at_a_random_step_then_resume_is_bit_identical",
    "test_sigterm_finishes_the_step_saves_and_exits_75_then_resume_is_identical",
    "test_a_second_sigint_ends_the_process_at_once",
    "test_a_truncated_latest_checkpoint_is_reported_in_one_line_and_the_previous_one_used",
    "test_a_partly_written_checkpoint_is_never_picked",
    "test_a_diverging_learning_rate_stops_with_exit_3_naming_the_step",
    "test_two_processes_train_like_one",
    "test_four_devices_train_like_one_and_checkpoints_move",
    "test_an_experiment_writes_results_json_table_and_plot",
    "test_step_time_times_each_variant_and_the_unrolled_scan_trains_the_same",
    "test_keras_and_jax_take_turns_epoch_by_epoch_and_the_ratio_comes_last",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SLOW_TESTS or item.name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
