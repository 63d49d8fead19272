"""A run's folder is its own: every run gets a new folder, one process at a time works in it, a finished run is
left as it is, and a stop before training starts is one line.

- Runs started in the same second get folders of their own, each created exclusively.
- `train` (fresh or `--resume`) holds a lock on its workdir: a second process there is refused in one line
  naming the holder (pid, host, command), exit 2; the lock of a killed process does not block.
- `--resume` on a finished run, or with `--epochs` at or below what was trained, says so in one line
  (exit 0) and changes nothing.
- SIGINT/SIGTERM while the data loads or the steps compile: one line, exit 75, nothing trained or saved.
- A config.json with values of the wrong type or size, on `--resume`: one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mnist_jax import Config, fit
from mnist_jax.config import UserError
from mnist_jax.runtime import StopRequest
from mnist_jax.train import Preempted
from tests.conftest import REPO
from tests.test_reliability import Background, clone_run, committed_steps, data_flags, messages, run_cli, snapshot, wait_for

SMALL = ["--train-examples", "640", "--epochs", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_dirs) -> Path:
    """A finished run: 2 epochs of 10 steps (320 images); tests work on copies of it (`clone_run`)."""
    workdir = tmp_path_factory.mktemp("runs") / "finished"
    fit(Config(epochs=2, train_examples=320, workdir=str(workdir), **mnist_dirs), verbose=False)
    return workdir


# ----------------------------------------------------------------------------- a folder per run


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    from mnist_jax import workdir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workdir, "default_workdir", lambda dataset: Path("runs") / f"{dataset}-20300101-000000")  # one second
    (tmp_path / "runs" / "mnist-20300101-000000-2").mkdir(parents=True)  # taken already, empty: not this run's either
    first = workdir.prepare_workdir(Config(), resume=False)
    second = workdir.prepare_workdir(Config(), resume=False)
    third = workdir.prepare_workdir(Config(), resume=False)
    names = [p.name for p in (first, second, third)]
    assert names == ["mnist-20300101-000000", "mnist-20300101-000000-3", "mnist-20300101-000000-4"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in (first, second, third))


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_two_trains_started_together_write_two_new_folders(tmp_path, mnist_dirs):
    """Both runs use the default folder, runs/mnist-<timestamp>. The folders of the next two minutes exist
    already (empty, as an earlier run that failed early leaves them): a run may take none of them."""
    now = datetime.datetime.now()
    taken = [tmp_path / "runs" / f"mnist-{now + datetime.timedelta(seconds=s):%Y%m%d-%H%M%S}" for s in range(-2, 120)]
    for folder in taken:
        folder.mkdir(parents=True)
    runs = []
    try:
        for lr in ("0.001", "0.003"):
            cmd = [sys.executable, "-m", "mnist_jax", "train", *SMALL, "--learning-rate", lr, *data_flags(mnist_dirs)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's mnist_jax, from another folder
            runs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    workdirs = [Path(next(line.split(" : ", 1)[1] for line in out.splitlines() if line.startswith("Workdir : "))) for out, _ in outputs]
    workdirs = [w if w.is_absolute() else tmp_path / w for w in workdirs]
    assert workdirs[0] != workdirs[1] and not set(workdirs) & set(taken), workdirs
    assert all(not any(folder.iterdir()) for folder in taken)  # nothing written into a folder that was there
    rates = [Config.load(w / "config.json").learning_rate for w in workdirs]
    assert rates == [0.001, 0.003]  # each run's own config.json
    assert all(committed_steps(w) == [20] and (w / "metrics.json").is_file() for w in workdirs)


# ----------------------------------------------------------------------------- the workdir lock


def test_a_busy_workdir_is_refused_naming_its_holder_and_a_dead_holders_lock_does_not_block(tmp_path):
    from mnist_jax.workdir import lock_workdir

    workdir = tmp_path / "run"
    workdir.mkdir()
    with lock_workdir(workdir):
        # A second holder, even in this process (another open file): refused, naming this process.
        with pytest.raises(UserError, match=rf"^{workdir} is in use by pid {os.getpid()} on {socket.gethostname()} \(") as err:
            with lock_workdir(workdir):
                pass
        assert "\n" not in str(err.value) and "pytest" in str(err.value)  # one line, with the holder's command
    assert list(workdir.iterdir()) == []  # released, and its file removed
    # A holder killed with SIGKILL holds nothing: the OS released its lock (the file it left stays).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(workdir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'pid %d on a host (since then): python -c' % os.getpid())\n"
        "print('locked', flush=True)\ntime.sleep(300)\n"
    )], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"is in use by pid {holder.pid} on a host"):
            with lock_workdir(workdir):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with lock_workdir(workdir):
        fd = os.open(workdir / ".lock", os.O_RDWR)  # another open file of the lock: the lock is really held
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert not (workdir / ".lock").exists()


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_a_second_train_on_a_busy_workdir_is_refused_in_one_line_and_a_killed_holder_does_not_block(tmp_path, mnist_dirs, finished):
    workdir = clone_run(finished, tmp_path / "run")  # 10 steps an epoch, 2 done
    resume = ["train", "--resume", "--workdir", workdir, "--epochs", "500", *data_flags(mnist_dirs)]
    with Background(resume, tmp_path / "first") as first:
        wait_for(lambda: "Epoch 4/500:" in first.stderr, first, 240, "training in the first process")
        second = run_cli(*resume, timeout=120)  # without a lock, it would train on (and past this timeout)
        assert first.alive(), first.stderr[-2000:]
        assert second.returncode == 2, second.stderr[-2000:]
        lines = messages(second.stderr)
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        holder = f"pid {first.proc.pid} on {socket.gethostname()} ("
        assert lines[0].startswith(f"mnist_jax: error: {workdir} is in use by {holder}"), lines[0]
        assert "train --resume --workdir" in lines[0], lines[0]  # the holder's command
        first.proc.kill()  # SIGKILL: no chance to clean up
        first.proc.wait(timeout=60)
    # Its lock died with it: the next resume trains (and stops cleanly on SIGTERM).
    with Background(resume, tmp_path / "third") as third:
        wait_for(lambda: "Resumed from" in (tmp_path / "third" / "stdout.txt").read_text() or "/500:" in third.stderr, third, 240, "training after the holder was killed")
        third.proc.send_signal(signal.SIGTERM)
        assert third.proc.wait(timeout=120) == 75, third.stderr[-2000:]
        assert "is in use" not in third.stderr
    assert not (workdir / ".lock").exists()


# ----------------------------------------------------------------------------- a finished run is left as it is


def _run_files(workdir: Path) -> dict:
    return snapshot(workdir)


def test_resuming_a_finished_run_or_to_fewer_epochs_changes_nothing(tmp_path, mnist_dirs, capsys):
    config = Config(epochs=2, train_examples=64, workdir=str(tmp_path / "run"), **mnist_dirs)
    trained, _ = fit(config, verbose=False)
    before = _run_files(tmp_path / "run")
    for epochs in (2, 1):  # as planned; fewer than were trained
        capsys.readouterr()
        state, history = fit(dataclasses.replace(config, epochs=epochs), resume=True)
        out = capsys.readouterr().out.splitlines()
        assert out == [f"{tmp_path / 'run'} is complete: 2 epochs trained (step 4); nothing to do"], out
        assert int(state.step) == 4 and len(history["val_accuracy"]) == 2
        assert _run_files(tmp_path / "run") == before, f"--epochs {epochs} changed the run"
    # A run stopped past --epochs, its results never written: refused, nothing changed.
    for name in ("history.json", "metrics.json"):
        (tmp_path / "run" / name).unlink()
    before = _run_files(tmp_path / "run")
    with pytest.raises(UserError, match=r"has trained 2 epochs \(step 4\), more than --epochs 1 asks for"):
        fit(dataclasses.replace(config, epochs=1), resume=True, verbose=False)
    assert _run_files(tmp_path / "run") == before


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_train_resume_of_a_finished_run_says_so_in_one_line_exit_0_and_changes_nothing(tmp_path, mnist_dirs, finished):
    workdir = clone_run(finished, tmp_path / "run")
    before = _run_files(workdir)
    for extra in ([], ["--epochs", "1"], ["--epochs", "2"]):
        result = run_cli("train", "--resume", "--workdir", workdir, *extra, *data_flags(mnist_dirs), timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.splitlines() == [f"{workdir} is complete: 2 epochs trained (step 20); nothing to do"], result.stdout
        assert messages(result.stderr) == [], result.stderr[-2000:]
        assert _run_files(workdir) == before, f"train --resume {extra} changed the run"


# ----------------------------------------------------------------------------- a stop before training starts


def test_a_stop_requested_before_training_starts_ends_before_any_step(tmp_path, mnist_dirs):
    config = Config(epochs=2, train_examples=64, workdir=str(tmp_path / "run"), **mnist_dirs)
    with pytest.raises(Preempted, match=r"^stopped by SIGINT before training started; nothing was trained or saved$"):
        fit(config, verbose=False, stop=StopRequest(signal.SIGINT))
    assert committed_steps(tmp_path / "run") == []
    fit(dataclasses.replace(config, epochs=1), verbose=False)  # the same folder takes the run again
    before = _run_files(tmp_path / "run")
    with pytest.raises(Preempted, match=r"^stopped by SIGTERM before training started; the run is as it was \(checkpoint step 2 in .*\); continue with --resume$"):
        fit(config, resume=True, verbose=False, stop=StopRequest(signal.SIGTERM))
    assert _run_files(tmp_path / "run") == before


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_ctrl_c_while_compiling_is_one_line_exit_75_and_nothing_saved(tmp_path, mnist_dirs):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MNIST_JAX_COMPILATION_CACHE": ""}  # compiling takes seconds
    cmd = [sys.executable, "-m", "mnist_jax", "train", *SMALL, "--workdir", str(workdir), *data_flags(mnist_dirs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        for line in proc.stdout:  # the model's summary is printed right before compiling
            if line.startswith("Total params"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err[-2000:]
    assert messages(err) == ["mnist_jax: stopped by SIGINT before training started; nothing was trained or saved"], err[-2000:]
    assert "Compiled in" not in out or "Epoch 1/1 -" not in out
    assert committed_steps(workdir) == [] and not (workdir / "metrics.json").exists()


def test_ctrl_c_while_python_imports_jax_is_one_line_exit_130(tmp_path):
    # 0.3 s after the start the interpreter is still importing JAX (over a second): no handler of ours yet.
    cmd = [sys.executable, "-m", "mnist_jax", "train", *SMALL, "--workdir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    try:
        threading.Timer(0.3, proc.send_signal, (signal.SIGINT,)).start()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err.splitlines()) == (130, ["mnist_jax: interrupted"]), err[-2000:]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- a damaged config.json


def test_a_config_with_layer_sizes_below_1_is_refused_naming_the_flag(tmp_path):
    path = tmp_path / "config.json"
    for name, flag in (("dense_features", "--dense-features"), ("num_classes", "--num-classes"), ("conv1_kernel", "--conv1-kernel")):
        values = Config().to_dict()
        values["model"][name] = 0
        path.write_text(json.dumps(values))
        with pytest.raises(UserError, match=f"^{flag} must be (>= 1|at least 10 for mnist), got 0$"):
            Config.read(path).validate()


@pytest.mark.slow  # a whole-process scenario (three): make test-slow
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("epochs", "2", "config key 'epochs' must be int, got '2'"),
        ("model", {"dense_features": -5}, "--dense-features must be >= 1, got -5"),
        ("model", {"num_classes": 0}, "--num-classes must be "),
    ],
)
def test_resume_with_a_config_json_of_wrong_values_is_one_line_exit_2(key, value, message, tmp_path, mnist_dirs, finished):
    workdir = clone_run(finished, tmp_path / "run")
    saved = json.loads((workdir / "config.json").read_text())
    if key == "model":
        saved["model"].update(value)
    else:
        saved[key] = value
    (workdir / "config.json").write_text(json.dumps(saved))
    before = snapshot(workdir)
    result = run_cli("train", "--resume", "--workdir", workdir, "--epochs", "2", *data_flags(mnist_dirs), timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist_jax: error: ") and message in lines[0], result.stderr[-2000:]
    assert snapshot(workdir) == before
