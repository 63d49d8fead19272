"""TensorBoard event files of a run (`WORKDIR/tb/`), written with tensorboardX: pure Python, so runs
without TensorFlow in the process (`--arrays` on accelerator machines) log the same curves.

Tags: train/loss and train/accuracy (the epoch's running means, every `PROGRESS_EVERY` steps), epoch/loss,
epoch/accuracy, epoch/val_loss, epoch/val_accuracy, epoch/epoch_time_s, epoch/train_time_s,
epoch/learning_rate (at each epoch's last step), and the config as hyperparameters (`tb/hparams/`).
A resumed run purges what an interrupted process wrote after its checkpoint, so the curves continue
without duplicate or missing steps: everything up to a checkpoint is flushed before it is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter


class TensorBoardLog:
    """Scalars of one run in `logdir` (None: log nothing). `resumed_at`: the step a resumed run continues from."""

    def __init__(self, logdir: str | Path | None, resumed_at: int | None = None) -> None:
        # purge_step: TensorBoard drops the events at or after it that an earlier process wrote.
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = None if logdir is None else SummaryWriter(str(logdir), purge_step=purge, flush_secs=30)

    def train(self, step: int, loss: float, accuracy: float) -> None:
        self._scalars("train", step, {"loss": loss, "accuracy": accuracy})

    def epoch(self, step: int, values: dict[str, float]) -> None:
        self._scalars("epoch", step, values)

    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's flat config as hyperparameters, with its final metrics (`tb/hparams/`)."""
        if self.writer is not None:
            values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}
            self.writer.add_hparams(values, {f"hparam/{k}": v for k, v in metrics.items()}, name="hparams")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _scalars(self, group: str, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{group}/{name}", value, step)
