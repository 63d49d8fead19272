"""`python -m mnist_jax {train,evaluate,export,summary,analyze,predict}`: the train flags are `Config`'s fields."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mnist_jax.config import Config, HostError, ModelConfig, UserError, field_type
from mnist_jax.parallel import COORDINATOR_TIMEOUT_S


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr rather than the usage block."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def config_fields() -> list[dataclasses.Field]:
    """The fields of `Config` and its `ModelConfig` that are command-line flags, in declaration order."""
    fields = [*dataclasses.fields(Config), *dataclasses.fields(ModelConfig)]
    return [f for f in fields if "help" in f.metadata]


def flag_name(field: str) -> str:
    """The flag that sets a Config (or ModelConfig) field."""
    meta = {f.name: f.metadata for f in config_fields()}.get(field, {})
    return meta.get("flag") or "--" + field.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None, *, defaults: bool = False) -> None:
    """Add a flag per Config/ModelConfig field (those in `names`, or all), typed and documented from the field.

    Without `defaults`, an absent flag sets nothing (argparse.SUPPRESS), so a caller can tell what was given;
    with `defaults`, it sets the field's default."""
    for field in config_fields():
        if names is not None and field.name not in names:
            continue
        default = "%(default)s" if defaults else field.default  # argparse's: a caller's set_defaults shows in --help
        kind = field_type(field)
        choices = field.metadata.get("choices")
        shown = f"one of {', '.join(choices)}; " if choices else ""
        if kind is bool:  # --name / --no-name
            parser.add_argument(flag_name(field.name), dest=field.name, action=argparse.BooleanOptionalAction,
                                default=field.default if defaults else argparse.SUPPRESS, help=f"{field.metadata['help']} (default: {default})")  # fmt: skip
            continue
        parser.add_argument(
            flag_name(field.name), dest=field.name, type=kind, metavar={int: "N", float: "X"}.get(kind),
            default=field.default if defaults else argparse.SUPPRESS, help=f"{field.metadata['help']}" + (f" ({shown}default: {default})" if field.default is not None else f" ({shown[:-2]})" if shown else ""),
        )  # fmt: skip


DATA_FLAGS = ("data_dir", "manual_dir", "arrays")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (defaults: the tutorial's recipe)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint, with its saved config")
    p.add_argument("--config", metavar="FILE.json", help="start from this saved Config (a run's config.json works as is, in a new run folder); flags override it")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process: address of process 0's coordinator, or 'auto' to detect the cluster (SLURM, TPU pod, ...)")
    p.add_argument("--num-processes", type=int, metavar="N", help="multi-process: how many processes in all")
    p.add_argument("--process-id", type=int, metavar="I", help="multi-process: this process's index, 0..N-1")
    p.add_argument("--coordinator-timeout", type=int, metavar="S", default=COORDINATOR_TIMEOUT_S,
                   help="multi-process: give up (one line, exit 1) if the run has not formed after S seconds "
                        "(coordinator reachable, every process joined) (default: %(default)s)")  # fmt: skip
    add_config_flags(p)
    p.set_defaults(run=_train)


def _given_flags(args: argparse.Namespace) -> dict[str, object]:
    """The Config fields the user set on the command line (model fields included)."""
    names = {f.name for f in config_fields()}
    return {k: v for k, v in vars(args).items() if k in names}


def _apply(config: Config, flags: dict[str, object]) -> Config:
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = dataclasses.replace(config.model, **{k: v for k, v in flags.items() if k in model_fields})
    return dataclasses.replace(config, model=model, **{k: v for k, v in flags.items() if k not in model_fields})


def _train(args: argparse.Namespace) -> int:
    from mnist_jax.parallel import initialize_distributed
    from mnist_jax.runtime import stop_on_signals
    from mnist_jax.train import fit

    initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout)
    flags = _given_flags(args)
    if args.resume:
        if args.config:
            raise UserError("--resume continues the run with its own config.json; drop --config")
        if not flags.get("workdir"):
            raise UserError("--resume needs --workdir")
        saved = Config.load(Path(flags["workdir"]) / "config.json")
        config = _apply(saved, flags).validate()
        conflicts = config.resume_conflicts(saved)
        if conflicts:
            dropped = ", ".join(f"{flag_name(k)} {new} (the run has {old})" for k, (new, old) in conflicts.items())
            raise UserError(f"--resume continues the run as configured in its config.json; drop {dropped}")
    else:
        base = dataclasses.replace(Config.read(args.config), workdir=None) if args.config else Config()  # its run's folder is not this one's
        config = _apply(base, flags).validate()
    with stop_on_signals() as stop:  # the first SIGTERM/SIGINT: checkpoint and exit 75; a second: at once
        fit(config, resume=args.resume, stop=stop)
    return 0


