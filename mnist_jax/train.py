"""Train state, pure jit-compiled steps, evaluation and the `fit` loop.

`train_step(state, batch, rng)` and `eval_step(state, batch)` are pure: state in,
state out, nothing mutated, the dropout key passed explicitly. `fit` drives the
same step with the data resident on the device, the batch gathered inside the
compiled call and the old state's buffers donated.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import os
import platform
import signal
import sys
import threading
import datetime
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from tqdm.auto import tqdm

from mnist_jax import checkpoint, data
from mnist_jax.config import EVAL_BATCH_SIZE, Config, UserError
from mnist_jax.model import CNN, IMAGE_SHAPE, summary
from mnist_jax.parallel import DataParallel, check_divisible, data_parallel, wait_for_all_processes

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def make_model(config: Config) -> CNN:
    return CNN.from_config(config.model, dtype=jnp.dtype(config.compute_dtype))


def make_optimizer(config: Config) -> optax.GradientTransformation:
    # eps=1e-7 is Keras' Adam default (optax's is 1e-8): the seed's optimizer.
    return optax.adam(config.learning_rate, eps=1e-7)


def create_train_state(rng: jax.Array, config: Config) -> TrainState:
    """Fresh parameters (from `rng`) and optimizer state for `config`."""
    model = make_model(config)
    params = model.init(rng, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config))


def _loss_and_logits(params: Any, state: TrainState, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    train = rng is not None
    logits = state.apply_fn({"params": params}, batch["image"], train=train, rngs={"dropout": rng} if train else {})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, logits


def _train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    def loss_fn(params):
        losses, logits = _loss_and_logits(params, state, batch, rng)
        return losses.mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": accuracy}


def _eval_step(state: TrainState, batch: Batch) -> Metrics:
    losses, logits = _loss_and_logits(state.params, state, batch, None)
    mask = batch.get("mask", jnp.ones_like(losses, dtype=bool)).astype(jnp.float32)
    count = mask.sum()
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
        "loss": (losses * mask).sum() / jnp.maximum(count, 1.0),
        "accuracy": (correct * mask).sum() / jnp.maximum(count, 1.0),
        "count": count,
    }


# The public steps. Neither donates its inputs, so a research script may keep
# using the state it passed in; `fit` uses the donating variant below.
train_step = jax.jit(_train_step)
train_step.__doc__ = """One Adam step on `batch` with dropout key `rng`: (state, metrics). Pure."""
eval_step = jax.jit(_eval_step)
eval_step.__doc__ = """Mean loss and accuracy over `batch` (entries with batch["mask"] False are ignored)."""


@jax.jit
def predict(state: TrainState, images: jax.Array) -> jax.Array:
    """Class probabilities float32[N, classes] for images float32[N, 28, 28, 1] in [0, 1]."""
    return jax.nn.softmax(state.apply_fn({"params": state.params}, images, train=False))


@dataclasses.dataclass(frozen=True)
class StepKeys:
    """The run's PRNG streams: keys are folded with the step/epoch, so the step *is* the PRNG state."""

    init: jax.Array
    dropout: jax.Array
    data: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> "StepKeys":
        init, dropout, data_key = jax.random.split(jax.random.key(seed), 3)
        return cls(init, dropout, data_key)


def _device_train_step(
    state: TrainState, sums: Metrics, images: jax.Array, labels: jax.Array, indices: jax.Array, dropout_key: jax.Array
) -> tuple[TrainState, Metrics]:
    """`_host_train_step` on a batch gathered on the device."""
    return _host_train_step(state, sums, {"image": images[indices], "label": labels[indices]}, dropout_key)


def _host_train_step(state: TrainState, sums: Metrics, batch: Batch, dropout_key: jax.Array) -> tuple[TrainState, Metrics]:
    """`train_step` with the dropout key folded with the step; metric sums accumulate without a host sync."""
    step = state.step
    state, metrics = _train_step(state, batch, jax.random.fold_in(dropout_key, step))
    return state, _accumulate(sums, metrics, step)


