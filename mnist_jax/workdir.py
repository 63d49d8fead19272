"""A run's folder: where it is, whether a run may start or resume there, who holds it, whether a resumed run has
anything left to do, and the runs/latest link."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import itertools
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import jax

from mnist_jax import checkpoint
from mnist_jax.config import Config, UserError

LOCK_FILE = ".lock"  # in the workdir: flock'ed by the process working there, and naming it


def default_workdir(dataset: str) -> Path:
    """The default run folder's name, runs/<dataset>-<timestamp> (`create_run_folder` makes it a new folder)."""
    return Path("runs") / f"{dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def create_run_folder(path: Path) -> Path:
    """Create `path` as a new folder, exclusively (parents as needed), and return it; if the name is taken (a run
    started in the same second, or any folder there), the first free one of `path-2`, `path-3`, ... instead.
    Two processes never get the same folder: the OS's mkdir fails for all but one of them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def prepare_workdir(config: Config, resume: bool) -> Path:
    """The run's folder, writable: without `config.workdir`, a new one (`create_run_folder(default_workdir(...))`);
    else a fresh run needs one without checkpoints, a resumed run one with checkpoints and a config.json that
    `config` does not contradict. UserError otherwise. Takes no lock (`claim_workdir` does)."""
    if config.workdir is None and jax.process_count() > 1:
        raise UserError("several processes need one --workdir on a shared file system (each would make its own default folder)")
    if config.workdir is None:
        if resume:
            raise UserError("nothing to resume: name the run's folder with --workdir")
        name = default_workdir(config.dataset)
        try:
            return create_run_folder(name)
        except OSError as err:
            raise UserError(f"workdir {name} is not writable: {err.strerror}") from None
    # Resolved: resuming through runs/latest must keep writing to that run when a newer run moves the link.
    workdir = Path(config.workdir).resolve()
    if resume and not checkpoint.has_checkpoint(workdir):
        raise UserError(f"nothing to resume: {workdir} has no checkpoint")
    if resume:
        conflicts = config.resume_conflicts(Config.load(workdir / "config.json"))
        if conflicts:
            changed = ", ".join(f"{k}={new!r} (the run has {old!r})" for k, (new, old) in conflicts.items())
            raise UserError(f"a resumed run continues as its config.json says; this config changes {changed}")
    if not resume and checkpoint.has_checkpoint(workdir):  # a fresh run would overwrite its config.json and mix checkpoints
        raise UserError(f"{workdir} already holds a run with checkpoints: continue it with --resume, or choose another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"workdir {workdir} is not writable: {err.strerror}") from None
    return workdir


@contextlib.contextmanager
def claim_workdir(config: Config, resume: bool) -> Iterator[Path]:
    """`prepare_workdir`, then hold the folder's lock (`lock_workdir`) until the block ends, checking it again
    under the lock (no other run started, finished or changed its config.json there in between)."""
    workdir = prepare_workdir(config, resume)
    with lock_workdir(workdir):
        prepare_workdir(dataclasses.replace(config, workdir=str(workdir)), resume)
        yield workdir


def describe_process() -> str:
    """This process, as a lock names its holder: pid, host, start of the hold, command line (one line)."""
    ours = sys.argv[0].endswith(os.path.join("mnist_jax", "__main__.py"))  # python -m mnist_jax ...
    command = shlex.join(["python", "-m", "mnist_jax", *sys.argv[1:]] if ours else sys.argv)
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return " ".join(f"pid {os.getpid()} on {socket.gethostname()} (since {since}): {command}".split())[:500]


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike) -> Iterator[None]:
    """Hold `workdir`'s lock while the block runs: one process at a time trains, resumes or writes in a run folder.

    The lock is an exclusive `fcntl.flock` on `<workdir>/.lock`, taken without waiting; the file names its holder
    (`describe_process`). A second holder (another process, or another call in this one) gets UserError in one
    line naming the first. The OS releases the lock when its holder ends in any way, kill -9 included, so a lock
    left by a dead process never blocks; on a normal release the file is removed. In a run of several processes,
    process 0 holds it for all of them (they share the folder). An unwritable folder is UserError."""
    if jax.process_index() != 0:
        yield
        return
    path = Path(workdir) / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"workdir {workdir} is not writable: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process (starting)"
            os.close(fd)
            raise UserError(f"{workdir} is in use by {holder}; wait for it to end, or choose another --workdir") from None
        except OSError as err:  # a file system without locks
            os.close(fd)
            raise UserError(f"cannot lock workdir {workdir}: {err.strerror}") from None
        # The holder before us may have removed the file between our open and our lock: hold the one at `path`.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, describe_process().encode() + b"\n", 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a process waiting on this file sees it is gone and tries again
        os.close(fd)


def completed_run(workdir: Path, epochs: int, trained_epochs: int, step_in_epoch: int, step: int) -> str | None:
    """Why a run resumed at its checkpoint (`trained_epochs` whole epochs and `step_in_epoch` steps, global
    `step`) has nothing to train for `epochs` in all: the line to say, if it is complete (its checkpoint is at
    or past `epochs` and its results, history.json and metrics.json, are written); None if it has epochs to
    train, or only its results to write. UserError if its checkpoint is past `epochs` and no results were
    written (a run cannot be cut back)."""
    at = trained_epochs == epochs and step_in_epoch == 0
    past = trained_epochs > epochs or (trained_epochs == epochs and step_in_epoch > 0)
    trained = f"{trained_epochs} epoch{'s' if trained_epochs != 1 else ''}" + (f" and {step_in_epoch} steps" if step_in_epoch else "")
    if not (at or past):
        return None
    if (workdir / "history.json").is_file() and (workdir / "metrics.json").is_file():
        return f"{workdir} is complete: {trained} trained (step {step}); nothing to do"
    if past:
        raise UserError(f"{workdir} has trained {trained} (step {step}), more than --epochs {epochs} asks for: resume with --epochs {trained_epochs + (step_in_epoch > 0)} or more")
    return None


def link_latest(workdir: Path) -> None:
    """Point `<workdir's parent>/latest` at `workdir` (atomically), unless `latest` is a real folder."""
    latest = workdir.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = workdir.parent / f".latest.{os.getpid()}.tmp"  # two runs may link at once
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(workdir.name)
        tmp.replace(latest)
