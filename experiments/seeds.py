"""seeds: the tutorial's recipe (seed CNN, Adam 1e-3, batch 32, 5 epochs) over N seeds, all N trained in one vmapped program.

Reports mean ± std test accuracy and wrong count over seeds, and the N-model ensemble (mean probabilities).
"""

import statistics

from common import Run, figure, load, markdown_table, mean_std, parse_args, run_group, seed_configs
from mnist_jax import Config


def main() -> None:
    args = parse_args(__doc__, full=dict(train_examples=60000, epochs=5), quick=dict(train_examples=5000, epochs=2), seeds="5", quick_seeds="3")
    run = Run(args)
    train, test = load(args, args.train_examples)
    config = Config(dataset=args.dataset, epochs=args.epochs)
    result = run_group("seed recipe", seed_configs(config, args.seeds), train, test, per_epoch_test=True)
    rows = [[seed, f"{100 * acc:.2f}", wrong] for seed, acc, wrong in zip(args.seeds, result["accuracy"], result["wrong"])]
    rows.append(["**mean ± std**", f"**{mean_std(result['accuracy'])}**", f"**{statistics.mean(result['wrong']):.1f} ± "
                 f"{statistics.stdev(result['wrong']) if len(result['wrong']) > 1 else 0:.1f}**"])  # fmt: skip
    rows.append([f"ensemble of {len(args.seeds)}", f"{100 * result['ensemble_accuracy']:.2f}", result["ensemble_wrong"]])
    table = markdown_table(["seed", "test accuracy %", f"wrong (of {result['test_examples']:,})"], rows)
    table += f"\n\n{len(args.seeds)} models in one vmapped program: {result['epoch_time_s_per_model']:.1f} s/epoch per model, compile {result['compile_time_s']:.1f} s."
    run.finish({"runs": [result]}, table, plot(args, result))


def plot(args, result):
    """Each seed's test accuracy per epoch, and its wrong count against the ensemble's."""
    fig, axes = figure(2, width=5.0)
    for seed, history in zip(args.seeds, result["histories"]):
        axes[0].plot(range(1, args.epochs + 1), [100 * a for a in history["val_accuracy"]], "o-", label=f"seed {seed}")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    axes[1].bar([str(s) for s in args.seeds], result["wrong"], color="C1")
    axes[1].axhline(result["ensemble_wrong"], color="k", linestyle="--", label="ensemble")
    axes[1].set_xlabel("seed")
    axes[1].set_ylabel("wrong test predictions")
    axes[1].legend()
    fig.suptitle(f"The seed recipe over {len(args.seeds)} seeds ({'quick' if args.quick else 'full'} size)")
    return fig


if __name__ == "__main__":
    main()