def _device_train_steps(
    state: TrainState, sums: Metrics, images: jax.Array, labels: jax.Array, order: jax.Array, start: jax.Array,
    dropout_key: jax.Array, *, num_steps: int, dp: DataParallel, unroll: int = 1,
) -> tuple[TrainState, Metrics]:
    """Steps `start .. start+num_steps` of an epoch in one call, under `lax.scan`: `order` is the epoch's
    [steps, batch] indices (`compiled_epoch_order`, the order every pipeline of `fit` follows)."""
    chunk = jax.lax.dynamic_slice_in_dim(order, start, num_steps)

    def body(carry, indices):
        indices = jax.lax.with_sharding_constraint(indices, dp.batch)  # each device gathers its part of the batch
        return _device_train_step(*carry, images, labels, indices, dropout_key), None

    (state, sums), _ = jax.lax.scan(body, (state, sums), chunk, unroll=unroll)
    return state, sums


def donation_compiler_options(platform: str | None = None) -> dict[str, Any] | None:
    """XLA options for jitted functions that donate the train state.

    On XLA:CPU, copy insertion by default copies every donated parameter that is
    read before its in-place update (the 12.5 MB Dense kernel: an extra pass over
    it each step); region analysis proves those copies unneeded. Measured here:
    ~10 % per seed-recipe step. Other backends get no options."""
    platform = jax.default_backend() if platform is None else platform
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if platform == "cpu" else None


@functools.lru_cache(maxsize=None)
def compiled_chunk(dp: DataParallel, num_steps: int, unroll: int = 1) -> Any:
    """`_device_train_steps` jitted for a mesh and a chunk length; old state and sums donated.
    `unroll` steps per iteration of the scan's loop."""
    rep = dp.replicated
    fn = functools.partial(_device_train_steps, num_steps=num_steps, dp=dp, unroll=unroll)
    options = donation_compiler_options(dp.platform)
    return jax.jit(fn, in_shardings=(rep,) * 7, out_shardings=(rep, rep), donate_argnums=(0, 1), compiler_options=options)


@functools.lru_cache(maxsize=None)
def compiled_epoch_order(dp: DataParallel, num_examples: int, batch_size: int) -> Any:
    """`data.epoch_permutation(data_key, epoch)` jitted for a mesh, replicated: an epoch's [steps, batch] order,
    drawn once per epoch for its chunks (drawn inside each 100-step chunk, its sorts took ~34 ms a call on CPU)."""
    fn = functools.partial(data.epoch_permutation, num_examples=num_examples, batch_size=batch_size)
    return jax.jit(fn, in_shardings=(dp.replicated,) * 2, out_shardings=dp.replicated)


# Auto on CPU: chunks of 100 scanned steps (the progress bar's refresh interval). Measured on 2
# cores, 600-step epochs, interleaved: 8 % faster (median) than one step per call, faster in 7 of 8 pairs;
# whole 600-step epochs per call were no faster than chunks of 100.
CPU_STEPS_PER_CALL = 100


