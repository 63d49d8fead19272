"""Orbax checkpoints of the whole train state (params, Adam state, step) plus run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. The manager keeps the
latest `keep` checkpoints and the best one by val_accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

from mnist_jax.config import Config, UserError


def make_manager(directory: str | Path, keep: int = 3) -> ocp.CheckpointManager:
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy.AnyPreservationPolicy(
            [
                policy.LatestN(n=keep),
                policy.BestN(
                    get_metric_fn=lambda metrics: metrics["accuracy"],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        ),
        create=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def has_checkpoint(workdir: str | Path) -> bool:
    directory = Path(workdir) / "checkpoints"
    return directory.is_dir() and make_manager(directory).latest_step() is not None


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    """Save `state` at its step (asynchronously); `meta` is JSON (epoch, history, ...)."""
    manager.save(
        int(state.step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
    )


def restore_latest(
    manager: ocp.CheckpointManager, like: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any]]:
    """Restore the checkpoint at `step` (default: latest) into the structure and shardings of `like`."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise UserError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return restored["state"], restored["meta"]


def find_workdir(path: str | Path) -> tuple[Path, int | None]:
    """Accept a workdir, its checkpoints/ folder, or one checkpoint step folder; return (workdir, step)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if path.name == "checkpoints":
        return path.parent, None
    return path, None


def restore_checkpoint(workdir_or_path: str | Path) -> TrainState:
    """The train state saved in a run's workdir (latest checkpoint, or the step folder given)."""
    from mnist_jax.train import create_train_state  # train imports this module

    workdir, step = find_workdir(workdir_or_path)
    config = Config.load(workdir / "config.json")
    if not has_checkpoint(workdir):
        raise UserError(f"no checkpoint in {workdir}")
    like = jax.eval_shape(lambda key: create_train_state(key, config), jax.random.key(0))
    # eval_shape keeps the static fields (apply_fn, tx) and gives abstract leaves.
    state, _ = restore_latest(make_manager(workdir / "checkpoints", config.keep_checkpoints), like, step)
    return state
