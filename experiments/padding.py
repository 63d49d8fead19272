"""padding: 'SAME' vs 'VALID' convolutions in the seed CNN: output sizes, parameter count, accuracy."""


from common import Run, layer_shapes, load, markdown_table, mean_std, parse_args, run_group, seed_configs, figure
from mnist_jax import CNN, Config, ModelConfig


def main() -> None:
    args = parse_args(__doc__, full=dict(train_examples=60000, epochs=5), quick=dict(train_examples=5000, epochs=2))
    run = Run(args)
    train, test = load(args, args.train_examples)
    rows, results = [], []
    for padding in ("SAME", "VALID"):
        config = Config(dataset=args.dataset, epochs=args.epochs, model=ModelConfig(padding=padding))
        result = run_group(padding, seed_configs(config, args.seeds), train, test)
        result["shapes"] = layer_shapes(CNN.from_config(config.model))
        results.append(result)
        s = result["shapes"]
        rows.append([f"`{padding}`", *("×".join(map(str, s[n])) for n in ("conv1", "pool1", "conv2", "pool2")), s["flatten"][0],
                     f"{result['params']:,}", mean_std(result["accuracy"]), f"{result['epoch_time_s_per_model']:.1f}"])  # fmt: skip
    table = markdown_table(["padding", "conv1", "pool1", "conv2", "pool2", "flatten", "params", "test accuracy %", "s/epoch"], rows)
    fig, (ax,) = figure()
    ax.bar([r["label"] for r in results], [100 * sum(r["accuracy"]) / len(r["accuracy"]) for r in results], color=["C0", "C1"])
    for i, r in enumerate(results):
        ax.text(i, 100 * min(r["accuracy"]), f"{r['params']:,} params", ha="center", va="bottom")
    ax.set_ylim(100 * min(min(r["accuracy"]) for r in results) - 1, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"SAME vs VALID padding ({'quick' if args.quick else 'full'} size)")
    run.finish({"runs": results}, table, fig)


if __name__ == "__main__":
    main()
