"""A run's folder: where it is, whether a run may start or resume there, and the runs/latest link."""

from __future__ import annotations

import datetime
from pathlib import Path

import jax

from mnist_jax import checkpoint
from mnist_jax.config import Config, UserError


def default_workdir(dataset: str) -> Path:
    return Path("runs") / f"{dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def prepare_workdir(config: Config, resume: bool) -> Path:
    """The run's folder, resolved and writable: a fresh run needs one without checkpoints, a resumed run
    one with checkpoints and a config.json that `config` does not contradict. UserError otherwise."""
    if config.workdir is None and jax.process_count() > 1:
        raise UserError("several processes need one --workdir on a shared file system (each would make its own default folder)")
    # Resolved: resuming through runs/latest must keep writing to that run when a newer run moves the link.
    workdir = Path(config.workdir).resolve() if config.workdir else default_workdir(config.dataset)
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


def link_latest(workdir: Path) -> None:
    """Point `<workdir's parent>/latest` at `workdir` (atomically), unless `latest` is a real folder."""
    latest = workdir.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = workdir.parent / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(workdir.name)
        tmp.replace(latest)
