"""filter_size: the first conv layer's kernel (3x3, 5x5, 7x7) and number of filters, in the seed CNN.

Full size: the whole kernels x filters grid; quick: one factor at a time around the seed (5x5, 32).
"""

from common import Run, figure, load, markdown_table, mean_std, parse_args, run_group, seed_configs
from mnist_jax import Config, ModelConfig


def main() -> None:
    args = parse_args(__doc__, full=dict(train_examples=60000, epochs=5, kernels=[3, 5, 7], filters=[16, 32, 64], grid=True),
                      quick=dict(train_examples=5000, epochs=2, grid=False))  # fmt: skip
    run = Run(args)
    train, test = load(args, args.train_examples)
    if args.grid:
        variants = [(k, f) for k in args.kernels for f in args.filters]
    else:
        variants = [(k, 32) for k in args.kernels] + [(5, f) for f in args.filters if f != 32]
    rows, results = [], []
    for kernel, filters in variants:
        config = Config(dataset=args.dataset, epochs=args.epochs, model=ModelConfig(conv1_kernel=kernel, conv1_features=filters))
        result = run_group(f"{kernel}x{kernel}·{filters}", seed_configs(config, args.seeds), train, test)
        result.update(kernel=kernel, filters=filters, conv1_params=kernel * kernel * filters + filters)
        results.append(result)
        rows.append([f"{kernel}×{kernel}", filters, f"{result['conv1_params']:,}", f"{result['params']:,}", mean_std(result["accuracy"]),
                     f"{result['epoch_time_s_per_model']:.1f}"])  # fmt: skip
    table = markdown_table(["conv1 kernel", "conv1 filters", "conv1 params", "total params", "test accuracy %", "s/epoch"], rows)
    run.finish({"runs": results}, table, plot(args, variants, results))


def plot(args, variants, results):
    """Test accuracy against the kernel size (per number of filters) and against the filters (per kernel size)."""
    fig, axes = figure(2, width=5.0)
    for i, filters in enumerate(sorted({f for _, f in variants})):
        runs = [r for r in results if r["filters"] == filters]
        if len(runs) > 1:
            axes[0].plot([r["kernel"] for r in runs], [100 * sum(r["accuracy"]) / len(r["accuracy"]) for r in runs], "o-", label=f"{filters} filters")
    for kernel in sorted({k for k, _ in variants}):
        runs = [r for r in results if r["kernel"] == kernel]
        if len(runs) > 1:
            axes[1].plot([r["filters"] for r in runs], [100 * sum(r["accuracy"]) / len(r["accuracy"]) for r in runs], "s-", label=f"{kernel}×{kernel}")
    axes[0].set_xlabel("first-layer kernel size")
    axes[1].set_xlabel("first-layer filters")
    axes[1].set_xscale("log", base=2)
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.4)
        ax.legend()
    fig.suptitle(f"First conv layer: kernel size and filters ({'quick' if args.quick else 'full'} size)")
    return fig


if __name__ == "__main__":
    main()
