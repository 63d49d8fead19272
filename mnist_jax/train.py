"""`fit`: a whole training run. Prepare (workdir, data, state, resume) → compile → per epoch: run → validate
→ checkpoint → write. The steps are `mnist_jax.steps`'s pure functions, fed by `mnist_jax.loop`.

A resumed run (`fit(config, resume=True)`) continues from the latest checkpoint, mid-epoch included, and
ends with the same parameters as an uninterrupted one: each checkpoint holds the state and the run's
`Position` (epoch, step in it, the epoch's metric sums so far, time spent) and history.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState
from tqdm.auto import tqdm

from mnist_jax import checkpoint, data, loop, steps
from mnist_jax.config import Config, UserError, parse_step_range
from mnist_jax.files import atomic_write
from mnist_jax.model import summary
from mnist_jax.parallel import DataParallel, check_divisible, data_parallel, wait_for_all_processes
from mnist_jax.runtime import StopRequest
from mnist_jax.tblog import TensorBoardLog
from mnist_jax.tracing import StepTrace
from mnist_jax.workdir import claim_workdir, completed_run, link_latest

# Names that lived here before the steps and the loop had modules of their own.
from mnist_jax.loop import CPU_STEPS_PER_CALL, evaluate, resolve_steps_per_call  # noqa: F401
from mnist_jax.steps import StepKeys, create_train_state, eval_step, make_model, make_optimizer, predict, train_step  # noqa: F401

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; `--resume` continues
PROGRESS_EVERY = 100  # steps between progress-bar updates and NaN checks (each is a host sync)
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s", "train_time_s")


class Preempted(Exception):
    """A stop was requested (SIGTERM/SIGINT under `runtime.stop_on_signals`): the current call of steps
    finished and a checkpoint was written."""


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Position:
    """Where a run stands, as its checkpoints record it: epoch, step in that epoch, the epoch's metric sums
    so far (None: zero), and the seconds of fitting and of the current epoch spent before this process."""

    epoch: int = 0
    step_in_epoch: int = 0
    sums: dict[str, float] | None = None
    fit_time_s: float = 0.0
    epoch_time_s: float = 0.0


@dataclasses.dataclass
class RunCheckpoints:
    """Writes the run's checkpoints (state, `Position`, history) through an Orbax manager, after the NaN guard."""

    manager: ocp.CheckpointManager
    history: dict[str, Any]
    fit_clock: loop.Stopwatch
    tb: TensorBoardLog  # flushed before each checkpoint: a resumed run's curves miss nothing before it

    def raise_if_nonfinite(self, sums: steps.Metrics) -> None:
        step = loop.first_nonfinite_step(sums)
        if step is not None:
            kept = self.manager.latest_step()
            where = f"last good checkpoint: step {kept} in {self.manager.directory}" if kept is not None else "no checkpoint was written"
            raise NonFiniteLoss(f"loss became NaN/Inf at step {step}; stopped ({where})")

    def save(self, state: TrainState, position: Position, sums: steps.Metrics, metrics: dict[str, float] | None = None) -> None:
        """Checkpoint `state` at `position` (its sums and fit time taken from `sums` and the clock), once per step."""
        self.raise_if_nonfinite(sums)
        if int(state.step) in self.manager.all_steps():
            return
        sums = {k: v.item() for k, v in jax.device_get(sums).items()}
        position = dataclasses.replace(position, sums=sums, fit_time_s=self.fit_clock.elapsed())
        meta = {**dataclasses.asdict(position), "history": copy.deepcopy(self.history)}  # written later, in the background
        self.tb.flush()
        checkpoint.save(self.manager, state, meta, metrics=metrics)

    def stopped(self, state: TrainState, stop: StopRequest) -> Preempted:
        self.manager.wait_until_finished()
        return Preempted(f"stopped by {stop.name} at step {int(state.step)}; checkpoint in {self.manager.directory}; continue with --resume")


