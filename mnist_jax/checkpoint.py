"""Orbax checkpoints of the whole train state (params, Adam state, step) plus run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,meta,metrics}`. The manager keeps the latest `keep`
checkpoints and the best one by val_accuracy: an epoch-end checkpoint's validation metrics are written
with it (`metrics/`), so the best one survives resumes and any number of later mid-epoch checkpoints.

What was written is verified on every restore: each checkpoint's meta holds CRC-32 checksums of the
state's arrays and of the meta itself, taken from the state being saved. A checkpoint whose bytes were
damaged after writing is reported like one with missing files: one warning line and the checkpoint
before it, or one error line when it was asked for by name.

A checkpoint that cannot be written (disk full, permissions) raises `HostError` in one line naming the
last good checkpoint, after its partial folder is removed. Every failure reaches the caller as an
exception; `mute_orbax_noise` (a process-wide setting, called by entry points such as `mnist_jax.cli`)
drops Orbax's own log lines and the leftovers of its aborted asynchronous reads and writes.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils

from mnist_jax.config import Config, HostError, UserError
from mnist_jax.parallel import wait_for_all_processes
from mnist_jax.steps import create_train_state

CHECKSUMS_KEY = "checksums"  # in each checkpoint's meta: {"state": {array path: crc}, "meta": crc of the rest}


def best_metric(metrics: dict[str, float]) -> float:
    """What ranks checkpoints for keeping: the validation accuracy saved with an epoch-end checkpoint."""
    return metrics["accuracy"]


class CheckpointManager(ocp.CheckpointManager):
    """Orbax's manager, where a checkpoint that could not be written (an `OSError` underneath, such as a
    full disk) raises `HostError` naming the last good checkpoint, once its partial folder is removed.
    Orbax writes in the background: the failure surfaces in the next `save`, `wait_until_finished` or
    `close`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writing: int | None = None  # the step of the latest save

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        try:
            saved = super().save(step, *args, **kwargs)  # waits for the previous save first
        except HostError:
            raise
        except Exception as err:
            failure = self.write_failure(err, step)
            if failure is None:
                raise
            raise failure from err
        self.writing = step
        return saved

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
        except Exception as err:
            failure = self.write_failure(err, self.writing)
            if failure is None:
                raise
            raise failure from err

    def metrics(self, step: int) -> Any:
        """The metrics saved with `step`; None when missing or unreadable (a damaged checkpoint, which
        `restore_latest` reports when it reads it: listing the steps must not fail on it)."""
        try:
            return super().metrics(step)
        except Exception:  # noqa: BLE001 - e.g. a truncated metrics file
            return None

    def write_failure(self, err: BaseException, step: int | None) -> HostError | None:
        """The `HostError` for a save of `step` that failed with `err`, its partial folder removed;
        None when `err` is not the machine's (no OS error code in it)."""
        code = os_error_code(err)
        if code is None:
            return None
        if jax.process_index() == 0:
            for name in ocp.path.step.tmp_checkpoints(self.directory):  # e.g. "40.orbax-checkpoint-tmp"
                if step is not None and name.split(".", 1)[0] == str(step):
                    remove_partial(Path(self.directory) / name)
        kept = self.latest_step()
        where = f"last good checkpoint: step {kept} in {self.directory}" if kept is not None else "no checkpoint was written"
        what = "disk full" if code in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
        return HostError(f"{what}: checkpoint step {step} could not be written ({os.strerror(code)}); {where}")


def remove_partial(path: Path, settle_s: float = 1.0, limit_s: float = 10.0) -> None:
    """Remove the folder of a failed save, and again while writes of it that were already under way
    (TensorStore's, which outlive the save that failed) recreate it: until it has stayed away for
    `settle_s`, for at most `limit_s`; and once more when the process exits."""
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    deadline, gone_since = time.monotonic() + limit_s, None
    while time.monotonic() < deadline:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= settle_s:
            return
        time.sleep(0.05)