def _test_split(args: argparse.Namespace, config: Config) -> dict:
    """The run's test split, from where the flags say the data is now, else where the run found it."""
    from mnist_jax import data

    where = {k: getattr(args, k) or getattr(config, k) for k in ("data_dir", "manual_dir", "arrays")}
    return data.load_split(config.dataset, "test", **where)


def _evaluate(args: argparse.Namespace) -> int:
    from mnist_jax import checkpoint
    from mnist_jax.loop import evaluate

    _, config, state = checkpoint.restore_run(args.workdir)
    test = _test_split(args, config)
    metrics = evaluate(state, test, config.eval_batch_size)
    print(f"Test Loss : {metrics['loss']:.4f}")
    print(f"Test Accuracy : {metrics['accuracy']:.4f}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mnist_jax import data

    out = Path(args.out)
    if (out.exists() or out.is_symlink()) and not args.force:  # checked before the data is loaded
        raise UserError(f"{out} exists; export does not overwrite a file without --force")
    path = data.export_arrays(args.out, args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir)
    print(f"Wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {args.dataset} train and test; train with --arrays {path}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from mnist_jax.model import CNN, summary

    print(summary(CNN()))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from mnist_jax import analysis, checkpoint, data
    from mnist_jax.workdir import lock_workdir

    # Every flag and the output folder are checked before anything is loaded; write_analysis checks
    # again what needs the data (--index) before its first write.
    analysis.check_flags(seed=args.seed, feature_index=args.index)
    workdir, config, state = checkpoint.restore_run(args.workdir)
    outdir = workdir / "analysis"
    names = data.CLASS_NAMES[config.dataset]
    with lock_workdir(workdir):  # not while a `train` writes there
        analysis.check_outdir(outdir, force=args.force)
        history = analysis.load_history(workdir)
        test = _test_split(args, config)
        summary = analysis.write_analysis(
            state, test, history, outdir,
            class_names=None if config.dataset == "mnist" else names,
            seed=args.seed, feature_index=args.index, batch_size=config.eval_batch_size,
            title=f"{workdir} ({config.dataset}, step {int(state.step)})", force=args.force,
        )  # fmt: skip
    print(f"Test Loss : {summary['test_loss']:.4f}")
    print(f"Test Accuracy : {summary['test_accuracy']:.4f}")
    sep = " " if config.dataset == "mnist" else ", "  # digits as the tutorial printed them: [7 2 1 0 ...]
    print(f"First 10 predictions: [{sep.join(names[p] for p in summary['first_predictions'])}]")
    print(f"Wrong predictions: {summary['wrong']} of {summary['total']}")
    per_class = ", ".join(
        f"{names[i]} {'n/a' if a is None else f'{a:.1%}'}" for i, a in enumerate(summary["per_class_accuracy"])
    )
    print(f"Per-class accuracy: {per_class}")
    confused = ", ".join(f"{names[t]} as {names[p]} ({n})" for t, p, n in summary["top_confusions"]) or "none"
    print(f"Most confused (true as predicted): {confused}")
    print(f"Analysis : {summary['outdir']} (report.md)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from mnist_jax import analysis, checkpoint, data
    from mnist_jax.images import ImageError, format_prediction, read_image

    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    _, config, state = checkpoint.restore_run(args.workdir)
    # Fashion-MNIST items fill the 28x28 field and are centred by their box, not their mass.
    options = {} if config.dataset == "mnist" else {"box": 28, "center": "box"}
    paths, inputs, failed = [], [], 0
    for path in args.images:
        try:
            inputs.append(read_image(path, **options))
            paths.append(path)
        except ImageError as err:  # report it and go on with the other files
            print(f"mnist_jax: error: {err}", file=sys.stderr)
            failed += 1
    if inputs:
        probabilities = analysis.predict_probabilities(state, np.stack(inputs))
        for path, probs in zip(paths, probabilities):
            print(format_prediction(path, probs, data.CLASS_NAMES[config.dataset], top=args.top))
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> int:
    from matplotlib.figure import Figure

    from mnist_jax import compare
    from mnist_jax.files import atomic_write

    out = Path(args.out)
    image_format = out.suffix[1:].lower() or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if image_format not in supported:  # before reading any run
        raise UserError(f"--out {out}: cannot draw a .{image_format} file (use one of .{', .'.join(sorted(supported))})")
    runs = [compare.load_run(path) for path in args.runs]
    figure = compare.plot(runs)
    atomic_write(out, lambda tmp: figure.savefig(tmp, dpi=100, format=image_format))
    print(compare.table(runs))
    print(f"Curves : {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mnist_jax", description="The MNIST tutorial CNN in JAX/Flax: train, evaluate, study.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    p = sub.add_parser("evaluate", help="restore a run's checkpoint and evaluate on the test split")
    p.add_argument("--workdir", default="runs/latest", help="run folder or checkpoint step folder (default: %(default)s)")
    add_config_flags(p, DATA_FLAGS, defaults=True)
    p.set_defaults(run=_evaluate)
    p = sub.add_parser("export", help="write a data set's train and test splits to one .npz that `--arrays` reads without TensorFlow")
    p.add_argument("--out", required=True, metavar="NPZ", help="the file to write (an existing one only with --force)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_config_flags(p, ("dataset", "data_dir", "manual_dir"), defaults=True)
    p.set_defaults(run=_export)
    p = sub.add_parser("summary", help="print the model's layer table and parameter count")
    p.set_defaults(run=_summary)
    p = sub.add_parser(
        "analyze", help="plots and a report on a trained run: curves, wrong predictions, confusion, filters, feature maps"
    )
    p.add_argument("--workdir", default="runs/latest", help="run folder or checkpoint step folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling the 16 wrong predictions (default: %(default)s)")
    p.add_argument("--index", type=int, default=0, help="test image whose feature maps are drawn (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="overwrite files in WORKDIR/analysis that analyze did not write or that were changed since")  # fmt: skip
    add_config_flags(p, DATA_FLAGS, defaults=True)
    p.set_defaults(run=_analyze)
    p = sub.add_parser("compare", help="draw runs' curves on shared axes and print their config differences and final metrics")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (finished or not)")
    p.add_argument("--out", default="compare.png", help="the plot to write, replaced whole; its suffix picks the format (default: %(default)s)")
    p.set_defaults(run=_compare)
    p = sub.add_parser("predict", help="predict the digit in image files (PNG, JPEG, any size or colour)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--workdir", default="runs/latest", help="run folder or checkpoint step folder (default: %(default)s)")
    p.add_argument("--top", type=int, default=3, help="how many classes to list per image (default: %(default)s)")
    p.set_defaults(run=_predict)
    for p in sub.choices.values():  # also after the command: `train --debug` as well as `--debug train`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    return parser


NON_FINITE_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports it
INTERRUPTED = "mnist_jax: interrupted"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mnist_jax.checkpoint import mute_orbax_noise
    from mnist_jax.train import PREEMPTED_EXIT_CODE, NonFiniteLoss, Preempted

    mute_orbax_noise()  # failures reach us as exceptions, reported in one line below

    if not args.debug:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # tfds' info/warning chatter
    run: Callable[[argparse.Namespace], int] = args.run
    if args.command == "train":
        from mnist_jax.runtime import enable_compilation_cache

        enable_compilation_cache()  # $MNIST_JAX_COMPILATION_CACHE (empty: off), default ~/.cache/mnist_jax/xla
    try:
        return run(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"mnist_jax: error: {err}", file=sys.stderr)
        return NON_FINITE_EXIT_CODE if isinstance(err, NonFiniteLoss) else 2
    except HostError as err:
        if args.debug:
            raise
        print(f"mnist_jax: error: {err}", file=sys.stderr)
        return 1
    except Preempted as stop:
        print(f"mnist_jax: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:  # Ctrl-C outside train's graceful stop (evaluate, analyze, predict, ...)
        if args.debug:
            raise
        print(INTERRUPTED, file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