@dataclasses.dataclass
class EpochWatch:
    """`fit`'s `loop.EpochHooks`: around each compiled call, the profiler trace; after it, stop on request
    (after a checkpoint), a checkpoint every `every` steps, and every `PROGRESS_EVERY` steps the NaN guard,
    the progress bar and TensorBoard's training scalars (one host sync)."""

    epoch: int
    steps_per_epoch: int
    every: int
    stop: StopRequest
    saver: RunCheckpoints
    trace: StepTrace
    epoch_clock: loop.Stopwatch
    bar: Any

    def before_call(self, done: int, n: int) -> None:
        self.trace.before_call(self.epoch * self.steps_per_epoch + done, n)

    def after_call(self, state: TrainState, sums: steps.Metrics, done: int, n: int) -> None:
        step = self.epoch * self.steps_per_epoch + done
        self.trace.after_call(state, step)
        inside = done < self.steps_per_epoch  # at the epoch's end, fit validates and checkpoints it as usual
        if done // PROGRESS_EVERY > (done - n) // PROGRESS_EVERY or not inside:  # a host sync: not every step
            self.saver.raise_if_nonfinite(sums)
            running = {k: float(sums[k]) / done for k in ("loss", "accuracy")}
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()}, refresh=False)
            self.bar.update(done - self.bar.n)
            self.saver.tb.train(step, **running)  # before a checkpoint: a run resumed from it continues after this step
        if inside and (self.stop.requested or loop.checkpoint_due(self.every, step, n)):
            self.saver.save(state, Position(self.epoch, done, epoch_time_s=self.epoch_clock.elapsed()), sums)
        if inside and self.stop.requested:
            raise self.saver.stopped(state, self.stop)


def raise_if_stopped(stop: StopRequest, manager: ocp.CheckpointManager, resume: bool) -> None:
    """`Preempted` if a stop was requested before training started (while the data loaded or the steps
    compiled): nothing was trained, so nothing is saved; a resumed run stays at its checkpoint."""
    if stop.requested:
        kept = f"the run is as it was (checkpoint step {manager.latest_step()} in {manager.directory}); continue with --resume"
        raise Preempted(f"stopped by {stop.name} before training started; {kept if resume else 'nothing was trained or saved'}")


def load_run_data(config: Config) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The run's training examples (`config.train_examples`) and its whole test split, checked."""
    where = {"data_dir": config.data_dir, "manual_dir": config.manual_dir, "arrays": config.arrays}
    train = data.load_split(config.dataset, "train", num_examples=config.train_examples, **where)
    return train, data.load_split(config.dataset, "test", **where)


def compile_programs(
    config: Config, dp: DataParallel, train: dict[str, np.ndarray], test: dict[str, np.ndarray], keys: StepKeys, state: TrainState,
    steps_per_epoch: int,
) -> tuple[loop.Feed, int, Any]:
    """(feed, per_call, eval_fn): the compiled training feed (`per_call` steps per call) and evaluation step
    (every evaluation batch has one shape), built before the clock starts so that epochs time training alone."""  # fmt: skip
    per_call = loop.resolve_steps_per_call(config, steps_per_epoch)
    feed = make_feed(config, dp, train, keys, per_call)
    feed.compile(state, dp.put_replicated(steps.zero_sums()), (steps_per_epoch, config.batch_size))
    eval_batch = next(data.padded_batches(test, loop.eval_batch_size(config.eval_batch_size, dp)))
    return feed, per_call, eval_step.lower(state, dp.put_batch(eval_batch)).compile()


def make_feed(config: Config, dp: DataParallel, train: dict[str, np.ndarray], keys: StepKeys, per_call: int) -> loop.Feed:
    """The way `config.pipeline` and `per_call` feed `steps.train_step` (not compiled yet)."""
    if config.pipeline == "tfdata":
        return loop.TfDataBatches(steps.train_step, dp, train, keys.dropout)
    images, labels = dp.put_replicated(train["image"]), dp.put_replicated(train["label"])
    steps_per_epoch = len(train["label"]) // config.batch_size
    return loop.device_feed(loop.one_model_step(steps.train_step, dp), dp, images, labels, keys.dropout, per_call, steps_per_epoch)


