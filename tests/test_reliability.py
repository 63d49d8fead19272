"""Reliability, as a user meets it through the command line.

- `kill -9` at a random moment, then `train --resume`: the final parameters, optimizer state
  and history are bit-identical to an uninterrupted run (CPU).
- SIGTERM: the current step finishes, a checkpoint is written, exit code 75 within seconds;
  resuming from it is the same run. A second SIGINT ends the process at once.
- A partly written checkpoint (killed during save) is never picked; a truncated latest
  checkpoint is reported in one line and the one before it is used.
- A diverging learning rate stops with exit code 3, naming the step, keeping the last good checkpoint.
- Every bad input is one line on stderr, a non-zero exit, no traceback, and no earlier
  checkpoint deleted or changed (`--debug` shows the traceback).

Every subprocess is bounded by a timeout and killed (with its process group) in `finally`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mnist_jax import Config, fit, restore_checkpoint
from tests.conftest import REPO, tb_steps

# 960 images, batch 32: 30 steps an epoch, 60 in all. Checkpoints at the multiples of 7
# inside an epoch and at each epoch end, so most of them are mid-epoch.
RUN = ["--train-examples", "960", "--epochs", "2", "--checkpoint-every-steps", "7"]
CHECKPOINT_STEPS = [7, 14, 21, 28, 30, 35, 42, 49, 56, 60]
FINAL_STEP = 60
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # where Orbax writes a checkpoint before its atomic rename


# ----------------------------------------------------------------------------- helpers


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "mnist_jax", *map(str, args)]


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), capture_output=True, text=True, cwd=REPO, timeout=timeout)


class Background:
    """`python -m mnist_jax ...` in its own process group, output to files; killed with its group on exit."""

    def __init__(self, args, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logdir / "stdout.txt", logdir / "stderr.txt"
        self._out, self._err = self.out_path.open("w"), self.err_path.open("w")
        self.proc = subprocess.Popen(_cmd(*args), stdout=self._out, stderr=self._err, cwd=REPO, start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._out.close()
        self._err.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()


def step_names(workdir: Path) -> list[str]:
    directory = workdir / "checkpoints"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def committed_steps(workdir: Path) -> list[int]:
    return sorted(int(n) for n in step_names(workdir) if n.isdigit())


def partial_saves(workdir: Path) -> list[str]:
    return [n for n in step_names(workdir) if TMP_SUFFIX in n]


def highest_step_seen(workdir: Path) -> int:
    """The highest step with a folder, committed or still being written."""
    steps = [int(m.group(1)) for n in step_names(workdir) if (m := re.match(r"(\d+)", n))]
    return max(steps, default=-1)


def wait_for(predicate, proc: Background, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.alive(), f"training exited ({proc.proc.returncode}) before {what}:\n{proc.stderr[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


_HASHES: dict[tuple, str] = {}


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """{path: (size, sha256)} of every file under `roots` (hashes cached by inode, size, mtime and ctime)."""
    files = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.is_symlink():
                st = path.stat()
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if key not in _HASHES:
                    _HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()
                files[str(path)] = (st.st_size, _HASHES[key])
    return files


def clone_run(src: Path, dst: Path) -> Path:
    """A copy of a run: checkpoint files hard-linked (cheap; an in-place write would show in `src` too), the rest copied."""
    shutil.copytree(src, dst, copy_function=os.link, symlinks=True)
    for path in dst.iterdir():
        if path.is_file():
            content = path.read_bytes()
            path.unlink()
            path.write_bytes(content)
    return dst


def materialize(directory: Path) -> None:
    """Replace the hard links under `directory` by private copies, so they can be damaged safely."""
    for path in directory.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            path.unlink()
            path.write_bytes(content)


def messages(stderr: str) -> list[str]:
    """stderr lines other than tqdm's progress bars."""
    lines = (line.strip() for line in re.split(r"[\r\n]", stderr))
    return [line for line in lines if line and not re.match(r"Epoch \d+/\d+:", line)]


def assert_trees_identical(a, b, what: str) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}{jax.tree_util.keystr(path)}"
        assert np.array_equal(x, y), f"{what}{jax.tree_util.keystr(path)} differs"


