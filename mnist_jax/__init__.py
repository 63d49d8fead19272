"""mnist_jax: the MNIST tutorial CNN as a JAX/Flax research codebase.

    from mnist_jax import Config, create_train_state, train_step, eval_step, load_split

The pure steps live in `mnist_jax.steps`, the epoch runner and `evaluate` in `mnist_jax.loop`, `fit` in
`mnist_jax.train`, K vmapped models in `mnist_jax.multi`, process-wide settings in `mnist_jax.runtime`.
"""

from mnist_jax.checkpoint import restore_checkpoint
from mnist_jax.config import Config, ModelConfig, UserError
from mnist_jax.data import load_split
from mnist_jax.model import CNN, count_params, summary
from mnist_jax.loop import evaluate
from mnist_jax.steps import create_train_state, eval_step, predict, train_step
from mnist_jax.train import fit

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