def restore_position(manager: ocp.CheckpointManager, state: TrainState) -> tuple[TrainState, Position, dict[str, Any]]:
    """The latest readable checkpoint's state, position and history; newer unreadable ones set aside."""
    state, meta = checkpoint.restore_latest(manager, state)
    moved = checkpoint.set_aside_newer(manager, int(state.step))  # unreadable ones skipped above: this run rewrites them
    if moved:
        print(f"mnist_jax: warning: moved the unreadable checkpoint(s) to {moved[0].parent}", file=sys.stderr)
    fields = {f.name for f in dataclasses.fields(Position)}
    history = {"train_time_s": [], **meta["history"]}  # checkpoints written before train_time_s existed
    return state, Position(**{k: v for k, v in meta.items() if k in fields}), history


def fit(
    config: Config, *, resume: bool = False, verbose: bool = True, before_epoch: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Train `config` end to end in its workdir (held: `workdir.claim_workdir`). Returns (state, history).

    `resume` continues from the latest checkpoint (a complete run: nothing written, its history returned).
    `stop` (`runtime.stop_on_signals`) is polled between compiled calls: the call finishes, a checkpoint is
    written, `Preempted` is raised (before any step: nothing saved). A non-finite loss: `NonFiniteLoss`.
    `history`: per epoch loss, accuracy (running means), val_loss, val_accuracy, epoch_time_s, train_time_s
    (steps alone); compile_time_s, fit_time_s. `before_epoch(epoch)` runs outside the clock, after the
    previous epoch's checkpoint is written.
    """  # fmt: skip
    config.validate()
    dp = data_parallel(config.devices)
    check_divisible(config.batch_size, dp.num_devices)
    lead = jax.process_index() == 0  # one process prints and writes the run's files
    say = print if verbose and lead else (lambda *a, **k: None)
    stop = stop or StopRequest()
    # The folder is this process's until fit returns or raises (a second process there is refused); `closing`
    # then closes the manager (waiting for async saves), the trace, TensorBoard and the progress bar, in reverse.
    with claim_workdir(config, resume) as workdir, contextlib.ExitStack() as closing:
        link = config.workdir is None  # runs/latest follows default run folders only
        config = dataclasses.replace(config, workdir=str(workdir))
        train, test = load_run_data(config)
        steps_per_epoch = loop.check_steps_per_epoch(len(train["label"]), config.batch_size)
        keys = StepKeys.from_seed(config.seed)
        state = dp.put_replicated(create_train_state(keys.init, config))
        manager = closing.enter_context(checkpoint.make_manager(workdir / "checkpoints", config.keep_checkpoints))
        state, position, history = restore_position(manager, state) if resume else (state, Position(), {k: [] for k in HISTORY_KEYS})
        if resume and (complete := completed_run(workdir, config.epochs, position.epoch, position.step_in_epoch, int(state.step))):
            say(complete)  # and nothing written: not even config.json's --epochs
            return state, json.loads((workdir / "history.json").read_text())
        raise_if_stopped(stop, manager, resume)  # a stop while the data loaded
        if resume:
            say(f"Resumed from {manager.directory} at step {int(state.step)} (epoch {position.epoch + 1}, step {position.step_in_epoch} of {steps_per_epoch})")
        say(summary(make_model(config)) + describe_devices(dp, config.batch_size))

        compile_clock, order = loop.Stopwatch(), loop.epoch_order(dp, keys.data, len(train["label"]), config.batch_size)
        feed, per_call, eval_fn = compile_programs(config, dp, train, test, keys, state, steps_per_epoch)
        history["compile_time_s"] = history.get("compile_time_s", 0.0) + compile_clock.elapsed()
        raise_if_stopped(stop, manager, resume)  # a stop while compiling
        if lead:  # on resume too: the epochs to train and where the data is may have changed
            config.save(workdir / "config.json")
        if lead and link:
            link_latest(workdir)
        say(f"Compiled in {compile_clock.elapsed():.1f} s ({per_call} step(s) per call)")
        wait_for_all_processes(f"mnist_jax:fit:start:{workdir}:{int(state.step)}")  # right before the first collective

        tb = closing.enter_context(TensorBoardLog(workdir / "tb" if config.tensorboard and lead else None, resumed_at=int(state.step) if resume else None))
        saver = RunCheckpoints(manager, history, loop.Stopwatch(position.fit_time_s), tb)
        trace = closing.enter_context(StepTrace(parse_step_range(config.profile_steps), workdir / "profile"))
        for epoch in range(position.epoch, config.epochs):
            if before_epoch is not None:
                manager.wait_until_finished()  # the last epoch's checkpoint is written: nothing of this run runs on
                with saver.fit_clock.paused():
                    before_epoch(epoch)
            resumed = position if epoch == position.epoch else Position(epoch)
            epoch_clock, sums = loop.Stopwatch(resumed.epoch_time_s), dp.put_replicated(steps.sums_from_host(resumed.sums))
            feed.start_epoch(order(epoch), resumed.step_in_epoch)
            bar = closing.enter_context(tqdm(total=steps_per_epoch, initial=resumed.step_in_epoch, desc=f"Epoch {epoch + 1}/{config.epochs}",
                                             disable=not (verbose and lead), leave=False))  # fmt: skip
            watch = EpochWatch(epoch, steps_per_epoch, config.checkpoint_every_steps, stop, saver, trace, epoch_clock, bar)
            state, sums = loop.run_epoch(feed, state, sums, first_step=resumed.step_in_epoch, num_steps=steps_per_epoch,
                                         per_call=per_call, hooks=watch)  # fmt: skip
            bar.close()
            train_seconds = epoch_clock.elapsed()
            val = evaluate(state, test, config.eval_batch_size, dp, eval_fn)
            row = {"loss": float(sums["loss"]) / steps_per_epoch, "accuracy": float(sums["accuracy"]) / steps_per_epoch,
                   "val_loss": val["loss"], "val_accuracy": val["accuracy"], "epoch_time_s": epoch_clock.elapsed(), "train_time_s": train_seconds}  # fmt: skip
            for key in HISTORY_KEYS:
                history[key].append(row[key])
            say(epoch_line(epoch + 1, config.epochs, row))
            tb.epoch((epoch + 1) * steps_per_epoch, {**row, "learning_rate": config.learning_rate})
            saver.save(state, Position(epoch + 1), dp.put_replicated(steps.zero_sums()), metrics=val)
            if stop.requested and epoch + 1 < config.epochs:
                raise saver.stopped(state, stop)
        trace.stop(state)
        manager.wait_until_finished()  # fit_time_s includes writing the last checkpoint
        history["fit_time_s"] = saver.fit_clock.elapsed()
        test_metrics = evaluate(state, test, config.eval_batch_size, dp, eval_fn)
        tb.hparams(config.flat_dict(), {"test_accuracy": test_metrics["accuracy"], "test_loss": test_metrics["loss"]})
        write_results(workdir, history, {**test_metrics, "examples": len(test["label"])}, say, lead)
    return state, history


def describe_devices(dp: DataParallel, batch_size: int) -> str:
    """A line on the data parallelism of a run over several devices; empty for one device."""
    if dp.num_devices == 1:
        return ""
    return f"\nData parallel over {dp.num_devices} devices ({jax.process_count()} process(es)): {batch_size // dp.num_devices} examples per device per step"


def write_results(workdir: Path, history: dict[str, Any], test: dict[str, float], say: Callable[..., None], lead: bool) -> None:
    """history.json and metrics.json (by the lead process), and the run's last lines."""
    if lead:
        atomic_write(workdir / "history.json", lambda tmp: tmp.write_text(json.dumps(history, indent=2) + "\n"))
        metrics = {"test_loss": test["loss"], "test_accuracy": test["accuracy"], "test_examples": test["examples"]}
        atomic_write(workdir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))  # last: it marks the run complete
    say(f"Fit Time : {history['fit_time_s']:.1f} s")
    say(f"Test Loss : {test['loss']:.4f}")
    say(f"Test Accuracy : {test['accuracy']:.4f}")
    say(f"Workdir : {workdir}")


def epoch_line(epoch: int, epochs: int, row: dict[str, float]) -> str:
    metrics = " - ".join(f"{k}: {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy"))
    return f"Epoch {epoch}/{epochs} - {row['epoch_time_s']:.1f}s - {metrics}"
