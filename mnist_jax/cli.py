"""`python -m mnist_jax {train,evaluate,summary}`: flags override the Config defaults."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from mnist_jax.config import DATASETS, Config, ModelConfig, UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr rather than the usage block."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="tfds data_dir (default: tfds's, or $TFDS_DATA_DIR)")
    parser.add_argument(
        "--manual-dir", help="folder holding the four MNIST .gz files, for offline preparation (or $MNIST_JAX_MANUAL_DIR)"
    )


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (defaults: the tutorial's recipe)")
    d = Config()
    p.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)} (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="Adam's (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--train-examples", type=int, default=None, metavar="N", help="use only the first N training images")
    p.add_argument("--workdir", help="run folder (default: runs/<dataset>-<timestamp>, linked as runs/latest)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--pipeline", default=d.pipeline, help="device (arrays on the device) or tfdata (default: %(default)s)")
    p.add_argument("--dtype", dest="compute_dtype", default=d.compute_dtype, help="float32 or bfloat16 compute")
    p.add_argument("--dropout", type=float, default=d.model.dropout_rate, help="dropout rate (default: %(default)s)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="(default: %(default)s)")
    _add_data_flags(p)
    p.set_defaults(run=_train)


def _config_from_args(args: argparse.Namespace) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    model = dataclasses.replace(ModelConfig(), dropout_rate=args.dropout)
    return Config(model=model, **values).validate()


def _train(args: argparse.Namespace) -> int:
    from mnist_jax.train import fit

    config = _config_from_args(args)
    if args.resume:
        if not args.workdir:
            raise UserError("--resume needs --workdir")
        from pathlib import Path

        config = dataclasses.replace(Config.load(Path(args.workdir) / "config.json"), workdir=args.workdir)
    fit(config, resume=args.resume)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mnist_jax import checkpoint, data
    from mnist_jax.train import evaluate

    workdir, _ = checkpoint.find_workdir(args.workdir)
    config = Config.load(workdir / "config.json")
    state = checkpoint.restore_checkpoint(args.workdir)
    test = data.load_split(
        config.dataset, "test", data_dir=args.data_dir or config.data_dir, manual_dir=args.manual_dir or config.manual_dir
    )
    metrics = evaluate(state, test, config.eval_batch_size)
    print(f"Test Loss : {metrics['loss']:.4f}")
    print(f"Test Accuracy : {metrics['accuracy']:.4f}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from mnist_jax.model import CNN, summary

    print(summary(CNN()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mnist_jax", description="The MNIST tutorial CNN in JAX/Flax: train, evaluate, study.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    p = sub.add_parser("evaluate", help="restore a run's checkpoint and evaluate on the test split")
    p.add_argument("--workdir", default="runs/latest", help="run folder or checkpoint step folder (default: %(default)s)")
    _add_data_flags(p)
    p.set_defaults(run=_evaluate)
    p = sub.add_parser("summary", help="print the model's layer table and parameter count")
    p.set_defaults(run=_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # tfds' info/warning chatter
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"mnist_jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
