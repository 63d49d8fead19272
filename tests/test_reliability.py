"""Reliability, as a user meets it through the command line.

- `kill -9` at a random moment, then `train --resume`: the final parameters, optimizer state
  and history are bit-identical to an uninterrupted run (CPU).
- SIGTERM or a first SIGINT (Ctrl-C): the current call of steps finishes (one step, or a chunk of 100
  steps, the CPU default), a checkpoint is written, exit code 75 within seconds; resuming from it is
  the same run. A second SIGINT ends the process at once, without that checkpoint.
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
from tests.conftest import REPO, epoch_starts, tb_steps

# 960 images, batch 32: 30 steps an epoch, 60 in all. Checkpoints at the multiples of 7
# inside an epoch and at each epoch end, so most of them are mid-epoch.
RUN = ["--train-examples", "960", "--epochs", "2", "--checkpoint-every-steps", "7"]
CHECKPOINT_STEPS = [7, 14, 21, 28, 30, 35, 42, 49, 56, 60]
STEPS_PER_EPOCH = 30
FINAL_STEP = 60
# 9,600 images, one epoch of 300 steps in chunks of 100 per compiled call (the CPU default, no step
# checkpoints): a stop request is seen between chunks, so the stop checkpoint lands on one.
CHUNKED_RUN = ["--train-examples", "9600", "--epochs", "1"]
CHUNK, CHUNKED_FINAL_STEP = 100, 300
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


def assert_same_run(workdir: Path, reference: dict, final_step: int = FINAL_STEP, tensorboard: bool = True) -> None:
    """The final checkpoint and history of `workdir` equal the uninterrupted reference run's, bit for bit
    (and, with `tensorboard`, its TensorBoard steps)."""
    state = restore_checkpoint(workdir)
    assert int(state.step) == final_step
    assert_trees_identical(state.params, reference["state"].params, "params")
    assert_trees_identical(state.opt_state, reference["state"].opt_state, "opt_state")
    history = json.loads((workdir / "history.json").read_text())
    for key in HISTORY_KEYS:
        assert history[key] == reference["history"][key], key
    assert json.loads((workdir / "metrics.json").read_text()) == reference["metrics"]
    assert not partial_saves(workdir), step_names(workdir)
    if tensorboard:
        assert tb_steps(workdir / "tb") == tb_steps(reference["workdir"] / "tb")  # TensorBoard's curves: no step twice, none missing


def data_flags(dirs) -> list[str]:
    return ["--data-dir", dirs["data_dir"], "--manual-dir", dirs["manual_dir"]]


def resumed_at(stdout: str) -> int | None:
    """The step `train --resume` said it resumed from."""
    match = re.search(r"^Resumed from .* at step (\d+) ", stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


def bar_position(stderr: str, total: int) -> int:
    """The furthest step of the current epoch's progress bar (`n/total`) on stderr so far."""
    return max((int(n) for n in re.findall(rf"\b(\d+)/{total}\b", stderr)), default=-1)


# ----------------------------------------------------------------------------- the uninterrupted runs


def uninterrupted(workdir: Path, args: list[str], dirs: dict) -> dict:
    """A whole run through the command line, as the interrupted ones are, and what they are compared with."""
    result = run_cli("train", *args, "--workdir", workdir, *data_flags(dirs))
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "workdir": workdir,
        "state": restore_checkpoint(workdir),
        "history": json.loads((workdir / "history.json").read_text()),
        "metrics": json.loads((workdir / "metrics.json").read_text()),
        "steps": committed_steps(workdir),
        "stdout": result.stdout,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dirs) -> dict:
    """The uninterrupted RUN everything is compared with (a CLI subprocess, like the interrupted ones)."""
    return uninterrupted(tmp_path_factory.mktemp("reliability") / "reference", RUN, mnist_dirs)


@pytest.fixture(scope="module")
def chunked_reference(tmp_path_factory, mnist_dirs) -> dict:
    """The uninterrupted CHUNKED_RUN."""
    run = uninterrupted(tmp_path_factory.mktemp("reliability") / "chunked-reference", CHUNKED_RUN, mnist_dirs)
    assert f"({CHUNK} step(s) per call)" in run["stdout"]
    return run


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_checkpoint_every_steps_bounds_the_loss_to_n_steps(reference):
    # --checkpoint-every-steps 7: one at each multiple of 7 and at each epoch end; the latest 3 are kept
    # (and the best by val_accuracy, an epoch end). tests/test_fit.py checks every one written, all kept.
    kept = reference["steps"]
    assert kept[-3:] == CHECKPOINT_STEPS[-3:] and set(kept) <= set(CHECKPOINT_STEPS), kept


