"""`python -m mnist_jax compare RUN_DIR...`: runs' curves on shared axes, their configs' differences, their final metrics.

Works on any run folder with a config.json: finished (history.json, metrics.json) or stopped (the history
saved with its latest checkpoint; no test metrics yet), analysed or not.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mnist_jax import checkpoint
from mnist_jax.config import Config, UserError


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a run folder says about its run."""

    name: str
    config: Config
    history: dict[str, Any]
    metrics: dict[str, float]  # {} for a run without metrics.json (stopped, or still training)


def load_run(path: str | Path) -> RunRecord:
    """The run in folder `path`; UserError if it is not a mnist_jax run folder."""
    workdir = Path(path)
    if not (workdir / "config.json").is_file():
        raise UserError(f"{workdir} is not a mnist_jax run folder (no config.json)")
    config = Config.load(workdir / "config.json")
    history_file, metrics_file = workdir / "history.json", workdir / "metrics.json"
    if history_file.is_file():
        history = _read_json(history_file)
    elif checkpoint.has_checkpoint(workdir):
        history = checkpoint.latest_meta(workdir)["history"]
    else:
        raise UserError(f"{workdir} has neither history.json nor a checkpoint: nothing to compare yet")
    metrics = _read_json(metrics_file) if metrics_file.is_file() else {}
    return RunRecord(workdir.resolve().name if workdir.name in ("", ".", "latest") else workdir.name, config, history, metrics)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def config_differences(runs: Sequence[RunRecord]) -> dict[str, list[Any]]:
    """{field: each run's value} for the config fields (model fields by name) whose values differ;
    where the runs' files are (workdir, data) are left out."""
    flats = [run.config.flat_dict() for run in runs]
    places = {"workdir", "data_dir", "manual_dir", "arrays"}
    return {k: [f.get(k) for f in flats] for k in flats[0] if k not in places and len({json.dumps(f.get(k)) for f in flats}) > 1}


def final_metrics(run: RunRecord) -> dict[str, Any]:
    """Test accuracy, wrong count, fit time and epochs trained (None where the run has no figure yet)."""
    accuracy = run.metrics.get("test_accuracy")
    examples = run.metrics.get("test_examples", 10_000)  # every supported data set's test split
    return {
        "epochs": len(run.history.get("val_accuracy", [])),
        "test_accuracy": accuracy,
        "wrong": None if accuracy is None else round((1 - accuracy) * examples),
        "fit_time_s": run.history.get("fit_time_s"),
    }


def table(runs: Sequence[RunRecord]) -> str:
    """A markdown table: one row per run, the differing config fields, then the final metrics."""
    differences = config_differences(runs)
    finals = [final_metrics(run) for run in runs]
    headers = ["run", *differences, "epochs trained", "test accuracy", "wrong", "fit time s"]
    rows = []
    for i, (run, final) in enumerate(zip(runs, finals)):
        accuracy = "n/a" if final["test_accuracy"] is None else f"{100 * final['test_accuracy']:.2f} %"
        fit_time = "n/a" if final["fit_time_s"] is None else f"{final['fit_time_s']:.1f}"
        wrong = "n/a" if final["wrong"] is None else str(final["wrong"])
        rows.append([run.name, *(str(values[i]) for values in differences.values()), str(final["epochs"]), accuracy, wrong, fit_time])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(runs: Sequence[RunRecord], path: str | Path | None = None) -> Figure:
    """Loss and accuracy per epoch (training solid, validation dashed), every run on the same two axes."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        epochs = range(1, len(run.history.get("loss", [])) + 1)
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            ax.plot(epochs, run.history.get(key, []), "o-", color=color, markersize=3, label=f"{run.name} train")
            ax.plot(epochs, run.history.get(f"val_{key}", []), "o--", color=color, markersize=3, label=f"{run.name} val")
    for ax, label in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.4)
    acc_ax.legend(fontsize=8)
    fig.suptitle(f"{len(runs)} runs")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
