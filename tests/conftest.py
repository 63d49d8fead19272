"""Shared fixtures: real MNIST prepared once per session from the manual dir, in a private tfds data_dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MANUAL_DIR = REPO.parent / "shared" / "data" / "mnist"


MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _candidate() -> Path:
    return Path(os.environ.get("MNIST_JAX_MANUAL_DIR", DEFAULT_MANUAL_DIR))


def mnist_manual_dir() -> Path | None:
    candidate = _candidate()
    return candidate if all((candidate / f).is_file() for f in MNIST_FILES) else None


def pytest_configure(config):
    """Under CI (CI set, as .ci/run does), missing MNIST files fail the run at once instead of skipping half of it."""
    if os.environ.get("CI") and mnist_manual_dir() is None:
        missing = [f for f in MNIST_FILES if not (_candidate() / f).is_file()]
        pytest.exit(f"CI: real MNIST missing in {_candidate()}: {', '.join(missing)} (set MNIST_JAX_MANUAL_DIR)", returncode=4)


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


def tb_steps(logdir: Path) -> dict[str, list[int]]:
    """{tag: steps} of the scalars in `logdir`, read back with TensorBoard's own reader (which applies purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def epochs_run(monkeypatch) -> list[dict]:
    """A spy on the epochs `fit` runs (in this process): one record per epoch, in order, with
    "epoch" (0-based), "first_step" (in the epoch: where a resumed epoch starts), "step" (the global
    step it starts from), "feed" (the feed's class name: DeviceChunks, DeviceSteps, TfDataBatches)
    and "calls" (the steps of each compiled call)."""
    from mnist_jax import loop

    records: list[dict] = []
    real = loop.run_epoch

    def run_epoch(feed, state, sums, *, first_step, num_steps, per_call, hooks=None):
        record = {"epoch": getattr(hooks, "epoch", None), "first_step": first_step, "step": int(state.step),
                  "feed": type(feed).__name__, "calls": []}  # fmt: skip
        records.append(record)

        def counted(state, sums, start, n):
            record["calls"].append(n)
            return feed(state, sums, start, n)

        return real(counted, state, sums, first_step=first_step, num_steps=num_steps, per_call=per_call, hooks=hooks)

    monkeypatch.setattr(loop, "run_epoch", run_epoch)
    return records


def epoch_starts(records: list[dict]) -> list[tuple[int, int, int]]:
    """(epoch, first step in it, global step) of each epoch an `epochs_run` spy saw."""
    return [(r["epoch"], r["first_step"], r["step"]) for r in records]
