"""Every knob of a run, in one typed, JSON-serialisable dataclass.

The defaults are the tutorial's recipe: the seed CNN, Adam 1e-3, batch 32,
5 epochs, seed 0, the MNIST test split as validation after every epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

DATASETS = ("mnist", "fashion_mnist")
PIPELINES = ("device", "tfdata")
POOLS = ("max", "avg")
PADDINGS = ("SAME", "VALID")
COMPUTE_DTYPES = ("float32", "bfloat16")


class UserError(Exception):
    """Bad input from the user: reported as one line and a non-zero exit, no traceback."""


# Evaluation batch: on XLA:CPU 10,000 test images took 1.4 s in batches of 200 and 1.9 s in
# batches of 1,000 (activations of a smaller batch stay in cache); accelerators hardly care.
EVAL_BATCH_SIZE = 200


# What may differ between a run and its resumption: where things are on this machine, how many
# checkpoints to keep, the validation batch (it changes no parameter), and how many epochs to train
# in all (each epoch's data order depends only on the seed and the epoch, so a run extended to more
# epochs equals one that planned them). Every other field decides the trained parameters.
RESUMABLE_CHANGES = frozenset(
    {"data_dir", "manual_dir", "arrays", "workdir", "devices", "keep_checkpoints", "eval_batch_size", "epochs"}
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The seed CNN's architecture; experiments vary these fields."""

    conv1_features: int = 32
    conv1_kernel: int = 5
    conv2_features: int = 64
    conv2_kernel: int = 2
    dense_features: int = 1000
    num_classes: int = 10
    dropout_rate: float = 0.25
    padding: str = "SAME"
    pool: str = "max"


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run. `dataclasses.replace(Config(), epochs=1)` makes variants."""

    dataset: str = "mnist"
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    train_examples: int | None = None  # use only the first N training images
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # "device": whole splits as arrays on the device, batches gathered inside
    # the compiled step (fast path). "tfdata": a tf.data pipeline feeding host batches.
    pipeline: str = "device"
    compute_dtype: str = "float32"  # "bfloat16": bf16 activations, f32 params/optimizer
    eval_batch_size: int = EVAL_BATCH_SIZE
    workdir: str | None = None
    data_dir: str | None = None
    manual_dir: str | None = None
    arrays: str | None = None  # an .npz from `python -m mnist_jax export`: read instead of tfds, no TensorFlow
    keep_checkpoints: int = 3
    checkpoint_every_steps: int = 0  # 0: only at the end of every epoch
    devices: str = "all"  # data parallel over all local devices (every process's, multi-host), or the first N
    # Training steps per compiled call (the epoch's shuffle, batching and steps under one lax.scan).
    # 0: auto, the whole epoch on GPU/TPU, chunks of 100 on CPU (train.CPU_STEPS_PER_CALL); 1 with checkpoint_every_steps.
    steps_per_call: int = 0

    def validate(self) -> "Config":
        """Raise UserError naming the first invalid field; return self for chaining."""
        checks = [
            (self.dataset in DATASETS, f"unknown dataset {self.dataset!r} (choose from {', '.join(DATASETS)})"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
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
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
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
        values = dict(values)
        model = ModelConfig(**values.pop("model", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"config has unknown fields: {', '.join(sorted(unknown))}")
        return cls(model=model, **values)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)  # a resumed run rewrites it: never a half-written config.json

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no config.json in {path.parent} (is it a mnist_jax workdir?)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise UserError(f"cannot read {path}: {err}") from None