def assert_same_run(workdir: Path, reference: dict) -> None:
    """The final checkpoint and history of `workdir` equal the uninterrupted reference run's, bit for bit."""
    state = restore_checkpoint(workdir)
    assert int(state.step) == FINAL_STEP
    assert_trees_identical(state.params, reference["state"].params, "params")
    assert_trees_identical(state.opt_state, reference["state"].opt_state, "opt_state")
    history = json.loads((workdir / "history.json").read_text())
    for key in HISTORY_KEYS:
        assert history[key] == reference["history"][key], key
    assert json.loads((workdir / "metrics.json").read_text()) == reference["metrics"]
    assert not partial_saves(workdir), step_names(workdir)
    assert tb_steps(workdir / "tb") == tb_steps(reference["workdir"] / "tb")  # TensorBoard's curves: no step twice, none missing


def data_flags(dirs) -> list[str]:
    return ["--data-dir", dirs["data_dir"], "--manual-dir", dirs["manual_dir"]]


# ----------------------------------------------------------------------------- the uninterrupted run


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dirs) -> dict:
    """The uninterrupted run everything is compared with (a CLI subprocess, like the interrupted ones)."""
    workdir = tmp_path_factory.mktemp("reliability") / "reference"
    result = run_cli("train", *RUN, "--workdir", workdir, *data_flags(mnist_dirs))
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "workdir": workdir,
        "state": restore_checkpoint(workdir),
        "history": json.loads((workdir / "history.json").read_text()),
        "metrics": json.loads((workdir / "metrics.json").read_text()),
        "steps": committed_steps(workdir),
    }


