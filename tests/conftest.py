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
