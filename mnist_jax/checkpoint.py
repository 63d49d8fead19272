"""Orbax checkpoints of the whole train state (params, Adam state, step) plus run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. The manager keeps the
latest `keep` checkpoints and the best one by val_accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

from mnist_jax.config import Config, UserError
from mnist_jax.parallel import wait_for_all_processes
from mnist_jax.steps import create_train_state


def make_manager(directory: str | Path, keep: int = 3) -> ocp.CheckpointManager:
    directory = Path(directory).absolute()
    # Naming every process makes Orbax's barriers across processes the coordinator's (key-value)
    # barriers, like `wait_for_all_processes`, rather than device collectives that would queue among
    # the training step's (with one process there are none). Orbax then leaves creating the directory to us.
    directory.mkdir(parents=True, exist_ok=True)
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
        create=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(active_processes=set(range(jax.process_count()))),
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with _quiet_absl():  # an unreadable step's metadata is logged as an ERROR here; restore_latest reports it in one line
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def has_checkpoint(workdir: str | Path) -> bool:
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return False
    with make_manager(directory) as manager:
        return manager.latest_step() is not None


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    """Save `state` at its step (asynchronously); `meta` is JSON (epoch, history, ...)."""
    manager.save(
        int(state.step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
    )


def latest_meta(workdir: str | Path) -> dict[str, Any]:
    """The run metadata (position, history) saved with a workdir's latest checkpoint."""
    with make_manager(Path(workdir) / "checkpoints") as manager:
        step = manager.latest_step()
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract: TrainState) -> None:
    """A checkpoint from another model config: name the first layer whose shape differs."""
    try:
        saved = manager.item_metadata(step)["state"]["params"]
    except Exception:  # noqa: BLE001 - unreadable metadata: restore itself will report
        return
    saved_shapes = {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract.params):
        saved_shape = saved_shapes.get(jax.tree_util.keystr(path))
        if saved_shape is not None and saved_shape != tuple(leaf.shape):
            layer = "/".join(str(p.key) for p in path)
            raise UserError(f"checkpoint step {step} does not fit this model: {layer} is {saved_shape} there, {tuple(leaf.shape)} here")


def restore_latest(
    manager: ocp.CheckpointManager, like: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any]]:
    """Restore the checkpoint at `step` (default: the newest readable one) into the structure and shardings of `like`.

    A newest checkpoint that cannot be read (truncated or corrupted files) is reported
    in one line on stderr and the one before it is used.
    """
    candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not candidates:
        raise UserError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    for i, candidate in enumerate(candidates):
        try:
            with _quiet_absl():
                _check_shapes(manager, candidate, abstract)
                restored = manager.restore(
                    candidate,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
                )
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            if step is not None or i + 1 == len(candidates):
                raise UserError(f"checkpoint step {candidate} in {manager.directory} is unreadable: {reason}") from None
            print(f"mnist_jax: warning: checkpoint step {candidate} is unreadable ({reason}); using step {candidates[i + 1]}", file=sys.stderr)
            continue
        return restored["state"], restored["meta"]
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _quiet_absl():
    """Mute Orbax's ERROR logs about unreadable checkpoint files: `restore_latest` reports those in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def set_aside_newer(manager: ocp.CheckpointManager, step: int) -> list[Path]:
    """Move the checkpoints after `step` (those `restore_latest` could not read) into
    `<workdir>/unreadable-checkpoints/`, and return where they went.

    Orbax never saves a step at or below its latest one, so without this a run resumed
    from an older checkpoint would write no checkpoint until it passed the unreadable
    ones, and those would stay the "latest". Moved, not deleted: whatever made them
    unreadable may have been passing, and they stay there for a person to look at.
    """
    wait_for_all_processes(f"mnist_jax:set_aside_newer:before:{manager.directory}:{step}")  # every process has listed the steps (and restored)
    newer = sorted(s for s in manager.all_steps() if s > step)
    directory = Path(str(manager.directory))
    aside = directory.parent / "unreadable-checkpoints"
    moved = []
    if newer and jax.process_index() == 0:
        aside.mkdir(exist_ok=True)
        for s in newer:
            target, n = aside / str(s), 1
            while target.exists():  # set aside before, at the same step
                target, n = aside / f"{s}-{n}", n + 1
            (directory / str(s)).rename(target)
            moved.append(target)
    wait_for_all_processes(f"mnist_jax:set_aside_newer:after:{manager.directory}:{step}")
    manager.reload()
    return moved


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


def restore_checkpoint(workdir_or_path: str | Path, sharding: jax.sharding.Sharding | None = None) -> TrainState:
    """The train state saved in a run's workdir (latest checkpoint, or the step folder given).

    Arrays land with `sharding` (default: on the first local device), whatever the
    device count of the run that saved them.
    """
    return restore_run(workdir_or_path, sharding)[2]


def restore_run(workdir_or_path: str | Path, sharding: jax.sharding.Sharding | None = None) -> tuple[Path, Config, TrainState]:
    """`restore_checkpoint`, with the run's workdir and config it found on the way."""
    workdir, step = find_workdir(workdir_or_path)
    config = Config.load(workdir / "config.json")
    if not has_checkpoint(workdir):
        raise UserError(f"no checkpoint in {workdir}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(lambda key: create_train_state(key, config), jax.random.key(0))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
    # eval_shape keeps the static fields (apply_fn, tx) and gives abstract leaves.
    with make_manager(workdir / "checkpoints", config.keep_checkpoints) as manager:
        state, _ = restore_latest(manager, like, step)
    return workdir, config, state