# ----------------------------------------------------------------------------- kill -9, SIGTERM, SIGINT


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, tmp_path, mnist_dirs):
    seed = int(os.environ.get("MNIST_JAX_KILL_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    # Up to a second after a checkpoint folder appears (while it is written, or just after), step 56 the
    # latest: the steps after it, two evaluations of 10,000 images and a save keep the run alive past that.
    target, delay = rng.choice(CHECKPOINT_STEPS[:-1]), rng.uniform(0.0, 1.0)
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
    assert alive, "the run finished before the kill: " + record  # killed mid-run, not after it

    if not committed:  # killed while the first checkpoint was being written: nothing to resume, start again
        result = run_cli("train", "--resume", "--workdir", workdir, *data_flags(mnist_dirs))
        assert result.returncode == 2 and "nothing to resume" in result.stderr, record + result.stderr
        resumed_from = "scratch"
        result = run_cli("train", *RUN, "--workdir", workdir, *data_flags(mnist_dirs))
    else:
        result = run_cli("train", "--resume", "--workdir", workdir, *data_flags(mnist_dirs))
        resumed_from = resumed_at(result.stdout)
        # From the newest checkpoint the killed run committed, which is one it had to write: not from scratch.
        assert resumed_from == committed[-1] and resumed_from in CHECKPOINT_STEPS, f"{record} resumed_from={resumed_from}"
        assert 0 < resumed_from < FINAL_STEP, f"{record} resumed_from={resumed_from}"
    print(f"\nkill/resume: {record} resumed_from={resumed_from} rc={result.returncode}")
    assert result.returncode == 0, record + "\n" + result.stderr[-3000:]
    assert messages(result.stderr) == [], record + "\n" + result.stderr[-3000:]
    assert_same_run(workdir, reference)


@pytest.mark.slow  # a whole-process scenario: make test-slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_or_a_first_sigint_finishes_the_step_saves_and_exits_75_then_resume_is_identical(signame, reference, tmp_path, mnist_dirs):
    workdir = tmp_path / "run"
    with Background(["train", *RUN, "--workdir", workdir, *data_flags(mnist_dirs)], tmp_path / "term") as run:
        wait_for(lambda: committed_steps(workdir), run, 240, "first checkpoint")
        sent = time.monotonic()
        run.proc.send_signal(getattr(signal, signame))
        returncode = run.proc.wait(timeout=60)
        seconds = time.monotonic() - sent
        stderr = run.stderr
    assert returncode == 75, stderr[-2000:]
    assert seconds < 10, f"took {seconds:.1f} s to stop"
    lines = messages(stderr)
    assert len(lines) == 1, stderr[-2000:]
    stop = re.fullmatch(rf"mnist_jax: stopped by {signame} at step (\d+); checkpoint in (.+); continue with --resume", lines[0])
    assert stop, lines[0]
    step = int(stop.group(1))
    print(f"\n{signame}: stopped at step {step}, {seconds:.1f} s after the signal")
    assert Path(stop.group(2)) == (workdir / "checkpoints").absolute()
    assert step in committed_steps(workdir) and step < FINAL_STEP and not partial_saves(workdir)
    assert not (workdir / "metrics.json").exists()

    result = run_cli("train", "--resume", "--workdir", workdir, *data_flags(mnist_dirs))
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_at(result.stdout) == step
    assert_same_run(workdir, reference)


@pytest.mark.slow  # a whole-process scenario: make test-slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_in_the_middle_of_a_100_step_chunk_stops_after_a_chunk_and_resume_is_identical(signame, chunked_reference, tmp_path, mnist_dirs):
    # Preemption with the CPU default: no --checkpoint-every-steps, chunks of 100 steps per compiled call.
    workdir = tmp_path / "run"
    with Background(["train", *CHUNKED_RUN, "--workdir", workdir, *data_flags(mnist_dirs)], tmp_path / "chunked") as run:
        wait_for(lambda: "Epoch 1/1:" in run.stderr, run, 240, "the epoch's progress bar")
        time.sleep(0.5)  # the first chunk (about 3 s here) is running
        assert bar_position(run.stderr, CHUNKED_FINAL_STEP) < CHUNK, run.stderr[-2000:]
        sent = time.monotonic()
        run.proc.send_signal(getattr(signal, signame))
        returncode = run.proc.wait(timeout=120)
        seconds = time.monotonic() - sent
        stderr = run.stderr
    assert returncode == 75, stderr[-2000:]
    lines = messages(stderr)
    assert len(lines) == 1, stderr[-2000:]
    stop = re.fullmatch(rf"mnist_jax: stopped by {signame} at step (\d+); checkpoint in (.+); continue with --resume", lines[0])
    assert stop, lines[0]
    step = int(stop.group(1))
    print(f"\n{signame} mid-chunk: stopped at step {step}, {seconds:.1f} s after the signal")
    assert seconds < 30, f"took {seconds:.1f} s to stop"
    # After the chunk it arrived in (or the next one, already under way): on a chunk's end, inside the epoch.
    assert step in (CHUNK, 2 * CHUNK), step
    assert committed_steps(workdir) == [step] and not partial_saves(workdir)
    assert not (workdir / "metrics.json").exists()

    result = run_cli("train", "--resume", "--workdir", workdir, *data_flags(mnist_dirs))
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_at(result.stdout) == step
    assert_same_run(workdir, chunked_reference, final_step=CHUNKED_FINAL_STEP, tensorboard=False)
    # TensorBoard's curves: no step twice, none missing (the stop step's training scalars are logged before its
    # checkpoint, so the resumed run, which starts after that step, does not lack them).
    assert tb_steps(workdir / "tb") == tb_steps(chunked_reference["workdir"] / "tb")


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_a_second_sigint_ends_the_process_at_once(tmp_path, mnist_dirs):
    """The first Ctrl-C asks for a graceful stop (the chunk of 100 steps under way finishes, a checkpoint, exit 75);
    a second one, while that is under way, ends the process at once: no checkpoint, no exit 75."""
    workdir = tmp_path / "run"
    with Background(["train", *CHUNKED_RUN, "--workdir", workdir, *data_flags(mnist_dirs)], tmp_path / "int") as run:
        wait_for(lambda: "Epoch 1/1:" in run.stderr, run, 240, "the epoch's progress bar")
        time.sleep(0.5)  # the first chunk (about 3 s here) is running
        at_first = bar_position(run.stderr, CHUNKED_FINAL_STEP)
        assert at_first < CHUNK, run.stderr[-2000:]
        run.proc.send_signal(signal.SIGINT)
        # Caught, not fatal: the run goes on (to the end of the next chunk) and the bar moves on. Without a
        # handler for it, the first Ctrl-C would have ended the run when the chunk it arrived in ended.
        wait_for(lambda: bar_position(run.stderr, CHUNKED_FINAL_STEP) > at_first, run, 60, "progress after the first Ctrl-C")
        # One more Ctrl-C, and only one: the first one's handler has run (the bar moved after it), so this one
        # is handled too, once the call under way returns. (Pressing on would, after a graceful stop has
        # restored Python's own handler, end the process by KeyboardInterrupt and look the same.)
        second = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        returncode = run.proc.wait(timeout=60)
        seconds = time.monotonic() - second
        stderr = run.stderr
    print(f"\nsigint: gone {seconds:.2f} s after the second")
    assert returncode == -signal.SIGINT, f"{returncode}: {stderr[-2000:]}"
    assert seconds < 10, f"took {seconds:.1f} s"  # at most the chunk under way
    assert messages(stderr) == [], stderr[-2000:]  # no "stopped by SIGINT": it did not finish stopping
    assert committed_steps(workdir) == [] and not (workdir / "metrics.json").exists()


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_a_partly_written_checkpoint_is_never_picked(reference, tmp_path, epochs_run):
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
    # It went on from the previous checkpoint (mid-epoch), not from scratch.
    assert epoch_starts(epochs_run) == [(previous // STEPS_PER_EPOCH, previous % STEPS_PER_EPOCH, previous)]
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
    assert resumed_at(result.stdout) == previous
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


def synthetic_run(workdir: Path, config: Config, steps_per_epoch: int = 10) -> Path:
    """A run folder as `fit` leaves it (config.json; a checkpoint per epoch with state, position and history;
    history.json, metrics.json), written without data or training: the bad-input cases that need no data use it."""
    from mnist_jax import checkpoint
    from mnist_jax.train import HISTORY_KEYS, Position, create_train_state

    workdir.mkdir(parents=True)
    config = dataclasses.replace(config, workdir=str(workdir))
    config.save(workdir / "config.json")
    state = create_train_state(jax.random.key(config.seed), config)
    history = {k: [] for k in HISTORY_KEYS}
    with checkpoint.make_manager(workdir / "checkpoints", config.keep_checkpoints) as manager:
        for epoch in range(1, config.epochs + 1):
            for key in HISTORY_KEYS:
                history[key].append(0.5 + epoch / 10)
            state = state.replace(step=epoch * steps_per_epoch)
            meta = {**dataclasses.asdict(Position(epoch)), "history": json.loads(json.dumps(history))}
            checkpoint.save(manager, state, meta, metrics={"loss": 0.5, "accuracy": history["val_accuracy"][-1]})
    (workdir / "history.json").write_text(json.dumps(history) + "\n")
    (workdir / "metrics.json").write_text(json.dumps({"test_loss": 0.4, "test_accuracy": 0.7, "test_examples": 10000}) + "\n")
    return workdir


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict:
    """Runs, workdirs and manual dirs for the bad-input table that need no MNIST; every case gets a fresh, empty tfds data_dir."""
    root = tmp_path_factory.mktemp("bad-input")
    base = Config(epochs=2, train_examples=320)
    (root / "manual-empty").mkdir()
    places = {
        "root": root,
        "prev": synthetic_run(root / "prev", base),  # an earlier run, with its checkpoints
        "manual_empty": root / "manual-empty",
    }
    # The same kind of run, but its config.json asks for a smaller dense layer than its checkpoints hold.
    mismatch = synthetic_run(root / "mismatch", base)
    config = Config.load(mismatch / "config.json")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dense_features=500))
    (mismatch / "config.json").unlink()
    config.save(mismatch / "config.json")
    places["mismatch"] = mismatch
    # A workdir whose config.json was written but whose run never reached a checkpoint.
    (root / "nockpt").mkdir()
    shutil.copy(places["prev"] / "config.json", root / "nockpt" / "config.json")
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


@pytest.fixture(scope="module")
def mnist_places(places, mnist_dirs) -> dict:
    """The places of the cases about real MNIST: manual dirs made of the real files (some missing or damaged), and a
    tfds data_dir where MNIST is prepared."""
    root = places["root"]
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
    return {
        "manual_some": manual("some", files=names[:2]),
        "manual_truncated": manual("truncated", content=raw[: len(raw) // 2]),
        "manual_corrupt": manual("corrupt", content=bytes(corrupt)),
        "manual_wrong": manual("wrong", content=gzip.compress(bytes(labels))),
        "data_dir": str(mnist_dirs["data_dir"]),
    }


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
        lambda p: ["train", "--workdir", p["unwritable"], "--data-dir", p["fresh_data_dir"]], 2, "workdir {unwritable} is not writable"
    ),
    "fresh run into a workdir that holds a run": (
        lambda p: ["train", "--workdir", p["prev"], "--data-dir", p["fresh_data_dir"]], 2,
        "{prev} already holds a run with checkpoints: continue it with --resume",
    ),
    "resume with a conflicting flag": (
        lambda p: ["train", "--resume", "--workdir", p["prev"], "--batch-size", "64", "--data-dir", p["fresh_data_dir"]], 2,
        "continues the run as configured in its config.json; drop --batch-size 64 (the run has 32)",
    ),
    "resume with conflicting flags named as the user typed them": (
        lambda p: ["train", "--resume", "--workdir", p["prev"], "--dtype", "bfloat16", "--dropout", "0.5", "--data-dir", p["fresh_data_dir"]], 2,
        "; drop --dtype bfloat16 (the run has float32), --dropout 0.5 (the run has 0.25)",
    ),
    "export to an unwritable place": (
        lambda p: ["export", "--out", p["unwritable"] / "mnist.npz", "--data-dir", p["fresh_data_dir"]], 2, "cannot write {unwritable}/mnist.npz"
    ),
    "checkpoint from another model config (evaluate)": (
        lambda p: ["evaluate", "--workdir", p["mismatch"], "--data-dir", p["fresh_data_dir"]], 2, LAYER_MESSAGE
    ),
    "checkpoint from another model config (resume)": (
        lambda p: ["train", "--resume", "--workdir", p["mismatch"], "--data-dir", p["data_dir"]], 2, LAYER_MESSAGE
    ),
    "evaluate without a checkpoint": (lambda p: ["evaluate", "--workdir", p["nockpt"]], 2, "no checkpoint in {nockpt}"),
    "predict without a checkpoint": (lambda p: ["predict", p["image"], "--workdir", p["nockpt"]], 2, "no checkpoint in {nockpt}"),
    "analyze without a checkpoint": (lambda p: ["analyze", "--workdir", p["nockpt"]], 2, "no checkpoint in {nockpt}"),
    "resume without a checkpoint": (lambda p: ["train", "--resume", "--workdir", p["nockpt"]], 2, "nothing to resume: {nockpt} has no checkpoint"),
}
# The cases about the real data set (a damaged copy of its files, or a resume that loads it before restoring): they
# skip without MNIST; the others need none.
NEEDS_MNIST = {
    "manual dir with only some files", "truncated data file", "corrupt data file", "wrong-checksum data file",
    "resume where the data is damaged", "checkpoint from another model config (resume)",
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_non_zero_and_harms_no_checkpoint(case, places, tmp_path, request):
    build, code, expected = BAD_INPUT[case]
    p = {**places, "new": tmp_path / "new-run", "fresh_data_dir": tmp_path / "tfds"}
    if case in NEEDS_MNIST:
        p.update(request.getfixturevalue("mnist_places"))
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
