"""step_time: milliseconds per seed-recipe training step on the device at hand, for each way the library can run it.

The seed recipe's step (batch 32, dropout, Adam 1e-3), with the data on the device, timed as `fit` runs it:
`--steps` steps per compiled call (`loop.jit_chunk`: the steps under `lax.scan`, old state donated,
after `loop.epoch_order` drew the epoch's order on the device; both timed), in float32 and bfloat16, with each form of convolution
(`model.Conv`), and with the scan's loop unrolled `--unrolls` steps per iteration; and one step per call
(`loop.jit_step`: a host dispatch per step) for comparison. Each variant is compiled first (timed
apart), then run `--repeats` times; the median call gives ms/step. The mean training loss of each call is
printed too, so a variant that computes something else shows.

With `--trace-steps N`, one call of N steps of the first variant also runs under `jax.profiler.trace` and
its Perfetto trace (`trace.json.gz`) lands in the output folder, to read each kernel's time off it.
"""

import dataclasses
import functools
import itertools
import shutil
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from common import Run, figure, load, markdown_table, parse_args
from mnist_jax import Config, loop, steps
from mnist_jax.model import CNN, IMAGE_SHAPE
from mnist_jax.parallel import DataParallel, data_parallel
from mnist_jax.steps import StepKeys, make_optimizer


@dataclasses.dataclass
class Bench:
    """The seed recipe's step on the training split, resident on the device."""

    config: Config
    dp: DataParallel
    keys: StepKeys
    images: jax.Array
    labels: jax.Array
    num_examples: int

    def scalar(self, value: int) -> jax.Array:
        return self.dp.put_replicated(np.int32(value))

    def zero_sums(self) -> Any:
        return self.dp.put_replicated(steps.zero_sums())

    @functools.cached_property
    def order(self):
        """epoch -> the epoch's order [steps, batch] on the device (compiled on first use)."""
        return loop.epoch_order(self.dp, self.keys.data, self.num_examples, self.config.batch_size)

    def one_step(self) -> loop.OneStep:
        return loop.one_model_step(steps.train_step, self.dp)

    def fresh_state(self, dtype: str, form: str) -> TrainState:
        model = CNN(dtype=jnp.dtype(dtype), conv_form=form)
        params = model.init(self.keys.init, jnp.zeros((1, *IMAGE_SHAPE)), train=False)["params"]
        return self.dp.put_replicated(TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(self.config)))

    def operands(self, epoch: int) -> tuple:
        """(images, labels, order, start, dropout_key) of a chunk from the start of `epoch`."""
        return self.images, self.labels, self.order(epoch), self.scalar(0), self.keys.dropout


def timed(call, state):
    """(seconds, new state, mean loss) of one call, waited for."""
    start = time.perf_counter()
    state, sums = jax.block_until_ready(call(state))
    return time.perf_counter() - start, state, float(sums["loss"])


def time_chunks(bench: Bench, args, run: Run, dtype: str, form: str, unroll: int, trace: bool) -> tuple[dict, list]:
    """`--steps` steps per compiled call: compiled (timed), then one warm-up and `--repeats` timed calls; with
    `trace`, a call of `--trace-steps` steps under the profiler."""
    state = bench.fresh_state(dtype, form)
    start = time.perf_counter()
    chunk = loop.jit_chunk(bench.one_step(), bench.dp, args.steps, unroll).lower(state, bench.zero_sums(), *bench.operands(0)).compile()
    compile_s = time.perf_counter() - start
    seconds, losses = [], []
    for epoch in range(args.repeats + 1):  # the first call warms up (allocations, autotuning), untimed
        s, state, loss = timed(lambda st: chunk(st, bench.zero_sums(), *bench.operands(epoch)), state)
        if epoch:
            seconds.append(s)
            losses.append(loss / args.steps)
    ms = 1000 * statistics.median(seconds) / args.steps
    result = {"dtype": dtype, "form": form, "unroll": unroll, "steps_per_call": args.steps, "ms_per_step": ms,
              "call_s": seconds, "compile_s": compile_s, "mean_loss": losses}  # fmt: skip
    row = [dtype, f"`{form}`", unroll, args.steps, f"{ms:.3f}", f"{min(seconds):.3f}–{max(seconds):.3f}",
           f"{ms * 5 * (60000 // bench.config.batch_size) / 1000:.2f}", f"{compile_s:.1f}", " / ".join(f"{x:.4f}" for x in losses)]  # fmt: skip
    print("| " + " | ".join(map(str, row)) + " |", flush=True)
    if trace:
        short = loop.jit_chunk(bench.one_step(), bench.dp, args.trace_steps, unroll)
        state = jax.block_until_ready(short(state, bench.zero_sums(), *bench.operands(0)))[0]  # compiled outside the trace
        with jax.profiler.trace(run.out / "profile", create_perfetto_trace=True):
            state = jax.block_until_ready(short(state, bench.zero_sums(), *bench.operands(1)))[0]
        for path in (run.out / "profile").rglob("perfetto_trace.json.gz"):
            shutil.copy(path, run.out / "trace.json.gz")
    return result, row