def resolve_steps_per_call(config: Config, steps_per_epoch: int) -> int:
    """`config.steps_per_call`, with 0 (auto) meaning the whole epoch on accelerators and, on CPU, chunks
    of `CPU_STEPS_PER_CALL`; and 1 everywhere with `checkpoint_every_steps`, so that checkpoints land
    on its multiples (checkpoints are taken between calls).

    The tfdata pipeline feeds host batches one step at a time, so it always runs 1."""
    if config.pipeline != "device":
        return 1
    if config.steps_per_call == 0:
        if config.checkpoint_every_steps:
            return 1
        return steps_per_epoch if jax.default_backend() != "cpu" else min(CPU_STEPS_PER_CALL, steps_per_epoch)
    return min(config.steps_per_call, steps_per_epoch)


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled programs on disk, so a second run (or an experiment's next variant) skips XLA compilation.

    Default: $MNIST_JAX_COMPILATION_CACHE, else ~/.cache/mnist_jax/xla; an empty value turns it off."""
    directory = os.environ.get("MNIST_JAX_COMPILATION_CACHE", "~/.cache/mnist_jax/xla") if directory is None else directory
    if not str(directory):
        return None
    path = Path(directory).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def reuse_freed_host_memory() -> bool:
    """Make glibc's malloc keep large freed blocks for reuse instead of unmapping them; True if it applied.

    XLA:CPU allocates an execution's scratch memory as one block. Above 32 MiB (glibc's
    largest mmap threshold) malloc maps that block afresh on every call and the kernel
    faults its pages in again, every training step: seed models vmapped in `fit_many` spent
    99 (K=2) and 163 (K=3) ms/step so, 64 and 111 ms with this. It is a
    setting of the whole process (freed memory then stays with the process until it
    exits), so entry points call it (the experiments do); the library never does on import.
    Call it before JAX's first computation: threads that already hold a malloc arena keep it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # mallopt parameters from <malloc.h>
    # One arena: a thread's own arena gives large freed blocks back to the kernel (and faults them in again).
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 1 << 30))
    return all([bool(libc.mallopt(param, value)) for param, value in settings])


@functools.lru_cache(maxsize=None)
def compiled_steps(dp: DataParallel) -> tuple[Any, Any, Any]:
    """The fit loop's steps for a mesh: explicit shardings (state replicated, batches split), old state donated."""
    rep, split = dp.replicated, dp.batch
    options = donation_compiler_options(dp.platform)
    device_step = jax.jit(
        _device_train_step, in_shardings=(rep, rep, rep, rep, split, rep), out_shardings=(rep, rep), donate_argnums=(0, 1),
        compiler_options=options,
    )  # fmt: skip
    host_step = jax.jit(
        _host_train_step, in_shardings=(rep, rep, split, rep), out_shardings=(rep, rep), donate_argnums=(0, 1), compiler_options=options
    )
    sharded_eval = jax.jit(_eval_step, in_shardings=(rep, split), out_shardings=rep)
    return device_step, host_step, sharded_eval


def eval_batch_size(batch_size: int, dp: DataParallel | None) -> int:
    """`batch_size` rounded up to a multiple of the mesh's devices, so each batch splits evenly."""
    return batch_size if dp is None else -(-batch_size // dp.num_devices) * dp.num_devices


def evaluate(state: TrainState, arrays: dict[str, Any], batch_size: int = EVAL_BATCH_SIZE, dp: DataParallel | None = None) -> dict[str, float]:
    """Loss and accuracy over every example of `arrays`; the last batch is padded and masked, never dropped.

    With `dp`, each batch is split over the mesh (the batch is rounded up to a multiple of its devices).
    """
    n = len(arrays["label"])
    step = eval_step if dp is None else compiled_steps(dp)[2]
    loss_sum = correct = 0.0
    for batch in data.padded_batches(arrays, eval_batch_size(batch_size, dp)):
        m = step(state, batch) if dp is None else dp.settle(step(state, dp.put_batch(batch)))
        loss_sum += m["loss"] * m["count"]
        correct += m["accuracy"] * m["count"]
    return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}


def default_workdir(dataset: str) -> Path:
    return Path("runs") / f"{dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def _link_latest(workdir: Path) -> None:
    latest = workdir.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = workdir.parent / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(workdir.name)
        tmp.replace(latest)


