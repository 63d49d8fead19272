"""Data parallelism on forced CPU devices: 4 devices train like 1, two processes train like one, checkpoints move between device counts."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

WORKER = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax, numpy as np
    from mnist_jax import Config, fit, restore_checkpoint, predict, checkpoint
    from mnist_jax.parallel import data_parallel
    from mnist_jax.steps import create_train_state
    assert len(jax.devices()) == 4
    data_dir, manual_dir, out = sys.argv[1:4]
    base = Config(epochs=2, train_examples=640, data_dir=data_dir, manual_dir=manual_dir)
    runs = {}
    for devices in ("4", "1"):
        state, history = fit(dataclasses.replace(base, devices=devices, workdir=f"{out}/d{devices}"), verbose=False)
        runs[devices] = (state, history)
    (s4, h4), (s1, h1) = runs["4"], runs["1"]
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)))
    # Checkpoints across device counts: the 4-device run restored on one device, the 1-device run onto 4.
    images = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    on_one = restore_checkpoint(f"{out}/d4")
    dp4 = data_parallel("4")
    like = dp4.put_replicated(create_train_state(jax.random.key(0), base))
    with checkpoint.make_manager(f"{out}/d1/checkpoints") as manager:
        on_four, _ = checkpoint.restore_latest(manager, like)
    json.dump({
        "loss4": h4["loss"], "loss1": h1["loss"], "val4": h4["val_accuracy"], "val1": h1["val_accuracy"],
        "max_param_diff": diff,
        "trained_devices": [len(s4.params["dense1"]["kernel"].devices()), len(s1.params["dense1"]["kernel"].devices())],
        "restored_devices": [len(on_one.params["dense1"]["kernel"].devices()), len(on_four.params["dense1"]["kernel"].devices())],
        "pred_4_on_1": float(np.max(np.abs(np.asarray(predict(on_one, images)) - np.asarray(predict(s4, images))))),
        "pred_1_on_4": float(np.max(np.abs(np.asarray(predict(on_four, images)) - np.asarray(predict(s1, images))))),
    }, open(f"{out}/result.json", "w"))
    """
)


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_four_devices_train_like_one_and_checkpoints_move(tmp_path, mnist_dirs):
    env = {**os.environ, **FOUR_DEVICES}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, mnist_dirs["data_dir"], mnist_dirs["manual_dir"], str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["loss4"] == pytest.approx(r["loss1"], rel=1e-4)
    assert r["val4"] == pytest.approx(r["val1"], abs=2e-4)  # at most 2 of 10,000 test images flip
    assert r["max_param_diff"] < 1e-4
    assert r["trained_devices"] == [4, 1]  # the 4-device run really ran on 4
    assert r["restored_devices"] == [1, 4]
    assert r["pred_4_on_1"] == 0.0 and r["pred_1_on_4"] < 1e-6


