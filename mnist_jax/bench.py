"""Benchmark: the tutorial's Keras program against mnist_jax's own training path, same machine, same data.

    python -m mnist_jax.bench           # the seed recipe, 5 epochs each, repeated and interleaved
    python -m mnist_jax.bench --quick   # 4 epochs of 300 steps each, under 3 minutes on 2 cores
    python -m mnist_jax.bench --jax-only --arrays mnist.npz [--dtype bfloat16]   # GPU/TPU: no Keras, no TensorFlow

Each side runs in its own process (so peak memory and threads are its own), and
the two take turns epoch by epoch: Keras's epoch 1, mnist_jax's epoch 1, mnist_jax's
epoch 2, Keras's epoch 2, ... (the process whose turn it is not waits, idle), so that
each pair of epochs compared ran within a few minutes of each other on this shared
machine. The first epoch of every run holds compilation/warm-up and is reported
apart; steady-state epochs are compared. The last line printed is
`speedup_vs_keras=X` (median Keras epoch / median JAX epoch).
With --jax-only (for machines without TensorFlow: data from an .npz made by
`python -m mnist_jax export`), only mnist_jax runs, on whatever device JAX sees, and
the last line is `jax_train_time_s=X`: the training steps of all epochs, validation,
checkpoints and compilation excluded (median over runs; the first run fills the
persistent compilation cache, later ones read it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mnist_jax.cli import add_config_flags
from mnist_jax.runtime import cpu_model

REPO = Path(__file__).resolve().parent.parent


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _keras_worker(args: argparse.Namespace, turns: _Turns) -> dict[str, Any]:
    """The tutorial's model, compiled and fitted the way the tutorial does (Keras on TF, oneDNN on)."""
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"  # Keras' default on CPU: give the reference its best
    from mnist_jax import data

    train, test = _load(args)
    tf = data.import_tf()
    import keras
    from keras import layers

    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, (5, 5), padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(64, (2, 2), padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(1000, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    class WaitForTurn(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            turns(epoch)

    timer = EpochTimer()
    start = time.perf_counter()
    model.fit(
        train["image"], train["label"], batch_size=args.batch_size, epochs=args.epochs,
        validation_data=(test["image"], test["label"]), verbose=0,
        callbacks=[WaitForTurn(), timer],  # in this order: the epoch's clock starts once its turn has come
    )  # fmt: skip
    fit_time = time.perf_counter() - start - turns.waited
    loss, accuracy = model.evaluate(test["image"], test["label"], verbose=0)
    turns.end()
    del tf
    return {"epoch_time_s": timer.times, "fit_time_s": fit_time, "test_accuracy": float(accuracy), "turns_wall": turns.wall}


def _jax_worker(args: argparse.Namespace, turns: _Turns) -> dict[str, Any]:
    """mnist_jax's normal training path: `fit` with the seed config."""
    import jax

    from mnist_jax import Config, fit
    from mnist_jax.runtime import enable_compilation_cache

    enable_compilation_cache()  # as `python -m mnist_jax train` does; compilation is timed apart anyway
    with tempfile.TemporaryDirectory() as workdir:
        config = Config(
            epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, train_examples=args.train_examples,
            workdir=workdir, data_dir=args.data_dir, manual_dir=args.manual_dir, arrays=args.arrays,
            compute_dtype=args.dtype,
        )  # fmt: skip
        _, history = fit(config, verbose=False, before_epoch=turns)
        turns.end()
        accuracy = json.loads((Path(workdir) / "metrics.json").read_text())["test_accuracy"]
    keep = ("epoch_time_s", "train_time_s", "fit_time_s", "compile_time_s")
    device = jax.devices()[0]
    return {**{k: history[k] for k in keep}, "test_accuracy": accuracy, "turns_wall": turns.wall, "jax_version": jax.__version__,
            "device": f"{jax.device_count()} x {device.device_kind} ({device.platform})"}  # fmt: skip


def _load(args: argparse.Namespace):
    from mnist_jax import data

    where = {"data_dir": args.data_dir, "manual_dir": args.manual_dir, "arrays": args.arrays}
    train = data.load_split("mnist", "train", num_examples=args.train_examples, **where)
    test = data.load_split("mnist", "test", **where)
    return train, test


class _Turns:
    """In a worker, called before each epoch: tells the parent the epoch is ready and blocks until
    it says go. Keeps the seconds spent waiting and each turn's wall-clock [start, end].

    The protocol has the process's original stdout to itself: everything else written to stdout,
    by Python or C code, is sent to stderr (the parent's log file), so it cannot garble a line."""

    def __init__(self) -> None:
        self.channel = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stdout.flush()
        os.dup2(2, 1)
        self.waited = 0.0
        self.wall: list[list[float]] = []

    def __call__(self, epoch: int) -> None:
        start = time.perf_counter()
        self.end()
        print(f"ready {epoch}", file=self.channel, flush=True)
        if sys.stdin.readline().strip() != "go":
            sys.exit("bench worker: the parent went away")
        self.wall.append([time.time()])
        self.waited += time.perf_counter() - start

    def end(self) -> None:
        if self.wall and len(self.wall[-1]) == 1:
            self.wall[-1].append(time.time())


class _Worker:
    """One side's worker process, run an epoch at a time: `turn()` lets it run its next epoch
    (or, after the last, its final evaluation) and returns once it is waiting again or done."""

    def __init__(self, kind: str, args: argparse.Namespace):
        cmd = [sys.executable, "-m", "mnist_jax.bench", "--worker", kind, "--epochs", str(args.epochs), "--seed", str(args.seed)]
        cmd += ["--batch-size", str(args.batch_size), "--dtype", args.dtype]
        for flag in ("train_examples", "data_dir", "manual_dir", "arrays"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        self.kind, self.result = kind, None
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: TF's logging could fill a pipe nobody reads yet
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._wait()  # data loaded, model built (and compiled, for mnist_jax): ready for epoch 0

    def turn(self) -> None:
        try:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        except OSError:  # it died while waiting
            self._failed()
        self._wait()

    def _wait(self) -> None:
        for line in self.process.stdout:
            if line.startswith("ready "):
                return
            try:
                self.result = json.loads(line)
            except ValueError:
                self._failed(f"sent {line.strip()[:200]!r}")
        if self.process.wait() != 0 or self.result is None:
            self._failed()

    def _failed(self, what: str = "") -> None:
        self.log.seek(0)
        raise RuntimeError(f"the {self.kind} worker failed{': ' + what if what else ''}:\n{self.log.read()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _run_pair(kinds: tuple[str, ...], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One run of each kind, their epochs in turns; the first to go alternates from epoch to epoch."""
    workers: list[_Worker] = []
    try:
        for kind in kinds:  # started one after the other, so that neither's start-up or compilation overlaps the other's
            workers.append(_Worker(kind, args))
        for epoch in range(args.epochs):
            for worker in workers if epoch % 2 == 0 else workers[::-1]:
                worker.turn()
        return {worker.kind: worker.result for worker in workers}
    except RuntimeError as error:
        sys.exit(f"bench: {error}")
    finally:
        for worker in workers:
            worker.stop()


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _summarise(runs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    first = [run["epoch_time_s"][0] for run in runs]
    steady = [t for run in runs for t in run["epoch_time_s"][1:]] or first  # a one-epoch run has only its first
    median = statistics.median(steady)
    return {
        "steady_epoch_s_median": median,
        "steady_epoch_s_min": min(steady),
        "steady_epoch_s_max": max(steady),
        "steady_ms_per_step": 1000 * median / steps,
        "first_epoch_s": statistics.median(first),
        "compile_s": statistics.median(run.get("compile_time_s", 0.0) for run in runs),  # Keras compiles inside epoch 1
        "test_accuracy": statistics.median(run["test_accuracy"] for run in runs),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "runs": runs,
    }


def _print_summary(kind: str, s: dict[str, Any]) -> None:
    compiled = f" (+ compile {s['compile_s']:.1f} s before it)" if s["compile_s"] else ""
    print(
        f"{kind:5s}: steady epoch {s['steady_epoch_s_median']:.2f} s (min {s['steady_epoch_s_min']:.2f}, max {s['steady_epoch_s_max']:.2f}),"
        f" {s['steady_ms_per_step']:.1f} ms/step, first epoch {s['first_epoch_s']:.1f} s{compiled},"
        f" test accuracy {s['test_accuracy']:.4f}, peak RSS {s['peak_rss_mib']:.0f} MiB"
    )


def default_out(args: argparse.Namespace) -> str:
    """docs/bench/<date>_<commit>_<cpu>/bench-<mode>[-<dtype>].json: each run's figures, named by when, what and where."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "nogit"
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")[:40]
    mode = ("quick" if args.quick else "full") + ("-jax-only" if args.jax_only else "") + ("" if args.dtype == "float32" else f"-{args.dtype}")
    name = f"bench-{mode}-{time.strftime('%H%M%S')}.json"
    folder = REPO / "docs" / "bench" if (REPO / ".git").exists() else Path("results") / "bench"  # outside a checkout: here
    return str(folder / f"{time.strftime('%Y-%m-%d')}_{commit}_{cpu}" / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_jax.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 steps per epoch, 4 epochs (3 compared), one run each")
    parser.add_argument("--jax-only", action="store_true", help="mnist_jax alone (no Keras, no TensorFlow needed with --arrays)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each side (default: 2, quick: 1)")
    parser.add_argument("--out", help="JSON results (default: docs/bench/<date>_<commit>_<cpu>/bench-<mode>.json, committed with the code)")
    add_config_flags(parser, ("data_dir", "manual_dir", "arrays"), defaults=True)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="mnist_jax's compute dtype (bfloat16: --jax-only)")
    parser.add_argument("--worker", choices=["keras", "jax"], help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--train-examples", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        turns = _Turns()
        result = (_keras_worker if args.worker == "keras" else _jax_worker)(args, turns)
        result["peak_rss_mib"] = _peak_rss_mib()
        print(json.dumps(result), file=turns.channel, flush=True)
        return 0
    args.out = args.out or default_out(args)
    if args.dtype != "float32" and not args.jax_only:
        parser.error("--dtype bfloat16 needs --jax-only: the Keras reference computes in float32")

    if args.quick:
        # 3 steady epoch pairs, not 1: on this shared machine one pair's ratio was as noisy as the machine.
        args.epochs, args.train_examples = 4, 300 * args.batch_size
    repeats = args.repeats or (1 if args.quick else 2)
    steps = (args.train_examples or 60_000) // args.batch_size
    kinds = ("jax",) if args.jax_only else ("keras", "jax")
    print(f"bench: {'quick' if args.quick else 'full'}: {repeats} run(s) of {' and '.join(kinds)}{', epochs in turns' if len(kinds) > 1 else ''},"
          f" {args.epochs} epochs of {steps} steps, batch {args.batch_size}, {args.dtype}", flush=True)  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for repeat in range(repeats):
        pair = _run_pair(kinds, args)
        for kind in kinds:
            run = pair[kind]
            runs[kind].append(run)
            epochs = ", ".join(f"{t:.1f}" for t in run["epoch_time_s"])
            steps_only = f", steps only [{', '.join(f'{t:.2f}' for t in run['train_time_s'])}] s" if "train_time_s" in run else ""
            print(f"  {kind:5s} run {repeat + 1}: epochs [{epochs}] s{steps_only}, test accuracy {run['test_accuracy']:.4f},"
                  f" peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    summary = {kind: _summarise(r, steps) for kind, r in runs.items()}
    jax_run = runs["jax"][-1]
    report = {
        "mode": ("quick" if args.quick else "full") + (", jax only" if args.jax_only else ""),
        "machine": _machine(),
        "jax_device": jax_run["device"],
        "jax_version": jax_run["jax_version"],
        "dtype": args.dtype,
        "epochs": args.epochs,
        "steps_per_epoch": steps,
        "repeats": repeats,
        **summary,
    }
    if args.jax_only:
        totals = [sum(run["train_time_s"]) for run in runs["jax"]]
        report["jax_train_time_s"] = statistics.median(totals)
    else:
        per_pair = [k / j for rk, rj in zip(runs["keras"], runs["jax"]) for k, j in zip(rk["epoch_time_s"][1:], rj["epoch_time_s"][1:])]
        report["speedup_vs_keras"] = summary["keras"]["steady_epoch_s_median"] / summary["jax"]["steady_epoch_s_median"]
        report["speedup_min"], report["speedup_max"] = min(per_pair), max(per_pair)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"machine: {report['machine']}; jax {report['jax_version']} on {report['jax_device']}")
    for kind in kinds:
        _print_summary(kind, summary[kind])
    print(f"results: {args.out}")
    if args.jax_only:
        compiles = ", ".join(f"{run['compile_time_s']:.1f}" for run in runs["jax"])
        print(f"jax  : {args.epochs} epochs of training steps {', '.join(f'{t:.2f}' for t in totals)} s per run; compile {compiles} s per run")
        print(f"jax_train_time_s={report['jax_train_time_s']:.2f}")
    else:
        print(f"speedup_vs_keras={report['speedup_vs_keras']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
