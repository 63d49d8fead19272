"""pooling: max pool vs average pool vs a learned strided conv vs no pooling, in the seed CNN: accuracy, params, time."""

from common import PoolVariantCNN, Run, figure, load, markdown_table, mean_std, parse_args, run_group, seed_configs
from mnist_jax import Config, ModelConfig

WHAT = {"max": "2×2 max pool (the seed)", "avg": "2×2 average pool", "strided": "2×2 conv, stride 2 (learned)", "none": "no pooling"}


def main() -> None:
    args = parse_args(__doc__, full=dict(train_examples=60000, epochs=5, variants=["max", "avg", "strided", "none"]),
                      quick=dict(train_examples=5000, epochs=2))  # fmt: skip
    run = Run(args)
    train, test = load(args, args.train_examples)
    rows, results = [], []
    for variant in args.variants:
        model = ModelConfig(pool=variant if variant in ("max", "avg") else "max")
        config = Config(dataset=args.dataset, epochs=args.epochs, model=model)
        custom = None if variant in ("max", "avg") else PoolVariantCNN(variant, model)  # model.py has max/avg only
        result = run_group(variant, seed_configs(config, args.seeds), train, test, model=custom)
        results.append(result)
        rows.append([f"`{variant}`", WHAT[variant], f"{result['params']:,}", mean_std(result["accuracy"]),
                     f"{result['epoch_time_s_per_model']:.1f}", f"{result['compile_time_s']:.1f}"])  # fmt: skip
    table = markdown_table(["pooling", "layers", "params", "test accuracy %", "s/epoch", "compile s"], rows)
    run.finish({"runs": results}, table, plot(args, results))


def plot(args, results):
    """Test accuracy and seconds per epoch of each variant."""
    fig, axes = figure(2, width=5.0)
    names = [r["label"] for r in results]
    axes[0].bar(names, [100 * sum(r["accuracy"]) / len(r["accuracy"]) for r in results], color=[f"C{i}" for i in range(len(names))])
    axes[0].set_ylim(100 * min(min(r["accuracy"]) for r in results) - 1, 100)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].bar(names, [r["epoch_time_s_per_model"] for r in results], color=[f"C{i}" for i in range(len(names))])
    axes[1].set_ylabel("seconds per epoch")
    for i, r in enumerate(results):
        axes[1].text(i, r["epoch_time_s_per_model"], f"{r['params'] / 1e6:.1f}M params", ha="center", va="bottom")
    fig.suptitle(f"Pooling variants ({'quick' if args.quick else 'full'} size)")
    return fig


if __name__ == "__main__":
    main()
