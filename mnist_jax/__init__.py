"""mnist_jax: the MNIST tutorial CNN as a JAX/Flax research codebase.

    from mnist_jax import Config, create_train_state, train_step, eval_step, load_split

The pure steps live in `mnist_jax.steps`, the epoch runner and `evaluate` in `mnist_jax.loop`, `fit` in
`mnist_jax.train`, K vmapped models in `mnist_jax.multi`, process-wide settings in `mnist_jax.runtime`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use: `python -m mnist_jax` (mnist_jax/__main__.py) sets up its Ctrl-C handling before JAX loads.
EXPORTS = {
    "CNN": "mnist_jax.model",
    "Config": "mnist_jax.config",
    "ModelConfig": "mnist_jax.config",
    "UserError": "mnist_jax.config",
    "count_params": "mnist_jax.model",
    "create_train_state": "mnist_jax.steps",
    "eval_step": "mnist_jax.steps",
    "evaluate": "mnist_jax.loop",
    "fit": "mnist_jax.train",
    "load_split": "mnist_jax.data",
    "predict": "mnist_jax.steps",
    "restore_checkpoint": "mnist_jax.checkpoint",
    "summary": "mnist_jax.model",
    "train_step": "mnist_jax.steps",
}

if TYPE_CHECKING:
    from mnist_jax.checkpoint import restore_checkpoint
    from mnist_jax.config import Config, ModelConfig, UserError
    from mnist_jax.data import load_split
    from mnist_jax.loop import evaluate
    from mnist_jax.model import CNN, count_params, summary
    from mnist_jax.steps import create_train_state, eval_step, predict, train_step
    from mnist_jax.train import fit


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'mnist_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])


__all__ = [
    "CNN",
    "Config",
    "ModelConfig",
    "UserError",
    "count_params",
    "create_train_state",
    "eval_step",
    "evaluate",
    "fit",
    "load_split",
    "predict",
    "restore_checkpoint",
    "summary",
    "train_step",
]
