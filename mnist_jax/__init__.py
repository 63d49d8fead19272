"""mnist_jax: the MNIST tutorial CNN as a JAX/Flax research codebase.

    from mnist_jax import Config, create_train_state, train_step, eval_step, load_split
"""

from mnist_jax.checkpoint import restore_checkpoint
from mnist_jax.config import Config, ModelConfig, UserError
from mnist_jax.data import load_split
from mnist_jax.model import CNN, count_params, summary
from mnist_jax.train import create_train_state, eval_step, evaluate, fit, predict, train_step

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
