"""batch_size: batch 32 ... 1024 with Adam's learning rate scaled from 1e-3 at 32: accuracy and time per epoch.

Two scaling rules, trained side by side in one vmapped program per batch size (per-model learning
rates): 'sqrt' (lr x sqrt(B/32), the usual rule for Adam) and 'linear' (lr x B/32). Same number of
epochs for every batch size, so larger batches take fewer steps.
"""

import math

from common import Run, figure, load, markdown_table, mean_std, parse_args, run_group
from mnist_jax import Config

RULES = {"sqrt": lambda ratio: math.sqrt(ratio), "linear": lambda ratio: ratio, "none": lambda ratio: 1.0}


def main() -> None:
    args = parse_args(__doc__, full=dict(train_examples=60000, epochs=5, batch_sizes=[32, 64, 128, 256, 512, 1024], rules=["sqrt", "linear"]),
                      quick=dict(train_examples=4096, epochs=2), seeds="1")  # fmt: skip
    run = Run(args)
    train, test = load(args, args.train_examples)
    rows, results = [], []
    for batch_size in args.batch_sizes:
        lrs = {rule: 1e-3 * RULES[rule](batch_size / 32) for rule in args.rules}
        configs = [Config(dataset=args.dataset, epochs=args.epochs, batch_size=batch_size, learning_rate=lrs[rule], seed=seed)
                   for rule in args.rules for seed in args.seeds]  # fmt: skip
        group = run_group(f"batch {batch_size}", configs, train, test)
        n = len(args.seeds)
        for i, rule in enumerate(args.rules):
            part = slice(i * n, (i + 1) * n)
            result = {**{k: v for k, v in group.items() if k != "histories"}, "batch_size": batch_size, "rule": rule,
                      "learning_rate": lrs[rule], "accuracy": group["accuracy"][part], "nonfinite_step": group["nonfinite_step"][part]}  # fmt: skip
            results.append(result)
            steps = args.train_examples // batch_size
            diverged = any(s is not None for s in result["nonfinite_step"])
            rows.append([batch_size, rule, f"{lrs[rule]:.2g}", steps, mean_std(result["accuracy"]) + (" (diverged)" if diverged else ""),
                         f"{group['epoch_time_s_per_model']:.2f}", f"{args.train_examples / group['epoch_time_s_per_model']:.0f}"])  # fmt: skip
    table = markdown_table(["batch", "lr rule", "learning rate", "steps/epoch", "test accuracy %", "s/epoch", "images/s"], rows)
    run.finish({"runs": results}, table, plot(args, results))


def plot(args, results):
    """Test accuracy per rule, and seconds per epoch, against the batch size."""
    fig, axes = figure(2, width=5.0)
    for rule in args.rules:
        runs = [r for r in results if r["rule"] == rule]
        axes[0].plot([r["batch_size"] for r in runs], [100 * sum(r["accuracy"]) / len(r["accuracy"]) for r in runs], "o-", label=f"lr rule: {rule}")
    runs = [r for r in results if r["rule"] == args.rules[0]]
    axes[1].plot([r["batch_size"] for r in runs], [r["epoch_time_s_per_model"] for r in runs], "s-", color="C3")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("seconds per epoch (per model)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.4)
    axes[0].legend()
    fig.suptitle(f"Batch size with scaled learning rate, {args.epochs} epochs ({'quick' if args.quick else 'full'} size)")
    return fig


if __name__ == "__main__":
    main()
