"""Every knob of a run, in one typed, JSON-serialisable dataclass.

The defaults are the tutorial's recipe: the seed CNN, Adam 1e-3, batch 32,
5 epochs, seed 0, the MNIST test split as validation after every epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DATASETS = ("mnist", "fashion_mnist")
PIPELINES = ("device", "tfdata")
POOLS = ("max", "avg")
PADDINGS = ("SAME", "VALID")
COMPUTE_DTYPES = ("float32", "bfloat16")


class UserError(Exception):
    """Bad input from the user: reported as one line and exit 2, no traceback."""


class HostError(Exception):
    """The machine failed the run (disk full, unwritable folder, unreachable coordinator): one line and exit 1,
    no traceback; what was written before (the last good checkpoint) is kept and named in the message."""


# Seeds jax.random.key takes as they are: it keeps a seed's low 32 bits, so 2**40 would train exactly as 0
# does and -1 as 2**32 - 1. Config.validate refuses the others.
SEED_MAX = 2**32 - 1

# Each data set's classes: its labels are 0..N-1 (data.CLASS_NAMES names them), so a model needs N outputs at least.
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10}

# Evaluation batch: the fastest of those measured on XLA:CPU (docs/performance.md); accelerators hardly care.
EVAL_BATCH_SIZE = 200


# What may differ between a run and its resumption: where things are on this machine, how many
# checkpoints to keep, the validation batch (it changes no parameter), and how many epochs to train
# in all (each epoch's data order depends only on the seed and the epoch, so a run extended to more
# epochs equals one that planned them). Every other field decides the trained parameters.
RESUMABLE_CHANGES = frozenset(
    {"data_dir", "manual_dir", "arrays", "workdir", "devices", "keep_checkpoints", "eval_batch_size", "epochs", "tensorboard", "profile_steps"}
)


def parse_step_range(text: str | None) -> tuple[int, int] | None:
    """'A:B' -> (A, B) with 1 <= A <= B; None stays None. UserError otherwise."""
    if text is None:
        return None
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"--profile-steps must be A:B (two step numbers), got {text!r}") from None
    if not 1 <= first <= last:
        raise UserError(f"--profile-steps A:B needs 1 <= A <= B, got {text!r}")
    return first, last


def option(default: Any, help: str, *, flag: str | None = None, type: Callable[[str], Any] | None = None,
           choices: Sequence[str] | None = None) -> Any:
    """A config field that is also a command-line flag (`mnist_jax.cli.add_config_flags`): its help, its
    flag when not `--field-name`, its parser when the default is None, and the values it takes (listed in
    the help; `Config.validate` checks them, so a bad value gets the same message from a flag or a file)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "type": type, "choices": choices})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The seed CNN's architecture (`model.CNN`); experiments vary these fields."""

    conv1_features: int = option(32, "first convolution's filters")
    conv1_kernel: int = option(5, "first convolution's kernel size")
    conv2_features: int = option(64, "second convolution's filters")
    conv2_kernel: int = option(2, "second convolution's kernel size")
    dense_features: int = option(1000, "hidden dense layer's units")
    num_classes: int = option(10, "output classes")
    dropout_rate: float = option(0.25, "dropout rate before the dense layers", flag="--dropout")
    padding: str = option("SAME", "convolutions' padding", choices=PADDINGS)
    pool: str = option("max", "pooling after each convolution", choices=POOLS)


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run. `dataclasses.replace(Config(), epochs=1)` makes variants."""

    dataset: str = option("mnist", "data set", choices=DATASETS)
    epochs: int = option(5, "epochs to train (in all, when resuming)")
    batch_size: int = option(32, "examples per training step (over all devices)")
    learning_rate: float = option(1e-3, "Adam's learning rate")
    seed: int = option(0, "seed of the initial parameters, dropout and data order")
    train_examples: int | None = option(None, "use only the first N training images", type=int)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    pipeline: str = option(
        "device", "device: whole splits on the device, batches gathered in the compiled step; tfdata: a tf.data pipeline feeding host batches",
        choices=PIPELINES,
    )  # fmt: skip
    compute_dtype: str = option("float32", "activations' dtype (parameters and optimizer stay float32)", flag="--dtype", choices=COMPUTE_DTYPES)
    eval_batch_size: int = option(EVAL_BATCH_SIZE, "examples per evaluation batch")
    workdir: str | None = option(None, "run folder (default: runs/<dataset>-<timestamp>, linked as runs/latest)", type=str)
    data_dir: str | None = option(None, "tfds data_dir (default: tfds's, or $TFDS_DATA_DIR)", type=str)
    manual_dir: str | None = option(None, "folder holding the four MNIST .gz files, for offline preparation (or $MNIST_JAX_MANUAL_DIR)", type=str)
    arrays: str | None = option(None, "read the data from this .npz (made by `export`) instead of tfds: no TensorFlow", type=str)
    keep_checkpoints: int = option(3, "checkpoints kept (the latest N, and the best by val_accuracy)")
    checkpoint_every_steps: int = option(0, "also checkpoint every N steps inside an epoch (0: only at epoch ends)")
    devices: str = option("all", "data parallel over 'all' devices (every process's, multi-host), or the first N")
    steps_per_call: int = option(
        0, "training steps per compiled call, under lax.scan (0: auto, the whole epoch on GPU/TPU, 100 on CPU; 1 with --checkpoint-every-steps)"
    )
    tensorboard: bool = option(True, "write TensorBoard event files to WORKDIR/tb/")
    profile_steps: str | None = option(None, "A:B: a jax.profiler trace of training steps A..B in WORKDIR/profile/", type=str)

    def validate(self) -> "Config":
        """Raise UserError naming the first invalid field; return self for chaining."""
        checks = [
            (self.dataset in DATASETS, f"unknown dataset {self.dataset!r} (choose from {', '.join(DATASETS)})"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (
                0 <= self.seed <= SEED_MAX,
                f"--seed must be in 0..{SEED_MAX}, got {self.seed} (the PRNG keeps 32 bits: any other seed repeats one of these)",
            ),
            (
                math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning-rate must be a positive number, got {self.learning_rate}",
            ),
            (
                self.train_examples is None or self.train_examples >= 1,
                f"--train-examples must be >= 1, got {self.train_examples}",
            ),
            (self.pipeline in PIPELINES, f"--pipeline must be one of {', '.join(PIPELINES)}"),
            (self.compute_dtype in COMPUTE_DTYPES, f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}"),
            (self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (
                self.checkpoint_every_steps >= 0,
                f"--checkpoint-every-steps must be >= 0, got {self.checkpoint_every_steps}",
            ),
            (self.steps_per_call >= 0, f"--steps-per-call must be >= 0, got {self.steps_per_call}"),
            (self.model.padding in PADDINGS, f"padding must be one of {', '.join(PADDINGS)}"),
            (self.model.pool in POOLS, f"pool must be one of {', '.join(POOLS)}"),
            (0.0 <= self.model.dropout_rate < 1.0, f"dropout rate must be in [0, 1), got {self.model.dropout_rate}"),
            (
                self.model.num_classes >= NUM_CLASSES.get(self.dataset, 0),
                f"--num-classes must be at least {NUM_CLASSES.get(self.dataset)} for {self.dataset}, got {self.model.num_classes}",
            ),
            *(  # the layers' sizes (a config.json may hold any number)
                (getattr(self.model, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self.model, name)}")
                for name in ("conv1_features", "conv1_kernel", "conv2_features", "conv2_kernel", "dense_features", "num_classes")
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        parse_step_range(self.profile_steps)  # raises its own message
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_conflicts(self, saved: "Config") -> dict[str, tuple[Any, Any]]:
        """{field: (self's value, saved's value)} for the fields (model fields by name) that a
        resumed run may not change (all but RESUMABLE_CHANGES)."""
        mine, theirs = self.flat_dict(), saved.flat_dict()
        return {k: (v, theirs.get(k)) for k, v in mine.items() if k not in RESUMABLE_CHANGES and theirs.get(k) != v}

    def flat_dict(self) -> dict[str, Any]:
        """`to_dict()` with the model's fields at the top level (their names do not clash)."""
        values = self.to_dict()
        model = values.pop("model")
        return {**values, **model}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """A Config from `to_dict()`'s form; UserError naming the first unknown key or value of the wrong type."""
        if not isinstance(values, dict):
            raise UserError(f"a config is a JSON object of fields, got {type(values).__name__}")
        values = dict(values)
        model = values.pop("model", {})
        if not isinstance(model, dict):
            raise UserError(f"config key 'model' must be an object of model fields, got {type(model).__name__}")
        return cls(model=ModelConfig(**_checked(ModelConfig, model, "model.")), **_checked(cls, values, ""))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)  # a resumed run rewrites it: never a half-written config.json

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """A run's config.json."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no config.json in {path.parent} (is it a mnist_jax workdir?)")
        return cls.read(path)

    @classmethod
    def read(cls, path: str | Path) -> "Config":
        """A config from a JSON file (a run's config.json works as is); UserError in one line if it is not one."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise UserError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"config file {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(values)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None


def _checked(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`values` for the dataclass `cls`, each of its field's type (an int is a float too); UserError naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "model"}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"config has unknown key '{prefix}{key}' (known: {', '.join(fields)})")
        field = fields[key]
        kind = field_type(field)
        ok = (value is None and field.default is None) or (
            isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        ) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise UserError(f"config key '{prefix}{key}' must be {kind.__name__}{' or null' if field.default is None else ''}, got {value!r}")
    return {k: float(v) if field_type(fields[k]) is float and v is not None else v for k, v in values.items()}


def field_type(field: dataclasses.Field) -> type:
    """The type of a config field's values: its `option(type=...)`, else its default's type."""
    return field.metadata.get("type") or type(field.default)
