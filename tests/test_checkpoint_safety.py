"""Checkpoints are never lost or silently wrong (issue 23).

- The best checkpoint (by val_accuracy) survives any number of resumes and mid-epoch checkpoints.
- Damaged checkpoint bytes are caught on every restore path (resume, evaluate, predict): one warning
  line and the previous checkpoint, or one error line when that checkpoint was asked for by name.
- A disk that fills up while a checkpoint is written: one line naming the last good checkpoint,
  exit 1, no temporary folder left, the earlier checkpoint intact.
- A newest checkpoint missing its manifest: one warning line, not Orbax's asyncio noise.

The fast tests use Orbax's manager directly on states trained on real MNIST; the whole-run ones
(`make test-slow`) train `--train-examples 640`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mnist_jax import Config, ModelConfig, UserError, checkpoint, cli, create_train_state, fit, restore_checkpoint, train_step
from mnist_jax.runtime import StopRequest
from mnist_jax.train import Preempted
REPO = Path(__file__).resolve().parent.parent
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _trained_states(mnist_small, n: int) -> list:
    """The states after 1..n Adam steps of the default model on real MNIST batches of 32."""
    train, _ = mnist_small
    state, states = create_train_state(jax.random.key(0), Config()), []
    for i in range(n):
        batch = {k: train[k][32 * i : 32 * (i + 1)] for k in ("image", "label")}
        state, _ = train_step(state, batch, jax.random.key(i))
        states.append(state)
    return states


@pytest.fixture(scope="module")
def two_states(mnist_small) -> list:
    return _trained_states(mnist_small, 2)


def _save_run(workdir: Path, states: list) -> None:
    """A run folder holding a checkpoint of each state (at its step) and its config.json."""
    Config(workdir=str(workdir)).save(workdir / "config.json")
    with checkpoint.make_manager(workdir / "checkpoints") as manager:
        for state in states:
            checkpoint.save(manager, state, {"epoch": int(state.step), "history": {"loss": [0.5]}})


def _damage(step_dir: Path) -> Path:
    """Flip 8 bytes in the middle of the step's largest array data file (as a failing disk or copy would)."""
    files = [p for p in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir() if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    with target.open("r+b") as f:
        f.seek(target.stat().st_size // 2)
        old = f.read(8)
        f.seek(-len(old), 1)
        f.write(bytes(b ^ 0xFF for b in old))
    return target


def _stderr_lines(capfd) -> list[str]:
    gc.collect()  # Orbax's abandoned async reads report (if they do) when collected
    time.sleep(0.5)
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- class 1: the best survives


def test_best_checkpoint_survives_resumes_and_mid_epoch_checkpoints(tmp_path):
    """Epoch 1 ends at step 20 (the only checkpoint with a val_accuracy), then every step is checkpointed,
    across three processes (each a new manager on the folder, as `--resume` makes): step 20 stays."""
    state = create_train_state(jax.random.key(0), Config(model=ModelConfig(conv1_features=4, conv2_features=4, dense_features=8)))
    directory = tmp_path / "checkpoints"
    for first, last in [(19, 22), (23, 24), (25, 26)]:
        with checkpoint.make_manager(directory, keep=2) as manager:
            for step in range(first, last + 1):
                metrics = {"accuracy": 0.9, "loss": 0.3} if step == 20 else None
                checkpoint.save(manager, state.replace(step=step), {"epoch": 1, "step": step}, metrics=metrics)
    with checkpoint.make_manager(directory, keep=2) as manager:
        assert sorted(manager.all_steps()) == [20, 25, 26]
        assert manager.best_step() == 20
        assert manager.metrics(20) == {"accuracy": 0.9, "loss": 0.3}


@pytest.mark.slow
def test_best_epoch_checkpoint_survives_two_stopped_resumes(tmp_path, mnist_dirs, monkeypatch):
    """`train --epochs 2 --checkpoint-every-steps 1`, stopped at step 26, resumed, stopped at 32: the
    epoch-end checkpoint (step 20) is still there, as the best, and the run finishes from it."""
    workdir = tmp_path / "run"
    config = Config(train_examples=640, epochs=2, checkpoint_every_steps=1, workdir=str(workdir), tensorboard=False, **mnist_dirs)
    real_save = checkpoint.save
    for stop_at, resume in [(26, False), (32, True)]:
        stop = StopRequest()

        def save(manager, state, meta, metrics=None, stop=stop, stop_at=stop_at):  # a SIGTERM right after step `stop_at`'s checkpoint
            real_save(manager, state, meta, metrics)
            if int(state.step) == stop_at:
                stop.signal = signal.SIGTERM

        monkeypatch.setattr(checkpoint, "save", save)
        with pytest.raises(Preempted, match=f"at step {stop_at}"):
            fit(config, resume=resume, verbose=False, stop=stop)
    with checkpoint.make_manager(workdir / "checkpoints") as manager:
        assert sorted(manager.all_steps()) == [20, 30, 31, 32]
        assert manager.best_step() == 20
    assert int(restore_checkpoint(workdir / "checkpoints" / "20").step) == 20


# ----------------------------------------------------------------------------- class 4: damaged bytes


def test_damaged_array_bytes_are_reported_and_the_previous_checkpoint_used(tmp_path, two_states, capfd):
    states = two_states
    _save_run(tmp_path, states)
    _damage(tmp_path / "checkpoints" / "2")
    capfd.readouterr()

    restored = restore_checkpoint(tmp_path)  # evaluate, predict and analyze load a run this way
    assert int(restored.step) == 1
    assert _leaves_equal(restored.params, states[0].params) and _leaves_equal(restored.opt_state, states[0].opt_state)
    err = _stderr_lines(capfd)
    assert len(err) == 1, err
    assert err[0].startswith("mnist_jax: warning: checkpoint step 2 is damaged") and err[0].endswith("using step 1"), err

    with pytest.raises(UserError, match=r"checkpoint step 2 in .* is damaged"):  # asked for by name: no fallback
        restore_checkpoint(tmp_path / "checkpoints" / "2")

    with checkpoint.make_manager(tmp_path / "checkpoints") as manager:  # resume's path
        state, meta = checkpoint.restore_latest(manager, states[1])
    assert int(state.step) == 1 and meta == {"epoch": 1, "history": {"loss": [0.5]}}
    assert _leaves_equal(state.opt_state, states[0].opt_state)


def test_damaged_metadata_is_reported(tmp_path, two_states, capfd):
    """The run metadata saved with a checkpoint (position, history) is checked too: still valid JSON,
    another number."""
    states = two_states
    _save_run(tmp_path, states)
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta_file.write_text(meta_file.read_text().replace("0.5", "0.7"))
    capfd.readouterr()
    with checkpoint.make_manager(tmp_path / "checkpoints") as manager:
        state, meta = checkpoint.restore_latest(manager, states[1])
    assert int(state.step) == 1 and meta["history"] == {"loss": [0.5]}
    err = _stderr_lines(capfd)
    assert len(err) == 1 and "checkpoint step 2 is damaged" in err[0], err
    assert checkpoint.latest_meta(tmp_path)["epoch"] == 1  # compare and analyze's history


@pytest.mark.slow
def test_damaged_checkpoint_on_every_load_path(tmp_path, mnist_dirs, mnist_small, capfd):
    """A real 2-epoch run, its newest checkpoint (step 40) damaged: evaluate and predict warn in one line
    and use step 20; evaluate of step 40 by name is one error line, exit 2; --resume starts from 20."""
    workdir = tmp_path / "run"
    config = Config(train_examples=640, epochs=2, workdir=str(workdir), tensorboard=False, **mnist_dirs)
    _, history = fit(config, verbose=False)
    _damage(workdir / "checkpoints" / "40")
    capfd.readouterr()

    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    out = capfd.readouterr()
    assert f"Test Accuracy : {history['val_accuracy'][0]:.4f}" in out.out  # step 20's, not step 40's
    err = [line for line in out.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("mnist_jax: warning: checkpoint step 40 is damaged") and err[0].endswith("using step 20"), err

    assert cli.main(["evaluate", "--workdir", str(workdir / "checkpoints" / "40")]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("mnist_jax: error: checkpoint step 40") and "damaged" in err[0], err

    from PIL import Image

    image = tmp_path / "digit.png"
    digit = mnist_small[1]["image"][0, :, :, 0]  # a test digit
    Image.fromarray(digit if digit.dtype == np.uint8 else (digit * 255).astype(np.uint8)).save(image)
    assert cli.main(["predict", "--workdir", str(workdir), str(image)]) == 0
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "checkpoint step 40 is damaged" in err[0] and err[0].endswith("using step 20"), err

    state, _ = fit(dataclasses.replace(config), resume=True, verbose=False)
    err = capfd.readouterr().err
    assert "checkpoint step 40 is damaged" in err and "using step 20" in err
    assert int(state.step) == 40 and (workdir / "unreadable-checkpoints" / "40").is_dir()
    assert int(restore_checkpoint(workdir).step) == 40  # the rewritten step 40 verifies


# ----------------------------------------------------------------------------- missing manifest


def test_missing_manifest_is_one_warning_line(tmp_path, two_states, capfd, monkeypatch):
    """The fallback used to print ~280 lines: Orbax's abandoned async reads failing on a closed event loop,
    reported through sys.unraisablehook (which pytest would otherwise swallow: recorded here instead)."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    checkpoint.mute_orbax_noise()  # as the CLI does at its start
    _save_run(tmp_path, two_states)
    (tmp_path / "checkpoints" / "2" / "state" / "manifest.ocdbt").unlink()
    capfd.readouterr()
    assert int(restore_checkpoint(tmp_path).step) == 1
    assert int(restore_checkpoint(tmp_path).step) == 1  # and again: nothing left over from the first
    err = _stderr_lines(capfd)
    assert unraisable == []
    assert len(err) == 2, err
    assert all(line.startswith("mnist_jax: warning: checkpoint step 2 is unreadable") and line.endswith("using step 1") for line in err), err


# ----------------------------------------------------------------------------- class 7: disk full


def _namespace_prefix() -> list[str] | None:
    """`unshare` arguments giving a private mount namespace where tmpfs can be mounted (unprivileged
    through a user namespace, or as root), or None where the machine allows neither."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=1m tmpfs /tmp"],
                               capture_output=True, timeout=30)  # fmt: skip
        if probe.returncode == 0:
            return prefix
    return None


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line(tmp_path, mnist_dirs):
    """A run on a 50 MiB tmpfs: the epoch-1 checkpoint (34 MiB) fits, epoch 2's does not. One line naming
    the disk and the last good checkpoint, exit 1, no temporary folder, step 20 intact and verified."""
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("no mount namespace here (unshare -rm / -m not permitted): cannot mount a small tmpfs")
    mount, kept, out, err = tmp_path / "disk", tmp_path / "kept", tmp_path / "stdout", tmp_path / "stderr"
    mount.mkdir()
    train = [sys.executable, "-m", "mnist_jax", "train", "--train-examples", "640", "--epochs", "2",
             "--data-dir", mnist_dirs["data_dir"], "--workdir", f"{mount}/run"]  # fmt: skip
    script = (f"mount -t tmpfs -o size=50m tmpfs {mount} || exit 99; {' '.join(train)} > {out} 2> {err}; rc=$?; "
              f"cp -a {mount}/run {kept}; exit $rc")  # the tmpfs goes with the namespace: keep a copy  # fmt: skip
    proc = subprocess.run([*prefix, "sh", "-c", script], cwd=REPO, timeout=600)
    stderr = err.read_text()
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Event loop" not in stderr and "ERROR:absl" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("Epoch ")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("mnist_jax: error: disk full") and "step 40" in lines[0], lines
    assert f"last good checkpoint: step 20 in {mount}/run/checkpoints" in lines[0], lines
    assert not list((kept / "checkpoints").glob(f"*{TMP_SUFFIX}*"))
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["20"]
    assert int(restore_checkpoint(kept / "checkpoints" / "20").step) == 20
    assert json.loads((kept / "config.json").read_text())["epochs"] == 2
