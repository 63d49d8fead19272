"""conv_forms: the seed recipe's training speed with each form of convolution, on whatever device JAX runs on.

`mnist_jax.model.Conv` trains as one matmul over shifted views of its input (`form="matmul"`), chosen on
XLA:CPU, where its gradients ran ~10 % faster per step than those of XLA's convolution (`form="xla"`).
Accelerators may differ, so this measures both on the device at hand: the seed recipe (batch 32,
dropout, Adam) through the library's `fit_many` (data on the device, `steps_per_call` auto), the same
seeds for both forms, which are run alternately (`--rounds` times each) so that machine noise falls
on both. Reported: training seconds per epoch (evaluation excluded) and test accuracy.
"""

import statistics

from common import Run, figure, load, markdown_table, parse_args
from mnist_jax import Config
from mnist_jax.model import CNN, CONV_FORMS
from mnist_jax.multi import fit_many


def main() -> None:
    args = parse_args(__doc__, full=dict(train_examples=60000, epochs=2, rounds=2), quick=dict(train_examples=9600, rounds=2), seeds="1")
    run = Run(args)
    train, test = load(args, args.train_examples)
    config = Config(dataset=args.dataset, epochs=args.epochs, seed=args.seeds[0])
    steps = args.train_examples // config.batch_size
    times = {form: [] for form in CONV_FORMS}  # steady epochs (the first of each run holds warm-up)
    accuracy, compile_s = {}, {}
    for round_ in range(args.rounds):
        for form in CONV_FORMS if round_ % 2 == 0 else CONV_FORMS[::-1]:
            print(f"-- round {round_ + 1}, form {form}", flush=True)
            _, (history,) = fit_many([config], train, test, model=CNN(conv_form=form), verbose=True)
            times[form] += history["epoch_time_s"][1:] or history["epoch_time_s"]
            accuracy[form], compile_s[form] = history["val_accuracy"][-1], history["compile_time_s"]
    median = {form: statistics.median(t) for form, t in times.items()}
    rows = [[f"`{form}`", f"{median[form]:.2f}", f"{min(times[form]):.2f}–{max(times[form]):.2f}", f"{1000 * median[form] / steps:.2f}",
             f"x{median['matmul'] / median[form]:.2f}", f"{100 * accuracy[form]:.2f}", f"{compile_s[form]:.1f}"] for form in CONV_FORMS]  # fmt: skip
    table = markdown_table(["form", "s/epoch (median)", "range", "ms/step", "speed vs matmul", "test acc % (last run)", "compile s"], rows)
    device = f"{run.meta['machine']['device']} ({run.meta['machine']['jax_backend']})"
    table += f"\n\nDevice: {device}; {steps} steps of {config.batch_size} per epoch; training time only (evaluation and compilation excluded)."
    fig, (ax,) = figure()
    for i, form in enumerate(CONV_FORMS):
        ax.plot([i] * len(times[form]), [1000 * t / steps for t in times[form]], "o", alpha=0.6)
    ax.set_xticks(range(len(CONV_FORMS)), CONV_FORMS)
    ax.set_ylabel("ms per training step")
    ax.grid(alpha=0.4)
    fig.suptitle(f"Convolution forms on {device} ({'quick' if args.quick else 'full'} size)")
    run.finish({"device": device, "epoch_time_s": times, "median_epoch_s": median, "test_accuracy": accuracy, "compile_time_s": compile_s}, table, fig)


if __name__ == "__main__":
    main()
