"""step_time: milliseconds per seed-recipe training step on the device at hand, for each way the library can run it.

The seed recipe's step (batch 32, dropout, Adam 1e-3), with the data on the device, timed as `fit` runs it:
`--steps` steps per compiled call (`train.compiled_chunk`: the steps under `lax.scan`, old state donated,
after `train.compiled_epoch_order` drew the epoch's order on the device; both timed), in float32 and bfloat16, with each form of convolution
(`model.Conv`), and with the scan's loop unrolled `--unrolls` steps per iteration; and one step per call
(`train.compiled_steps`: a host dispatch per step) for comparison. Each variant is compiled first (timed
apart), then run `--repeats` times; the median call gives ms/step. The mean training loss of each call is
printed too, so a variant that computes something else shows.

With `--trace-steps N`, one call of N steps of the first variant also runs under `jax.profiler.trace` and
its Perfetto trace (`trace.json.gz`) lands in the output folder, to read each kernel's time off it.
"""

import itertools
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from common import Run, figure, load, markdown_table, parse_args
from mnist_jax import Config
from mnist_jax.model import CNN, IMAGE_SHAPE
from mnist_jax.parallel import data_parallel
from mnist_jax.train import StepKeys, _zero_sums, compiled_chunk, compiled_epoch_order, compiled_steps, make_optimizer

args = parse_args(__doc__, full=dict(steps=1875, repeats=3, dtypes=["float32", "bfloat16"], forms=["matmul", "xla"], unrolls=[1, 4],
                                     dispatch_steps=300, trace_steps=0),
                  quick=dict(steps=50, repeats=2, dtypes=["float32"], unrolls=[1, 2], dispatch_steps=20), seeds="1")  # fmt: skip
run = Run(args)
train, _ = load(args)
config = Config(seed=args.seeds[0])
dp = data_parallel()
keys = StepKeys.from_seed(config.seed)
images, labels = dp.put_replicated(train["image"]), dp.put_replicated(train["label"])


def scalar(value: int) -> jax.Array:
    return dp.put_replicated(np.int32(value))


def fresh_state(dtype: str, form: str) -> TrainState:
    model = CNN(dtype=jnp.dtype(dtype), conv_form=form)
    params = model.init(keys.init, jnp.zeros((1, *IMAGE_SHAPE)), train=False)["params"]
    return dp.put_replicated(TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config)))


def timed(call, state):
    """(seconds, new state, mean loss) of one call, waited for."""
    start = time.perf_counter()
    state, sums = jax.block_until_ready(call(state))
    return time.perf_counter() - start, state, float(sums["loss"])


results, rows = [], []
for dtype, form, unroll in itertools.product(args.dtypes, args.forms, args.unrolls):
    state = fresh_state(dtype, form)
    start = time.perf_counter()
    order_fn = compiled_epoch_order(dp, len(train["label"]), config.batch_size)
    operands = lambda epoch: (images, labels, order_fn(keys.data, scalar(epoch)), scalar(0), keys.dropout)  # noqa: E731
    chunk = compiled_chunk(dp, args.steps, unroll).lower(state, dp.put_replicated(_zero_sums()), *operands(0)).compile()
    compile_s = time.perf_counter() - start
    seconds, losses = [], []
    for epoch in range(args.repeats + 1):  # the first call warms up (allocations, autotuning), untimed
        s, state, loss = timed(lambda st: chunk(st, dp.put_replicated(_zero_sums()), *operands(epoch)), state)
        if epoch:
            seconds.append(s)
            losses.append(loss / args.steps)
    ms = 1000 * statistics.median(seconds) / args.steps
    results.append({"dtype": dtype, "form": form, "unroll": unroll, "steps_per_call": args.steps, "ms_per_step": ms,
                    "call_s": seconds, "compile_s": compile_s, "mean_loss": losses})  # fmt: skip
    rows.append([dtype, f"`{form}`", unroll, args.steps, f"{ms:.3f}", f"{min(seconds):.3f}–{max(seconds):.3f}",
                 f"{ms * 5 * (60000 // config.batch_size) / 1000:.2f}", f"{compile_s:.1f}", " / ".join(f"{x:.4f}" for x in losses)])  # fmt: skip
    print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)
    if args.trace_steps and len(results) == 1:
        short = compiled_chunk(dp, args.trace_steps, unroll)
        state = jax.block_until_ready(short(state, dp.put_replicated(_zero_sums()), *operands(0)))[0]  # compiled outside the trace
        with jax.profiler.trace(run.out / "profile", create_perfetto_trace=True):
            state = jax.block_until_ready(short(state, dp.put_replicated(_zero_sums()), *operands(1)))[0]
        for trace in (run.out / "profile").rglob("perfetto_trace.json.gz"):
            shutil.copy(trace, run.out / "trace.json.gz")

for dtype, form in itertools.product(args.dtypes, args.forms) if args.dispatch_steps else ():  # one step per call: a host dispatch each
    state = fresh_state(dtype, form)
    device_step = compiled_steps(dp)[0]
    order = np.asarray(compiled_epoch_order(dp, len(train["label"]), config.batch_size)(keys.data, scalar(0)))
    batches = [dp.put_batch(b) for b in order[: args.dispatch_steps + 20]]
    sums = dp.put_replicated(_zero_sums())
    for indices in batches[:20]:  # warm-up, compilation included
        state, sums = device_step(state, sums, images, labels, indices, keys.dropout)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for indices in batches[20:]:
        state, sums = device_step(state, sums, images, labels, indices, keys.dropout)
    jax.block_until_ready(state)
    ms = 1000 * (time.perf_counter() - start) / args.dispatch_steps
    results.append({"dtype": dtype, "form": form, "unroll": None, "steps_per_call": 1, "ms_per_step": ms})
    rows.append([dtype, f"`{form}`", "–", 1, f"{ms:.3f}", "", f"{ms * 5 * (60000 // config.batch_size) / 1000:.2f}", "", ""])
    print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)

device = f"{run.meta['machine']['device']} ({run.meta['machine']['jax_backend']})"
headers = ["compute", "conv form", "unroll", "steps per call", "ms/step (median)", "call s (range)", "5 epochs s at this rate", "compile s",
           "mean loss per call"]  # fmt: skip
table = markdown_table(headers, rows) + f"\n\nDevice: {device}; seed recipe, batch {config.batch_size}; training steps only."
fig, (ax,) = figure(width=8)
labels_ = [f"{r['dtype'][:4]} {r['form']} u{r['unroll'] or '-'} x{r['steps_per_call']}" for r in results]
ax.barh(range(len(results)), [r["ms_per_step"] for r in results])
ax.set_yticks(range(len(results)), labels_, fontsize=7)
ax.set_xlabel("ms per training step")
ax.grid(alpha=0.4, axis="x")
fig.suptitle(f"Seed-recipe step on {device} ({'quick' if args.quick else 'full'} size)")
run.finish({"device": device, "variants": results}, table, fig)