def time_dispatch(bench: Bench, args, dtype: str, form: str) -> tuple[dict, list]:
    """One step per compiled call (a host dispatch each): 20 warm-up steps, then `--dispatch-steps` timed."""
    state = bench.fresh_state(dtype, form)
    device_step = loop.jit_step(bench.one_step(), bench.dp)
    order = np.asarray(bench.order(0))
    batches = [bench.dp.put_batch(b) for b in order[: args.dispatch_steps + 20]]
    sums = bench.zero_sums()
    for indices in batches[:20]:  # warm-up, compilation included
        state, sums = device_step(state, sums, bench.images, bench.labels, indices, bench.keys.dropout)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for indices in batches[20:]:
        state, sums = device_step(state, sums, bench.images, bench.labels, indices, bench.keys.dropout)
    jax.block_until_ready(state)
    ms = 1000 * (time.perf_counter() - start) / args.dispatch_steps
    result = {"dtype": dtype, "form": form, "unroll": None, "steps_per_call": 1, "ms_per_step": ms}
    row = [dtype, f"`{form}`", "–", 1, f"{ms:.3f}", "", f"{ms * 5 * (60000 // bench.config.batch_size) / 1000:.2f}", "", ""]
    print("| " + " | ".join(map(str, row)) + " |", flush=True)
    return result, row


def plot(args, results, device):
    """Milliseconds per step of each variant."""
    fig, (ax,) = figure(width=8)
    labels = [f"{r['dtype'][:4]} {r['form']} u{r['unroll'] or '-'} x{r['steps_per_call']}" for r in results]
    ax.barh(range(len(results)), [r["ms_per_step"] for r in results])
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.set_xlabel("ms per training step")
    ax.grid(alpha=0.4, axis="x")
    fig.suptitle(f"Seed-recipe step on {device} ({'quick' if args.quick else 'full'} size)")
    return fig


def main() -> None:
    args = parse_args(__doc__, full=dict(steps=1875, repeats=3, dtypes=["float32", "bfloat16"], forms=["matmul", "xla"], unrolls=[1, 4],
                                         dispatch_steps=300, trace_steps=0),
                      quick=dict(steps=50, repeats=2, dtypes=["float32"], unrolls=[1, 2], dispatch_steps=20), seeds="1")  # fmt: skip
    run = Run(args)
    train, _ = load(args)
    config = Config(seed=args.seeds[0])
    dp = data_parallel()
    bench = Bench(config, dp, StepKeys.from_seed(config.seed), dp.put_replicated(train["image"]), dp.put_replicated(train["label"]),
                  len(train["label"]))  # fmt: skip

    results, rows = [], []
    for dtype, form, unroll in itertools.product(args.dtypes, args.forms, args.unrolls):
        result, row = time_chunks(bench, args, run, dtype, form, unroll, trace=bool(args.trace_steps) and not results)
        results.append(result)
        rows.append(row)
    for dtype, form in itertools.product(args.dtypes, args.forms) if args.dispatch_steps else ():  # one step per call: a host dispatch each
        result, row = time_dispatch(bench, args, dtype, form)
        results.append(result)
        rows.append(row)

    device = f"{run.meta['machine']['device']} ({run.meta['machine']['jax_backend']})"
    headers = ["compute", "conv form", "unroll", "steps per call", "ms/step (median)", "call s (range)", "5 epochs s at this rate", "compile s",
               "mean loss per call"]  # fmt: skip
    table = markdown_table(headers, rows) + f"\n\nDevice: {device}; seed recipe, batch {config.batch_size}; training steps only."
    run.finish({"device": device, "variants": results}, table, plot(args, results, device))


if __name__ == "__main__":
    main()
