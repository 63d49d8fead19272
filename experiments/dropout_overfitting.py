"""dropout_overfitting: train on small subsets for longer with dropout 0, 0.25, 0.5; train vs validation accuracy per epoch.

Train accuracy is measured in eval mode (dropout off) on the training subset after every epoch;
validation is the test split, as in the tutorial (quick: its first images only).
"""

import statistics

from common import Run, figure, load, markdown_table, parse_args, seed_configs
from mnist_jax import Config, ModelConfig
from mnist_jax.multi import fit_many


def mean(histories, key):
    """The mean over seeds of `key`, per epoch."""
    return [statistics.mean(v) for v in zip(*(h[key] for h in histories))]


def main() -> None:
    args = parse_args(__doc__, full=dict(subsets=[1000, 5000], rates=[0.0, 0.25, 0.5], epochs=30, val_examples=10000),
                      quick=dict(subsets=[500, 2000], epochs=10, val_examples=1000))  # fmt: skip
    run = Run(args)
    train, val = load(args, max(args.subsets), args.val_examples)
    rows, results = [], []
    fig, axes = figure(len(args.subsets), width=5.5)
    for ax, n in zip(axes, args.subsets):
        subset = {k: v[:n] for k, v in train.items()}
        for color, rate in enumerate(args.rates):
            print(f"-- {n} images, dropout {rate}", flush=True)
            config = Config(dataset=args.dataset, epochs=args.epochs, model=ModelConfig(dropout_rate=rate))
            _, histories = fit_many(seed_configs(config, args.seeds), subset, val, eval_train=True, verbose=True)
            tr, va = mean(histories, "train_eval_accuracy"), mean(histories, "val_accuracy")
            gap = [100 * (a - b) for a, b in zip(tr, va)]
            best = max(range(len(va)), key=va.__getitem__)
            results.append({"train_examples": n, "dropout": rate, "train_accuracy": tr, "val_accuracy": va, "gap_pp": gap,
                            "val_loss": mean(histories, "val_loss"), "histories": histories})  # fmt: skip
            rows.append([n, rate, f"{100 * tr[-1]:.2f}", f"{100 * va[-1]:.2f}", f"{gap[-1]:.2f}", f"{100 * va[best]:.2f} (epoch {best + 1})",
                         f"{min(results[-1]['val_loss']):.3f} / {results[-1]['val_loss'][-1]:.3f}"])  # fmt: skip
            epochs = range(1, args.epochs + 1)
            ax.plot(epochs, [100 * a for a in tr], "-", color=f"C{color}", label=f"train, dropout {rate}")
            ax.plot(epochs, [100 * a for a in va], "--", color=f"C{color}", label=f"validation, dropout {rate}")
        ax.set_title(f"{n} training images")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.4)
        ax.legend(fontsize=8)
    fig.suptitle(f"Train (eval mode) vs validation accuracy ({'quick' if args.quick else 'full'} size, mean of {len(args.seeds)} seed(s))")
    headers = ["train images", "dropout", "train acc %", "val acc %", "gap (pp)", "best val acc %", "val loss min / last"]
    run.finish({"runs": results}, markdown_table(headers, rows), fig)


if __name__ == "__main__":
    main()