# ----------------------------------------------------------------------------- kill -9, SIGTERM, SIGINT


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, tmp_path, mnist_dirs):
    seed = int(os.environ.get("MNIST_JAX_KILL_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    target, delay = rng.choice(CHECKPOINT_STEPS), rng.uniform(0.0, 1.0)
    workdir = tmp_path / "run"
    with Background(["train", *RUN, "--workdir", workdir, *data_flags(mnist_dirs)], tmp_path / "killed") as run:
        wait_for(lambda: highest_step_seen(workdir) >= target, run, 240, f"checkpoint folder for step {target}")
        time.sleep(delay)
        alive = run.alive()
        if alive:
            os.killpg(run.proc.pid, signal.SIGKILL)
        assert run.proc.wait(timeout=30) == (-signal.SIGKILL if alive else 0)
    committed, partial = committed_steps(workdir), partial_saves(workdir)
    record = f"seed={seed} target={target} delay={delay:.2f}s alive={alive} committed={committed} partial={partial}"

    if not committed:  # killed while the first checkpoint was being written: nothing to resume, start again
        result = run_cli("train", "--resume", "--workdir", workdir, *data_flags(mnist_dirs))
        assert result.returncode == 2 and "nothing to resume" in result.stderr, record + result.stderr
        resumed_from = "scratch"
        result = run_cli("train", *RUN, "--workdir", workdir, *data_flags(mnist_dirs))
    else:
        result = run_cli("train", "--resume", "--workdir", workdir, *data_flags(mnist_dirs))
        resumed_from = re.search(r"Resumed from .* at step (\d+)", result.stdout)
        resumed_from = resumed_from.group(1) if resumed_from else "?"
    print(f"\nkill/resume: {record} resumed_from={resumed_from} rc={result.returncode}")
    assert result.returncode == 0, record + "\n" + result.stderr[-3000:]
    assert messages(result.stderr) == [], record + "\n" + result.stderr[-3000:]
    assert_same_run(workdir, reference)


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_sigterm_finishes_the_step_saves_and_exits_75_then_resume_is_identical(reference, tmp_path, mnist_dirs):
    workdir = tmp_path / "run"
    with Background(["train", *RUN, "--workdir", workdir, *data_flags(mnist_dirs)], tmp_path / "term") as run:
        wait_for(lambda: committed_steps(workdir), run, 240, "first checkpoint")
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        returncode = run.proc.wait(timeout=60)
        seconds = time.monotonic() - sent
        stderr = run.stderr
    assert returncode == 75, stderr[-2000:]
    assert seconds < 10, f"took {seconds:.1f} s to stop"
    lines = messages(stderr)
    assert len(lines) == 1, stderr[-2000:]
    stop = re.fullmatch(r"mnist_jax: stopped by SIGTERM at step (\d+); checkpoint in (.+); continue with --resume", lines[0])
    assert stop, lines[0]
    step = int(stop.group(1))
    print(f"\nsigterm: stopped at step {step}, {seconds:.1f} s after the signal")
    assert Path(stop.group(2)) == (workdir / "checkpoints").absolute()
    assert step in committed_steps(workdir) and step < FINAL_STEP and not partial_saves(workdir)
    assert not (workdir / "metrics.json").exists()

    result = run_cli("train", "--resume", "--workdir", workdir, *data_flags(mnist_dirs))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {step} " in result.stdout
    assert_same_run(workdir, reference)


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_a_second_sigint_ends_the_process_at_once(tmp_path, mnist_dirs):
    workdir = tmp_path / "run"
    with Background(["train", *RUN, "--workdir", workdir, *data_flags(mnist_dirs)], tmp_path / "int") as run:
        wait_for(lambda: committed_steps(workdir), run, 240, "first checkpoint")
        first = time.monotonic()
        # Python runs a handler once for signals that arrive while it is busy in one C call,
        # so keep pressing Ctrl-C (every 0.25 s) until the process is gone.
        sent = 0
        while run.alive() and time.monotonic() - first < 10:
            run.proc.send_signal(signal.SIGINT)
            sent += 1
            time.sleep(0.25)
        returncode = run.proc.wait(timeout=30)
        seconds = time.monotonic() - first
        stderr = run.stderr
    print(f"\nsigint: {sent} signals, gone {seconds:.2f} s after the first")
    assert returncode == -signal.SIGINT, f"{returncode}: {stderr[-2000:]}"
    assert seconds < 5, f"took {seconds:.1f} s"


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_a_partly_written_checkpoint_is_never_picked(reference, tmp_path):
    """Killed while saving: Orbax writes `<step>.orbax-checkpoint-tmp` and renames it only when complete."""
    workdir = clone_run(reference["workdir"], tmp_path / "run")
    latest, previous = reference["steps"][-1], reference["steps"][-2]
    partial = workdir / "checkpoints" / f"{latest}{TMP_SUFFIX}"
    (workdir / "checkpoints" / str(latest)).rename(partial)
    for i, path in enumerate(sorted(p for p in partial.rglob("*") if p.is_file())):
        if i % 2:
            path.unlink()  # half the files never got written
    (workdir / "history.json").unlink()
    (workdir / "metrics.json").unlink()

    state = restore_checkpoint(workdir)  # silently the newest committed one
    assert int(state.step) == previous
    assert_trees_identical(state.params, restore_checkpoint(reference["workdir"] / "checkpoints" / str(previous)).params, "params")

    config = Config.load(workdir / "config.json")
    fit(dataclasses.replace(config, workdir=str(workdir)), resume=True, verbose=False)
    assert_same_run(workdir, reference)  # the step is written again, properly, and no partial folder is left


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_a_truncated_latest_checkpoint_is_reported_in_one_line_and_the_previous_one_used(reference, tmp_path, mnist_dirs, capfd):
    workdir = clone_run(reference["workdir"], tmp_path / "run")
    latest, previous = reference["steps"][-1], reference["steps"][-2]
    damaged = workdir / "checkpoints" / str(latest)
    materialize(damaged)
    for path in damaged.rglob("*"):
        if path.is_file():
            os.truncate(path, path.stat().st_size // 2)

    capfd.readouterr()
    state = restore_checkpoint(workdir)
    assert int(state.step) == previous
    assert_trees_identical(state.params, restore_checkpoint(reference["workdir"] / "checkpoints" / str(previous)).params, "params")
    warning = capfd.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and f"checkpoint step {latest} is unreadable" in warning[0], warning
    assert warning[0].endswith(f"using step {previous}"), warning

    damaged_sizes = {p.relative_to(damaged): p.stat().st_size for p in damaged.rglob("*") if p.is_file()}
    result = run_cli("train", "--resume", "--workdir", workdir, *data_flags(mnist_dirs))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = messages(result.stderr)
    assert len(lines) == 2 and lines[0].startswith(f"mnist_jax: warning: checkpoint step {latest} is unreadable"), lines
    aside = workdir.resolve() / "unreadable-checkpoints"
    assert lines[1] == f"mnist_jax: warning: moved the unreadable checkpoint(s) to {aside}", lines
    assert f"at step {previous} " in result.stdout
    assert_same_run(workdir, reference)  # and the damaged step was replaced by a readable one
    # The damaged checkpoint was moved aside whole, not deleted.
    assert {p.relative_to(aside / str(latest)): p.stat().st_size for p in (aside / str(latest)).rglob("*") if p.is_file()} == damaged_sizes


# ----------------------------------------------------------------------------- NaN guard


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_a_diverging_learning_rate_stops_with_exit_3_naming_the_step(tmp_path, mnist_dirs):
    # Adam moves every weight by about the learning rate on its first step: at 1e30 the
    # step-1 loss (initial weights) is finite, the step-2 forward pass overflows to inf/NaN.
    workdir = tmp_path / "run"
    args = ["--learning-rate", "1e30", "--checkpoint-every-steps", "1", "--train-examples", "320", "--epochs", "1"]
    result = run_cli("train", *args, "--workdir", workdir, *data_flags(mnist_dirs))
    assert result.returncode == 3, result.stderr[-3000:]
    lines = messages(result.stderr)
    assert lines == [
        f"mnist_jax: error: loss became NaN/Inf at step 2; stopped (last good checkpoint: step 1 in {(workdir / 'checkpoints').absolute()})"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert step_names(workdir) == ["1"]  # the last good checkpoint is kept; none after it, not even partly
    state = restore_checkpoint(workdir)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
    assert not (workdir / "history.json").exists() and not (workdir / "metrics.json").exists()


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def places(reference, tmp_path_factory, mnist_dirs) -> dict:
    """Runs, workdirs and manual dirs for the bad-input table; every case gets a fresh, empty tfds data_dir."""
    root = tmp_path_factory.mktemp("bad-input")
    real = Path(mnist_dirs["manual_dir"])
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    bad_file = "t10k-labels-idx1-ubyte.gz"  # the smallest: damaged copies are cheap
    good = real / bad_file

    def manual(name: str, files=names, content: bytes | None = None) -> Path:
        folder = root / f"manual-{name}"
        folder.mkdir()
        for f in files:
            (folder / f).symlink_to(real / f)
        if content is not None:
            (folder / bad_file).unlink()
            (folder / bad_file).write_bytes(content)
        return folder

    raw = good.read_bytes()
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2] ^= 0xFF  # a flipped byte inside the deflate stream
    labels = bytearray(gzip.decompress(raw))
    labels[-1] = (labels[-1] + 1) % 10  # a valid archive of the wrong data
    places = {
        "prev": clone_run(reference["workdir"], root / "prev"),  # an earlier run, with its checkpoints
        "manual_empty": manual("empty", files=()),
        "manual_some": manual("some", files=names[:2]),
        "manual_truncated": manual("truncated", content=raw[: len(raw) // 2]),
        "manual_corrupt": manual("corrupt", content=bytes(corrupt)),
        "manual_wrong": manual("wrong", content=gzip.compress(bytes(labels))),
        "manual_real": str(real),
        "data_dir": str(mnist_dirs["data_dir"]),
    }
    # The same run, but its config.json asks for a smaller dense layer than its checkpoints hold.
    mismatch = clone_run(reference["workdir"], root / "mismatch")
    config = Config.load(mismatch / "config.json")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dense_features=500))
    (mismatch / "config.json").unlink()
    config.save(mismatch / "config.json")
    places["mismatch"] = mismatch
    # A workdir whose config.json was written but whose run never reached a checkpoint.
    (root / "nockpt").mkdir()
    shutil.copy(reference["workdir"] / "config.json", root / "nockpt" / "config.json")
    places["nockpt"] = root / "nockpt"
    if os.geteuid() != 0:
        (root / "readonly").mkdir(mode=0o555)
        places["unwritable"] = root / "readonly" / "run"
    else:  # root writes anywhere: make the workdir's parent a regular file instead
        (root / "a-file").write_text("")
        places["unwritable"] = root / "a-file" / "run"
    from PIL import Image

    Image.new("L", (28, 28)).save(root / "digit.png")
    places["image"] = root / "digit.png"
    return places


def _fresh_data(p, manual):
    return ["--data-dir", p["fresh_data_dir"], "--manual-dir", p[manual]]


LAYER_MESSAGE = "does not fit this model: dense1/bias is (1000,) there, (500,) here"
ALL_FOUR = "lacks train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
BAD_INPUT = {
    # name: (argv from the places, expected exit code, text the one line must hold)
    "unknown dataset": (lambda p: ["train", "--dataset", "cifar", "--workdir", p["new"]], 2, "unknown dataset 'cifar'"),
    "batch size 0": (lambda p: ["train", "--batch-size", "0", "--workdir", p["new"]], 2, "--batch-size must be >= 1, got 0"),
    "negative epochs": (lambda p: ["train", "--epochs", "-1", "--workdir", p["new"]], 2, "--epochs must be >= 1, got -1"),
    "learning rate not a number": (
        lambda p: ["train", "--learning-rate", "abc", "--workdir", p["new"]], 2, "argument --learning-rate: invalid float value: 'abc'"
    ),
    "negative checkpoint interval": (
        lambda p: ["train", "--checkpoint-every-steps", "-1", "--workdir", p["new"]], 2, "--checkpoint-every-steps must be >= 0, got -1"
    ),
    "missing data files": (lambda p: ["train", "--workdir", p["new"], *_fresh_data(p, "manual_empty")], 2, ALL_FOUR),
    "manual dir with only some files": (
        lambda p: ["train", "--workdir", p["new"], *_fresh_data(p, "manual_some")], 2,
        "lacks t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (a manual dir needs all four",
    ),
    "truncated data file": (
        lambda p: ["train", "--workdir", p["new"], *_fresh_data(p, "manual_truncated")], 2, "t10k-labels-idx1-ubyte.gz is not a valid gzip file"
    ),
    "corrupt data file": (
        lambda p: ["train", "--workdir", p["new"], *_fresh_data(p, "manual_corrupt")], 2, "t10k-labels-idx1-ubyte.gz is not a valid gzip file"
    ),
    "wrong-checksum data file": (
        lambda p: ["train", "--workdir", p["new"], *_fresh_data(p, "manual_wrong")], 2,
        "t10k-labels-idx1-ubyte.gz has the wrong checksum and is not mnist's t10k-labels-idx1-ubyte.gz",
    ),
    "resume where the data is damaged": (
        lambda p: ["train", "--resume", "--workdir", p["prev"], *_fresh_data(p, "manual_truncated")], 2,
        "t10k-labels-idx1-ubyte.gz is not a valid gzip file",
    ),
    "workdir not writable": (
        lambda p: ["train", "--workdir", p["unwritable"], "--data-dir", p["data_dir"]], 2, "workdir {unwritable} is not writable"
    ),
    "fresh run into a workdir that holds a run": (
        lambda p: ["train", "--workdir", p["prev"], "--data-dir", p["data_dir"]], 2,
        "{prev} already holds a run with checkpoints: continue it with --resume",
    ),
    "resume with a conflicting flag": (
        lambda p: ["train", "--resume", "--workdir", p["prev"], "--batch-size", "64", "--data-dir", p["data_dir"]], 2,
        "continues the run as configured in its config.json; drop --batch-size 64 (the run has 32)",
    ),
    "resume with conflicting flags named as the user typed them": (
        lambda p: ["train", "--resume", "--workdir", p["prev"], "--dtype", "bfloat16", "--dropout", "0.5", "--data-dir", p["data_dir"]], 2,
        "; drop --dtype bfloat16 (the run has float32), --dropout 0.5 (the run has 0.25)",
    ),
    "export to an unwritable place": (
        lambda p: ["export", "--out", p["unwritable"] / "mnist.npz", "--data-dir", p["data_dir"]], 2, "cannot write {unwritable}/mnist.npz"
    ),
    "checkpoint from another model config (evaluate)": (
        lambda p: ["evaluate", "--workdir", p["mismatch"], "--data-dir", p["data_dir"]], 2, LAYER_MESSAGE
    ),
    "checkpoint from another model config (resume)": (
        lambda p: ["train", "--resume", "--workdir", p["mismatch"], "--data-dir", p["data_dir"]], 2, LAYER_MESSAGE
    ),
    "evaluate without a checkpoint": (lambda p: ["evaluate", "--workdir", p["nockpt"]], 2, "no checkpoint in {nockpt}"),
    "predict without a checkpoint": (lambda p: ["predict", p["image"], "--workdir", p["nockpt"]], 2, "no checkpoint in {nockpt}"),
    "analyze without a checkpoint": (lambda p: ["analyze", "--workdir", p["nockpt"]], 2, "no checkpoint in {nockpt}"),
    "resume without a checkpoint": (lambda p: ["train", "--resume", "--workdir", p["nockpt"]], 2, "nothing to resume: {nockpt} has no checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_non_zero_and_harms_no_checkpoint(case, places, tmp_path):
    build, code, expected = BAD_INPUT[case]
    p = {**places, "new": tmp_path / "new-run", "fresh_data_dir": tmp_path / "tfds"}
    existing = [p["prev"], p["mismatch"], p["nockpt"]]
    before = snapshot(*existing)
    result = run_cli(*build(p), timeout=180)
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and re.match(r"mnist_jax( \w+)?: error: ", lines[0]), result.stderr[-3000:]
    assert expected.format(**p) in lines[0], lines[0]
    assert snapshot(*existing) == before, "a checkpoint or run file was deleted or changed"
    assert committed_steps(p["new"]) == [] and not (p["new"] / "config.json").exists()


@pytest.mark.parametrize("where", ["before the command", "after it"])
def test_debug_shows_the_traceback(where):
    args = ["--debug", "train", "--batch-size", "0"] if where == "before the command" else ["train", "--batch-size", "0", "--debug"]
    result = run_cli(*args, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError: --batch-size must be >= 1, got 0" in result.stderr