def _epoch_line(epoch: int, epochs: int, seconds: float, row: dict[str, float]) -> str:
    metrics = " - ".join(f"{k}: {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy"))
    return f"Epoch {epoch}/{epochs} - {seconds:.1f}s - {metrics}"


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; `--resume` continues


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and a checkpoint was written."""


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


@contextlib.contextmanager
def _stop_requests() -> Iterator[dict[str, int | None]]:
    """Turn the first SIGTERM/SIGINT into a flag the loop polls; a second one ends the process at once."""
    request: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request["signal"] is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        request["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _zero_sums() -> Metrics:
    return {"loss": jnp.zeros(()), "accuracy": jnp.zeros(()), "first_nonfinite_step": jnp.full((), -1, jnp.int32)}


def _accumulate(sums: Metrics, metrics: Metrics, step: jax.Array) -> Metrics:
    """Add a step's metrics to the epoch's sums; remember the first step whose loss was not finite."""
    bad = (sums["first_nonfinite_step"] < 0) & ~jnp.isfinite(metrics["loss"])
    return {
        "loss": sums["loss"] + metrics["loss"],
        "accuracy": sums["accuracy"] + metrics["accuracy"],
        "first_nonfinite_step": jnp.where(bad, step.astype(jnp.int32), sums["first_nonfinite_step"]),
    }


def _prepare_workdir(config: Config, resume: bool) -> Path:
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


def fit(
    config: Config, *, resume: bool = False, verbose: bool = True, before_epoch: Callable[[int], None] | None = None
) -> tuple[TrainState, dict[str, Any]]:
    """Train `config` end to end: data, state, epochs, checkpoints, history. Returns (state, history).

    With `resume`, continues from the latest checkpoint in `config.workdir`, mid-epoch
    included, and ends with the same parameters as an uninterrupted run. SIGTERM/SIGINT
    finish the current step, save a checkpoint and raise `Preempted`; a non-finite loss
    raises `NonFiniteLoss` without saving.

    `history` holds, per epoch: loss and accuracy (running means over the epoch's steps),
    val_loss, val_accuracy, epoch_time_s (steps, validation and checkpoint) and train_time_s
    (the steps alone); and compile_time_s (before the clock starts) and fit_time_s.

    `before_epoch(epoch)`, if given, is called with the 0-based epoch before that epoch's clock
    starts, once the previous epoch's checkpoint is written (the benchmark uses it to run Keras's
    and mnist_jax's epochs in turns).
    """
    config.validate()
    dp = data_parallel(config.devices)
    check_divisible(config.batch_size, dp.num_devices)
    lead = jax.process_index() == 0  # one process prints and writes the run's files
    say = print if verbose and lead else (lambda *a, **k: None)
    workdir = _prepare_workdir(config, resume)
    link_latest = config.workdir is None  # runs/latest follows default run folders only
    config = dataclasses.replace(config, workdir=str(workdir))

    where = {"data_dir": config.data_dir, "manual_dir": config.manual_dir, "arrays": config.arrays}
    train = data.load_split(config.dataset, "train", num_examples=config.train_examples, **where)
    test = data.load_split(config.dataset, "test", **where)
    num_train = len(train["label"])
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch size {config.batch_size} is larger than the {num_train} training examples")

    keys = StepKeys.from_seed(config.seed)
    state = dp.put_replicated(create_train_state(keys.init, config))
    manager = checkpoint.make_manager(workdir / "checkpoints", config.keep_checkpoints)
    history: dict[str, Any] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "epoch_time_s": [], "train_time_s": []}
    position = {"epoch": 0, "step_in_epoch": 0, "sums": None, "fit_time_s": 0.0, "epoch_time_s": 0.0}
    if resume:
        state, meta = checkpoint.restore_latest(manager, state)
        moved = checkpoint.set_aside_newer(manager, int(state.step))  # unreadable ones skipped above: this run rewrites them
        if moved:
            print(f"mnist_jax: warning: moved the unreadable checkpoint(s) to {moved[0].parent}", file=sys.stderr)
        history = {"train_time_s": [], **meta["history"]}  # checkpoints written before train_time_s existed
        position.update({k: meta[k] for k in position if k in meta})
        say(f"Resumed from {manager.directory} at step {int(state.step)} (epoch {position['epoch'] + 1}, step {position['step_in_epoch']} of {steps_per_epoch})")
    if lead:  # on resume too: the epochs to train and where the data is may have changed
        config.save(workdir / "config.json")
    if lead and link_latest:
        _link_latest(workdir)
    say(summary(make_model(config)))
    if dp.num_devices > 1:
        say(f"Data parallel over {dp.num_devices} devices ({jax.process_count()} process(es)): {config.batch_size // dp.num_devices} examples per device per step")

    device_step, host_step, eval_step_dp = compiled_steps(dp)
    per_call = resolve_steps_per_call(config, steps_per_epoch)
    # Compile before the clock starts, so epochs time training alone (a warm compilation cache makes this quick).
    compile_start = time.perf_counter()
    # The epoch's order, one compiled draw per epoch whatever the pipeline: chunks slice it on the device,
    # one-step calls and tf.data index it on the host (drawn eagerly, its ops compiled inside the first epoch).
    order_fn = compiled_epoch_order(dp, num_train, config.batch_size).lower(keys.data, dp.put_replicated(np.int32(0))).compile()
    if config.pipeline == "device":
        images, labels = dp.put_replicated(train["image"]), dp.put_replicated(train["label"])
        sums0 = dp.put_replicated(_zero_sums())
        if per_call == 1:
            indices = dp.put_batch(np.zeros(config.batch_size, np.int32))
            device_step = device_step.lower(state, sums0, images, labels, indices, keys.dropout).compile()
        else:
            scalar = dp.put_replicated(np.int32(0))
            order0 = jax.ShapeDtypeStruct((steps_per_epoch, config.batch_size), jnp.int32, sharding=dp.replicated)
            for n in {per_call, steps_per_epoch % per_call} - {0}:  # the full chunk, and the epoch's last, shorter one
                compiled_chunk(dp, n).lower(state, sums0, images, labels, order0, scalar, keys.dropout).compile()
    # Evaluation's step too (every batch has this one shape): compiled at its first call, each process
    # would reach evaluation's first collective whenever its own compilation happened to end.
    eval_batch = next(data.padded_batches(test, eval_batch_size(config.eval_batch_size, dp)))
    eval_step_dp.lower(state, dp.put_batch(eval_batch)).compile()
    history["compile_time_s"] = history.get("compile_time_s", 0.0) + time.perf_counter() - compile_start
    if config.pipeline == "device":
        say(f"Compiled in {time.perf_counter() - compile_start:.1f} s ({per_call} step(s) per call)")
    wait_for_all_processes("mnist_jax:fit:start")  # right before the first collective: none waits long in it

    def save(epoch: int, step_in_epoch: int, sums: Metrics, epoch_elapsed: float, metrics=None) -> None:
        _raise_if_nonfinite(sums, manager)
        if int(state.step) in manager.all_steps():
            return
        meta = {
            "epoch": epoch, "step_in_epoch": step_in_epoch, "history": copy.deepcopy(history),  # written later, in the background
            "sums": {k: v.item() for k, v in jax.device_get(sums).items()},
            "fit_time_s": fit_elapsed(), "epoch_time_s": epoch_elapsed,
        }  # fmt: skip
        checkpoint.save(manager, state, meta, metrics=metrics)

    def stop_here() -> None:
        manager.wait_until_finished()
        name = signal.Signals(stop["signal"]).name
        raise Preempted(f"stopped by {name} at step {int(state.step)}; checkpoint in {manager.directory}; continue with --resume")

    fit_start = time.perf_counter()
    waited = 0.0  # in `before_epoch`: not this run's time
    fit_elapsed = lambda: position["fit_time_s"] + time.perf_counter() - fit_start - waited  # noqa: E731
    # Closing the manager waits for async saves; `bars` clears the progress bar before an error is printed.
    with _stop_requests() as stop, manager, contextlib.ExitStack() as bars:
        for epoch in range(position["epoch"], config.epochs):
            if before_epoch is not None:
                manager.wait_until_finished()  # the last epoch's checkpoint is written: nothing of this run runs on
                wait_start = time.perf_counter()
                before_epoch(epoch)
                waited += time.perf_counter() - wait_start
            resumed_here = epoch == position["epoch"]
            first_step = position["step_in_epoch"] if resumed_here else 0
            epoch_start = time.perf_counter() - (position["epoch_time_s"] if resumed_here else 0.0)
            sums = _zero_sums()
            if resumed_here and position["sums"]:
                sums = {k: jnp.asarray(v, sums[k].dtype) for k, v in position["sums"].items()}
            sums = dp.put_replicated(sums)
            order = order_fn(keys.data, dp.put_replicated(np.int32(epoch)))
            if per_call > 1:  # each chunk slices the epoch's order on the device
                advance = lambda state, sums, start, n: compiled_chunk(dp, n)(  # noqa: E731
                    state, sums, images, labels, order, dp.put_replicated(np.int32(start)), keys.dropout
                )
            else:
                order = np.asarray(order)
                if config.pipeline == "tfdata":
                    feed = data.tf_batches(train, order[first_step:])
                    advance = lambda state, sums, start, n: host_step(state, sums, dp.put_batch(next(feed)), keys.dropout)  # noqa: E731
                else:
                    advance = lambda state, sums, start, n: device_step(state, sums, images, labels, dp.put_batch(order[start]), keys.dropout)  # noqa: E731
            bar = bars.enter_context(tqdm(total=steps_per_epoch, initial=first_step, desc=f"Epoch {epoch + 1}/{config.epochs}",
                       disable=not (verbose and lead), leave=False))  # fmt: skip
            done = first_step
            while done < steps_per_epoch:
                n = min(per_call, steps_per_epoch - done)
                state, sums = dp.settle(advance(state, sums, done, n))
                done += n
                step = epoch * steps_per_epoch + done  # = state.step, known without a host sync
                if stop["signal"] is not None and done < steps_per_epoch:  # at the epoch's end: validate and save it as usual first
                    save(epoch, done, sums, time.perf_counter() - epoch_start)
                    stop_here()
                every = config.checkpoint_every_steps
                if every and step // every > (step - n) // every and done < steps_per_epoch:
                    save(epoch, done, sums, time.perf_counter() - epoch_start)
                if done // 100 > (done - n) // 100 or done == steps_per_epoch:  # a host sync: not every step
                    _raise_if_nonfinite(sums, manager)
                    running = {k: f"{float(sums[k]) / done:.4f}" for k in ("loss", "accuracy")}
                    bar.set_postfix(running, refresh=False)
                    bar.update(done - bar.n)
            bar.close()
            _raise_if_nonfinite(sums, manager)  # a host sync: the epoch's steps have run
            train_seconds = time.perf_counter() - epoch_start
            val = evaluate(state, test, config.eval_batch_size, dp)
            row = {"loss": float(sums["loss"]) / steps_per_epoch, "accuracy": float(sums["accuracy"]) / steps_per_epoch}
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            seconds = time.perf_counter() - epoch_start
            for key, value in {**row, "epoch_time_s": seconds, "train_time_s": train_seconds}.items():
                history[key].append(value)
            say(_epoch_line(epoch + 1, config.epochs, seconds, row))
            save(epoch + 1, 0, dp.put_replicated(_zero_sums()), 0.0, metrics=val)
            if stop["signal"] is not None and epoch + 1 < config.epochs:
                stop_here()
    history["fit_time_s"] = fit_elapsed()

    test_metrics = evaluate(state, test, config.eval_batch_size, dp)
    metrics = {"test_loss": test_metrics["loss"], "test_accuracy": test_metrics["accuracy"]}
    if lead:
        (workdir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    say(f"Fit Time : {history['fit_time_s']:.1f} s")
    say(f"Test Loss : {test_metrics['loss']:.4f}")
    say(f"Test Accuracy : {test_metrics['accuracy']:.4f}")
    say(f"Workdir : {workdir}")
    return state, history


def _raise_if_nonfinite(sums: Metrics, manager) -> None:
    step = int(sums["first_nonfinite_step"])
    if step >= 0:
        kept = manager.latest_step()
        where = f"last good checkpoint: step {kept} in {manager.directory}" if kept is not None else "no checkpoint was written"
        raise NonFiniteLoss(f"loss became NaN/Inf at step {step + 1}; stopped ({where})")