def test_batch_must_divide_over_devices(tmp_path):
    env = {**os.environ, **FOUR_DEVICES}
    result = subprocess.run(
        [sys.executable, "-m", "mnist_jax", "train", "--batch-size", "30", "--workdir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().endswith("batch size 30 does not divide over 4 devices (try 28 or 32)")


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_two_processes_train_like_one(tmp_path, mnist_dirs):
    """Two processes on 127.0.0.1 with two CPU devices each (gloo collectives) against one process.

    Two epochs: the first epoch's checkpoint is written in the background while the second trains."""
    flags = ["--epochs", "2", "--train-examples", "640", "--data-dir", mnist_dirs["data_dir"], "--manual-dir", mnist_dirs["manual_dir"]]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    single = subprocess.run(
        [sys.executable, "-m", "mnist_jax", "train", *flags, "--workdir", str(tmp_path / "single")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    import socket

    # Should a collective hang, XLA says which one (warnings shown) and ends the process well before the test's timeout.
    stuck = "--xla_cpu_collective_call_warn_stuck_timeout_seconds=30 --xla_cpu_collective_call_terminate_timeout_seconds=150"
    env = {**env, "XLA_FLAGS": f"{env['XLA_FLAGS']} {stuck}", "TF_CPP_MIN_LOG_LEVEL": "1"}

    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Each process writes to its own files, not pipes: a pipe that is read only after the other process
    # has finished blocks its writer once full (64 KiB), mid-collective, and so hangs both.
    logs = [(tmp_path / f"process{i}.out", tmp_path / f"process{i}.err") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):
        with out.open("w") as stdout, err.open("w") as stderr:
            procs.append(subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-m", "mnist_jax", "train", *flags, "--workdir", str(tmp_path / "multi"),
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                cwd=REPO, env=env, stdout=stdout, stderr=stderr,
            ))  # fmt: skip
    try:
        timed_out = False
        for p in procs:
            p.wait(timeout=300)
    except subprocess.TimeoutExpired:
        timed_out = True
        for p in procs:  # a hang: faulthandler writes every thread's Python stack to stderr on SIGABRT
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=20)
    finally:
        for p in procs:
            p.kill()
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    dump = lambda err: err[err.index("Fatal Python error") :][:6000] if "Fatal Python error" in err else err[-2000:]  # noqa: E731
    tails = "\n".join(
        f"--- process {i} (exit {p.returncode}) stdout:\n{out[-1000:]}\n--- stderr:\n{dump(err)}"
        for i, (p, (out, err)) in enumerate(zip(procs, outputs))
    )
    assert not timed_out, f"two-process run hung (every thread's stack below):\n{tails}"
    assert [p.returncode for p in procs] == [0, 0], tails
    assert "Test Accuracy" in outputs[0][0] and "Test Accuracy" not in outputs[1][0]  # only process 0 prints
    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    two = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=2e-4)
    single_history, multi_history = (json.loads((tmp_path / w / "history.json").read_text()) for w in ("single", "multi"))
    assert multi_history["val_loss"] == pytest.approx(single_history["val_loss"], rel=1e-4)  # both epochs
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]


# --- the multi-process flags: one line before anything starts, a bounded wait for the others (issue 23) ---

BAD_FLAG_CASES = {
    "process id = N": (["--num-processes", "2", "--process-id", "2"], "--process-id"),
    "negative process id": (["--num-processes", "2", "--process-id", "-1"], "--process-id"),
    "no processes": (["--num-processes", "0", "--process-id", "0"], "--num-processes"),
    "no port": (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "1"], "HOST:PORT"),
    "port not a number": (["--coordinator", "127.0.0.1:http", "--num-processes", "2", "--process-id", "1"], "HOST:PORT"),
    "port out of range": (["--coordinator", "127.0.0.1:99999", "--num-processes", "2", "--process-id", "1"], "HOST:PORT"),
    "no host": (["--coordinator", ":1234", "--num-processes", "2", "--process-id", "1"], "HOST:PORT"),
    "timeout 0": (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "1", "--coordinator-timeout", "0"], "--coordinator-timeout"),
}

# Every case in one process (each stops before JAX's distributed runtime starts, so one process can try them all).
BAD_FLAGS = """
import contextlib, io, json, sys
from mnist_jax.cli import main
results = {}
for name, flags in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(["train", "--workdir", sys.argv[2], *flags])
        except SystemExit as exit:
            code = exit.code
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_multi_process_flags_are_one_line_before_anything_starts(tmp_path):
    flags = {name: ["--coordinator", f"127.0.0.1:{free_port()}", *args] if "--coordinator" not in args else args
             for name, (args, _) in BAD_FLAG_CASES.items()}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", BAD_FLAGS, json.dumps(flags), str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (code, err) in results.items():
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and BAD_FLAG_CASES[name][1] in lines[0], (name, code, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("process_id", [1, 0])  # 1: nobody listens; 0: the coordinator, but the other never comes
def test_a_run_that_does_not_form_gives_up_in_one_line(tmp_path, process_id):
    import time

    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mnist_jax", "train", "--workdir", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{free_port()}",
         "--num-processes", "2", "--process-id", str(process_id), "--coordinator-timeout", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("mnist_jax: error: ") and "3 s" in lines[0] and "--coordinator-timeout" in lines[0]
    assert time.monotonic() - start < 40  # the 3 s wait, plus starting Python and JAX on a busy machine
    assert not (tmp_path / "run").exists()
