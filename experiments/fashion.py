"""fashion: the tutorial's seed recipe and the improved recipe (common.Recipe, unchanged) on Fashion-MNIST."""

import dataclasses

from common import (Recipe, Run, device_forms, ensemble_summary, figure, fit_recipe, load, markdown_table, mean_std, parse_args, recipe_times, run_group,
                    seed_configs, seeds_one_after_another)
from mnist_jax import Config
from mnist_jax.multi import predict_many


def main() -> None:
    args = parse_args(__doc__, full=dict(train_examples=60000, seed_epochs=5, improved_epochs=Recipe.epochs, width=Recipe.width,
                                         dense_features=Recipe.dense_features),
                      quick=dict(train_examples=5000, seed_epochs=2, improved_epochs=3, width=16, dense_features=128),
                      dataset="fashion_mnist", seeds="3", quick_seeds="2")  # fmt: skip
    run = Run(args)
    train, test = load(args, args.train_examples)
    seed = run_group("seed recipe", seed_configs(Config(dataset=args.dataset, epochs=args.seed_epochs), args.seeds), train, test)
    recipe = dataclasses.replace(Recipe(), epochs=args.improved_epochs, width=args.width, dense_features=args.dense_features)
    print("-- improved recipe", flush=True)
    sequential = seeds_one_after_another()
    forms = device_forms(sequential)
    states, histories = fit_recipe(recipe, args.seeds, train, None, args.dataset, sequential=sequential, forms=forms)
    improved = {**ensemble_summary(predict_many(states, test["image"]), test["label"]), "label": "improved recipe",
                "recipe": dataclasses.asdict(recipe), "layer_forms": forms, "histories": histories, **recipe_times(histories, sequential)}  # fmt: skip
    rows = []
    for r, epochs in ((seed, args.seed_epochs), (improved, args.improved_epochs)):
        rows.append([r["label"], epochs, mean_std(r["accuracy"]), f"{100 * r['ensemble_accuracy']:.2f}", r["ensemble_wrong"],
                     f"{r['epoch_time_s_per_model']:.1f}"])  # fmt: skip
    table = markdown_table(["recipe", "epochs", "test accuracy % (per model)", f"ensemble of {len(args.seeds)} %", "ensemble wrong", "s/epoch"], rows)
    fig, (ax,) = figure()
    labels = [r["label"] for r in (seed, improved)]
    for i, r in enumerate((seed, improved)):
        ax.scatter([i] * len(r["accuracy"]), [100 * a for a in r["accuracy"]], color=f"C{i}", label="single models" if i == 0 else None)
        ax.scatter([i], [100 * r["ensemble_accuracy"]], marker="*", s=200, color="k", label="ensemble" if i == 0 else None)
    ax.set_xticks([0, 1], labels)
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.suptitle(f"Fashion-MNIST: seed vs improved recipe ({'quick' if args.quick else 'full'} size)")
    run.finish({"runs": [seed, improved]}, table, fig)


if __name__ == "__main__":
    main()