def os_error_code(err: BaseException) -> int | None:
    """The errno of the OS error behind `err` (an `OSError` in its chain, or TensorStore's
    `[os_error_code='28']` in a message), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os_error_code='?(\d+)", str(e))
        if found:
            return int(found.group(1))
        todo += [e.__cause__, e.__context__]
    return None


class _OrbaxLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


_ORBAX_LOG_FILTER = _OrbaxLogFilter()


def mute_orbax_noise() -> None:
    """Drop Orbax's log lines (absl), and the exceptions its aborted asynchronous reads and writes leave
    to `sys.unraisablehook` ("Event loop is closed", its coroutines dying at exit); other unraisable
    exceptions go to the hook installed before. Idempotent."""
    logging.getLogger("absl").addFilter(_ORBAX_LOG_FILTER)  # a no-op when already there
    previous = sys.unraisablehook
    if getattr(previous, "mutes_orbax", False):
        return

    def hook(unraisable: Any) -> None:
        value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook.mutes_orbax = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def make_manager(directory: str | Path, keep: int = 3) -> CheckpointManager:
    """The manager of a run's `checkpoints/` folder: keeps the latest `keep` checkpoints and the best by
    `best_metric` (the metrics given to `save`, written with the checkpoint)."""
    directory = Path(directory).absolute()
    # Naming every process makes Orbax's barriers across processes the coordinator's (key-value)
    # barriers, like `wait_for_all_processes`, rather than device collectives that would queue among
    # the training step's (with one process there are none). Orbax then leaves creating the directory to us.
    directory.mkdir(parents=True, exist_ok=True)
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy.AnyPreservationPolicy(
            [policy.LatestN(n=keep), policy.BestN(get_metric_fn=best_metric, n=1, keep_checkpoints_without_metrics=False)]
        ),
        # best_fn (with a preservation_policy it decides nothing else) makes Orbax write each checkpoint's
        # metrics to disk: without it a resumed run would read none, and BestN would drop the best.
        best_fn=best_metric,
        best_mode="max",
        create=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(active_processes=set(range(jax.process_count()))),
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return CheckpointManager(directory, options=options, item_handlers=handlers)


def has_checkpoint(workdir: str | Path) -> bool:
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return False
    with make_manager(directory) as manager:
        return manager.latest_step() is not None


def _crc(data: bytes | memoryview, crc: int = 0) -> str:
    return f"{zlib.crc32(data, crc):08x}"


def _local_copy(leaf: Any) -> Any:
    """A copy of `leaf` this process can read whole (a replicated array's local replica)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return leaf.addressable_data(0) if leaf.is_fully_replicated else multihost_utils.process_allgather(leaf, tiled=True)
    return leaf


def state_checksums(state: TrainState) -> dict[str, str]:
    """{array path: CRC-32 of its dtype, shape and bytes} for every array of `state` (one host copy);
    a scalar (the step) by its value, whatever its type. CRC-32, as Zarr's own checksums: it detects
    damage, not tampering."""
    items = jax.tree_util.tree_leaves_with_path(state)
    arrays = jax.device_get([_local_copy(leaf) for _, leaf in items])
    sums = {}
    for (path, _), array in zip(items, arrays):
        array = np.asarray(array)  # not ascontiguousarray: it makes a 0-d array 1-d
        if array.ndim == 0:  # the step: an int32 array when saved, maybe a Python int when restored
            crc = _crc(repr(array.item()).encode())
        else:
            crc = _crc(np.ascontiguousarray(array).reshape(-1).view(np.uint8), zlib.crc32(f"{array.dtype.str}{array.shape}".encode()))
        sums[jax.tree_util.keystr(path, simple=True, separator="/")] = crc
    return sums


def _meta_checksum(meta: dict[str, Any]) -> str:
    return _crc(json.dumps(meta, sort_keys=True).encode())


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    """Save `state` at its step (asynchronously) with `meta` (JSON: epoch, history, ...) and `metrics` (an
    epoch's validation metrics, which rank it for keeping; None for a mid-epoch checkpoint).

    The meta written also holds the checksums of `state`'s arrays and of `meta` (a host copy of the state
    here, once per checkpoint, not per step)."""
    checked = {**meta, CHECKSUMS_KEY: {"state": state_checksums(state), "meta": _meta_checksum(meta)}}
    manager.save(
        int(state.step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(checked)),
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
    )


def _meta_damage(meta: dict[str, Any]) -> str | None:
    """Pop the checksums from a restored `meta`; say how the meta differs from what was written, or None."""
    sums = meta.pop(CHECKSUMS_KEY, None)
    if sums is not None and _meta_checksum(meta) != sums.get("meta"):
        return "its run metadata differs from what was written"
    return None


def damage(state: TrainState, meta: dict[str, Any]) -> str | None:
    """How a restored checkpoint differs from what was written (per its checksums, popped from `meta`),
    or None when it matches. A checkpoint written without checksums is taken as it is."""
    sums = meta.get(CHECKSUMS_KEY)
    problem = _meta_damage(meta)
    if problem is not None or sums is None:
        return problem
    now = state_checksums(state)
    wrong = [path for path, crc in sums["state"].items() if now.get(path) != crc]
    if len(wrong) == 1:
        return f"{wrong[0]} differs from what was written"
    if wrong:
        return f"{wrong[0]} and {len(wrong) - 1} other array(s) differ from what was written"
    return None


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def latest_meta(workdir: str | Path) -> dict[str, Any]:
    """The run metadata (position, history) saved with a workdir's newest checkpoint whose metadata reads
    back as written (a damaged one is reported in one warning line)."""
    with make_manager(Path(workdir) / "checkpoints") as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise UserError(f"no checkpoint in {manager.directory}")
        for i, step in enumerate(steps):
            try:
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                problem = _meta_damage(meta)
                problem = None if problem is None else f"is damaged ({problem})"
            except Exception as err:  # noqa: BLE001 - an unreadable checkpoint: the one before it
                problem = f"is unreadable ({_reason(err)})"
            if problem is None:
                return meta
            if i + 1 == len(steps):
                raise UserError(f"checkpoint step {step} in {manager.directory} {problem}")
            print(f"mnist_jax: warning: checkpoint step {step} {problem}; using step {steps[i + 1]}", file=sys.stderr)
    raise AssertionError("unreachable")


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
    """Restore the checkpoint at `step` (default: the newest good one) into the structure and shardings of
    `like`; return it with its meta (as given to `save`).

    A newest checkpoint that cannot be read (truncated, corrupted or missing files) or that reads back
    other than it was written (damaged bytes: `damage`) is reported in one line on stderr and the one
    before it is used. With `step`, or when no checkpoint is good: UserError, one line.
    """
    candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not candidates:
        raise UserError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    for i, candidate in enumerate(candidates):
        try:
            _check_shapes(manager, candidate, abstract)
            restored = manager.restore(
                candidate,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
            )
            problem = damage(restored["state"], restored["meta"])
            problem = None if problem is None else ("damaged", problem)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
            problem = ("unreadable", _reason(err))
        if problem is None:
            return restored["state"], restored["meta"]
        kind, detail = problem
        if step is not None or i + 1 == len(candidates):
            raise UserError(f"checkpoint step {candidate} in {manager.directory} is {kind}: {detail}")
        print(f"mnist_jax: warning: checkpoint step {candidate} is {kind} ({detail}); using step {candidates[i + 1]}", file=sys.stderr)
    raise AssertionError("unreachable")
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
