"""Looking at a trained model: curves, wrong predictions, confusion, filters, feature maps, a report.

Every function takes arrays (a train state, images, labels, probabilities,
a history dict) so a research script can call it on its own model; plot
functions return a `matplotlib.figure.Figure` and save it when given `path`.
Figures are built with the object API (no pyplot), so no display and no
global figure registry are involved. `write_analysis` produces the whole
`analyze` output folder.

    from mnist_jax import analysis
    probs = analysis.predict_probabilities(state, test["image"])
    wrong = analysis.wrong_predictions(test["label"], probs)
    analysis.plot_wrong(test["image"], wrong, path="wrong.png")
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mnist_jax import checkpoint, loop, steps
from mnist_jax.config import EVAL_BATCH_SIZE, UserError
from mnist_jax.files import atomic_write

# Layers whose outputs `feature_maps` returns, in call order.
FEATURE_LAYERS = ("conv1", "pool1", "conv2", "pool2")
GRID = 16  # wrong predictions drawn, as the tutorial does (4 x 4)
DPI = 100
# What `write_analysis` writes; MANIFEST records each file's sha256, so that a later analyze knows its own files.
OUTPUT_FILES = (
    "curves.png", "predictions.npz", "wrong.json", "wrong_grid.png",
    "confusion.png", "filters.png", "feature_maps.png", "report.md",
)  # fmt: skip
MANIFEST = "manifest.json"
WRITER = "mnist_jax analyze"


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:  # whole or not at all; the format from the suffix (none: PNG)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=Path(path).suffix[1:].lower() or "png"))
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    return buffer.getvalue()


def _name(class_names: Sequence[str] | None, index: int) -> str:
    return str(index) if class_names is None else class_names[index]


# --- predictions -------------------------------------------------------------


def predict_probabilities(state: Any, images: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Class probabilities float32[N, classes] for images float32[N, 28, 28, 1], in batches.

    The last batch is padded to the batch size so the jitted `predict` compiles
    one shape only.
    """
    images = np.asarray(images, np.float32)
    n = len(images)
    if n == 0:
        raise ValueError("predict_probabilities needs at least one image")
    size = min(batch_size, n)
    out = []
    for start in range(0, n, size):
        batch = images[start : start + size]
        short = size - len(batch)
        if short:
            batch = np.concatenate([batch, np.zeros((short, *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(steps.predict(state, batch))[: size - short])
    return np.concatenate(out)


def predict_labels(state: Any, images: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Predicted class int32[N] (argmax of `predict_probabilities`)."""
    return predict_probabilities(state, images, batch_size).argmax(axis=-1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class WrongPredictions:
    """The misclassified examples of a split: parallel arrays, ordered by index."""

    indices: np.ndarray  # int64[K]: positions in the split
    labels: np.ndarray  # int32[K]: true labels
    predicted: np.ndarray  # int32[K]: predicted labels
    confidence: np.ndarray  # float32[K]: probability the model gave its (wrong) prediction
    total: int  # number of examples in the split

    def __len__(self) -> int:
        return len(self.indices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: count, total, and one list per field."""
        return {
            "count": len(self),
            "total": self.total,
            "indices": self.indices.tolist(),
            "labels": self.labels.tolist(),
            "predicted": self.predicted.tolist(),
            "confidence": [round(float(c), 6) for c in self.confidence],
        }


def wrong_predictions(labels: np.ndarray, probabilities: np.ndarray) -> WrongPredictions:
    """Every example whose argmax prediction differs from its label."""
    labels = np.asarray(labels).astype(np.int32)
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or len(probabilities) != len(labels):
        raise ValueError(f"probabilities {probabilities.shape} do not match labels {labels.shape}")
    predicted = probabilities.argmax(axis=-1).astype(np.int32)
    indices = np.flatnonzero(predicted != labels)
    return WrongPredictions(
        indices=indices,
        labels=labels[indices],
        predicted=predicted[indices],
        confidence=probabilities[indices, predicted[indices]].astype(np.float32),
        total=len(labels),
    )


def sample_wrong(wrong: WrongPredictions, count: int = GRID, seed: int = 0) -> np.ndarray:
    """Positions into `wrong` of up to `count` examples, drawn without replacement from `seed`, sorted."""
    k = min(count, len(wrong))
    return np.sort(np.random.default_rng(seed).choice(len(wrong), size=k, replace=False))


# --- confusion ---------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Counts int64[C, C]: row = true class, column = predicted class."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    for name, values in (("labels", labels), ("predicted", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got {values.min()}..{values.max()}")
    return np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each true class, float64[C]; NaN for a class with no examples."""
    confusion = np.asarray(confusion)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / support, np.nan)


def top_confusions(confusion: np.ndarray, k: int = 5) -> list[tuple[int, int, int]]:
    """The `k` largest off-diagonal cells as (true, predicted, count), most frequent first; zeros left out."""
    off = np.array(confusion, copy=True)
    np.fill_diagonal(off, 0)
    cells = [(int(t), int(p), int(off[t, p])) for t, p in zip(*np.nonzero(off))]
    return sorted(cells, key=lambda c: (-c[2], c[0], c[1]))[:k]


# --- plots -------------------------------------------------------------------


def plot_curves(history: Mapping[str, Sequence[float]], *, path: str | Path | None = None) -> Figure:
    """Loss and val_loss (left), accuracy and val_accuracy (right) per epoch."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (("Loss", ("loss", "val_loss")), ("Accuracy", ("accuracy", "val_accuracy")))
    for ax, (title, keys) in zip(axes, panels):
        for key, style in zip(keys, ("o-", "s--")):
            values = history.get(key) or []
            if values:
                label = ("validation " if key.startswith("val_") else "training ") + title.lower()
                ax.plot(range(1, len(values) + 1), values, style, label=label)
        ax.set_title(title)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(title)
        epochs = max(len(history.get(k) or []) for k in keys)
        if epochs <= 20:  # one tick per epoch; a 1-epoch run would otherwise get fractional ticks
            ax.set_xticks(range(1, epochs + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.4)
        if ax.get_lines():
            ax.legend()
    fig.suptitle("Training curves")
    return _save(fig, path)


def plot_wrong(
    images: np.ndarray,
    wrong: WrongPredictions,
    *,
    count: int = GRID,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Up to `count` wrong predictions (sampled from `seed`) in a 4-column grid, titled `Label X, Predict Y (p%)`.

    `images` is the whole split that `wrong` indexes into.
    """
    chosen = sample_wrong(wrong, count, seed)
    columns = 4
    rows = max(1, math.ceil(len(chosen) / columns))
    fig = Figure(figsize=(10.5, 2.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, position in zip(axes, chosen):
        index = int(wrong.indices[position])
        ax.imshow(np.asarray(images[index]).squeeze(-1), cmap="Greys", vmin=0.0, vmax=1.0)
        label, predicted = int(wrong.labels[position]), int(wrong.predicted[position])
        title = (
            f"Label {_name(class_names, label)}, Predict {_name(class_names, predicted)} "
            f"({wrong.confidence[position]:.0%})"
        )
        ax.set_title(title, fontsize=9 if len(title) <= 30 else 8)  # class names run long
        ax.axis("off")
    for ax in axes[len(chosen) :]:
        fig.delaxes(ax)
    if len(chosen) == 0:
        fig.text(0.5, 0.5, "No wrong predictions", ha="center", va="center", fontsize=14)
    fig.suptitle(f"{len(chosen)} of {len(wrong)} wrong predictions (of {wrong.total}; sample seed {seed})")
    return _save(fig, path)


def plot_confusion(
    confusion: np.ndarray, *, class_names: Sequence[str] | None = None, path: str | Path | None = None
) -> Figure:
    """The confusion matrix with its counts (left) and per-class accuracy (right).

    Colours are on a symmetric-log scale so that off-diagonal counts of a few
    stay visible next to diagonal counts of a thousand; the numbers are exact.
    """
    confusion = np.asarray(confusion)
    n = len(confusion)
    names = [_name(class_names, i) for i in range(n)]
    total, correct = int(confusion.sum()), int(np.trace(confusion))
    fig = Figure(figsize=(14, 6.6), layout="constrained")
    ax, bars = fig.subplots(1, 2, width_ratios=(1.5, 1))
    norm = SymLogNorm(linthresh=1.0, vmin=0, vmax=max(1, int(confusion.max())))
    image = ax.imshow(confusion, cmap="Blues", norm=norm)
    for (t, p), count in np.ndenumerate(confusion):
        dark = norm(count) > 0.6
        ax.text(p, t, str(count), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(n), names, rotation=45 if class_names else 0, ha="right" if class_names else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(f"Confusion matrix: {correct} of {total} correct ({correct / max(total, 1):.2%})")
    fig.colorbar(image, ax=ax, label="Count (symlog colour scale)", shrink=0.8)

    accuracy = per_class_accuracy(confusion)
    positions = np.arange(n)
    bars.barh(positions, np.nan_to_num(accuracy), color="tab:blue")
    low = max(0.0, float(np.nanmin(accuracy)) - 0.05) if np.isfinite(accuracy).any() else 0.0
    for y, value in zip(positions, accuracy):
        text = "n/a" if np.isnan(value) else f"{value:.1%} "
        inside = not np.isnan(value) and value - low > 0.2 * (1.0 - low)
        bars.text(value if inside else low, y, text, va="center", ha="right" if inside else "left", fontsize=9,
                  color="white" if inside else "black")  # fmt: skip
    bars.set_yticks(positions, names)
    bars.invert_yaxis()  # class 0 on top, as in the matrix
    bars.set_xlim(low, 1.0)
    bars.set_xlabel("Accuracy (correct / true class count)")
    bars.set_title("Per-class accuracy")
    bars.grid(True, axis="x", alpha=0.4)
    return _save(fig, path)


def plot_filters(kernel: np.ndarray, *, layer: str = "conv1", path: str | Path | None = None) -> Figure:
    """A convolution kernel [kh, kw, in, out] as `out` small images on one shared, zero-centred scale.

    Multi-channel input filters are shown averaged over their input channels.
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 4:
        raise ValueError(f"expected a kernel [kh, kw, in, out], got shape {kernel.shape}")
    filters = kernel.mean(axis=2)  # [kh, kw, out]
    count = filters.shape[-1]
    columns = min(8, count)
    rows = math.ceil(count / columns)
    limit = float(np.abs(filters).max()) or 1.0  # one scale for all, so filters compare
    fig = Figure(figsize=(1.3 * columns + 1.2, 1.35 * rows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    image = None
    for i, ax in enumerate(axes):
        if i >= count:
            fig.delaxes(ax)
            continue
        image = ax.imshow(filters[..., i], cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"#{i}", fontsize=8)
        ax.axis("off")
    fig.colorbar(image, ax=list(axes[:count]), label="Weight", shrink=0.8)
    kh, kw = filters.shape[:2]
    suffix = "" if kernel.shape[2] == 1 else f", mean over {kernel.shape[2]} input channels"
    fig.suptitle(f"{layer}: {count} learned {kh}x{kw} filters{suffix}")
    return _save(fig, path)


def feature_maps(state: Any, image: np.ndarray, layers: Sequence[str] = FEATURE_LAYERS) -> dict[str, np.ndarray]:
    """Activations float32[H, W, C] of one image [28, 28, 1] after each layer in `layers`.

    Convolutions are captured before their ReLU (it is applied outside the
    module), so ReLU is applied here: the maps are what the next layer sees.
    """
    x = np.asarray(image, np.float32)
    x = (x[..., None] if x.ndim == 2 else x)[None]  # one image [1, 28, 28, 1]
    _, captured = state.apply_fn(
        {"params": state.params}, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    intermediates = captured["intermediates"]
    maps = {}
    for name in layers:
        if name not in intermediates:
            raise KeyError(f"the model has no layer {name!r} (has {', '.join(intermediates)})")
        out = np.asarray(intermediates[name]["__call__"][0][0], np.float32)
        maps[name] = np.maximum(out, 0.0) if name.startswith("conv") else out
    return maps


def montage(maps: np.ndarray, columns: int = 8, gap: int = 1) -> np.ndarray:
    """Channels of maps [H, W, C] tiled row-major into one 2-D array, separated by NaN gaps."""
    h, w, c = maps.shape
    columns = min(columns, c)
    rows = math.ceil(c / columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap), np.nan, np.float32)
    for i in range(c):
        r, q = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = maps[..., i]
    return out


def plot_feature_maps(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """The input digit, then every channel of each layer in `maps` (from `feature_maps`), one panel per layer.

    Each layer has its own colour scale from 0 to its largest activation, so a
    dark channel is one that barely fires on this digit.
    """
    names = list(maps)
    fig = Figure(figsize=(14, 4.2 * math.ceil((len(names) + 1) / 3) + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil((len(names) + 1) / 3), 3)).ravel()
    axes[0].imshow(np.asarray(image).squeeze(), cmap="Greys", vmin=0, vmax=1)
    axes[0].set_title("Input")
    axes[0].axis("off")
    cmap = colormaps["viridis"].with_extremes(bad="white")
    for ax, name in zip(axes[1:], names):
        layer = np.asarray(maps[name])
        h, w, c = layer.shape
        shown = ax.imshow(montage(layer), cmap=cmap, vmin=0.0, vmax=max(float(layer.max()), 1e-6))
        relu = " + ReLU" if name.startswith("conv") else ""
        ax.set_title(f"{name}{relu}: {c} maps of {h}x{w}")
        ax.axis("off")
        fig.colorbar(shown, ax=ax, shrink=0.7, label="Activation")
    for ax in axes[len(names) + 1 :]:
        fig.delaxes(ax)
    fig.suptitle(title or "Feature maps")
    return _save(fig, path)


# --- the whole analysis ------------------------------------------------------


def load_history(workdir: str | Path) -> dict[str, Any]:
    """A run's history.json; for a run stopped before writing it, the history saved with its latest checkpoint."""
    workdir = Path(workdir)
    path = workdir / "history.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"cannot read {path}: {err}") from None
    if not checkpoint.has_checkpoint(workdir):
        raise UserError(f"{workdir} has neither history.json nor a checkpoint")
    return checkpoint.latest_meta(workdir)["history"]


def report_markdown(summary: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """The report.md text for a `write_analysis` summary."""
    total, wrong = summary["total"], summary["wrong"]
    lines = [
        f"# Analysis of {summary.get('title') or 'a trained model'}",
        "",
        f"- Test loss: {summary['test_loss']:.4f}",
        f"- Test accuracy: {summary['test_accuracy']:.4f}",
        f"- Wrong predictions: {wrong} of {total}",
        f"- First 10 predictions: {' '.join(_name(class_names, int(p)) for p in summary['first_predictions'])}",
        "",
        "## Training curves",
        "",
        "![Training curves](curves.png)",
        "",
        "## Wrong predictions",
        "",
        "Every wrong prediction (index, label, prediction, confidence) is in [wrong.json](wrong.json); "
        "all predicted labels and probabilities are in `predictions.npz`.",
        "",
        "![Wrong predictions](wrong_grid.png)",
        "",
        "## Confusion matrix",
        "",
        "![Confusion matrix](confusion.png)",
        "",
        "| Class | Accuracy | Test images |",
        "|---|---:|---:|",
    ]
    for i, (accuracy, support) in enumerate(zip(summary["per_class_accuracy"], summary["support"])):
        value = "n/a" if accuracy is None else f"{accuracy:.2%}"
        lines.append(f"| {_name(class_names, i)} | {value} | {support} |")
    lines += ["", "Most confused (true → predicted):", ""]
    if summary["top_confusions"]:
        lines += [
            f"{rank}. {_name(class_names, t)} → {_name(class_names, p)}: {n}"
            for rank, (t, p, n) in enumerate(summary["top_confusions"], 1)
        ]
    else:
        lines.append("none")
    lines += [
        "",
        "## First-layer filters",
        "",
        "![conv1 filters](filters.png)",
        "",
        "## Feature maps",
        "",
        f"Test image {summary['feature_index']} (label {_name(class_names, summary['feature_label'])}).",
        "",
        "![Feature maps](feature_maps.png)",
        "",
    ]
    return "\n".join(lines)


def check_flags(*, seed: int, feature_index: int, num_examples: int | None = None) -> None:
    """UserError naming the flag if `seed` (--seed, >= 0) or `feature_index` (--index, in [0, num_examples);
    only >= 0 while the split's size is unknown) cannot be used."""
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if feature_index < 0 or (num_examples is not None and feature_index >= num_examples):
        upper = "" if num_examples is None else f", {num_examples})"
        raise UserError(f"--index must be in [0{upper or ', ...)'}, got {feature_index}")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(outdir: Path) -> dict[str, list[str]] | None:
    """{file: sha256s analyze wrote under that name} from outdir's manifest; None if there is none of analyze's."""
    path = outdir / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("written_by") != WRITER or not isinstance(record.get("sha256"), dict):
        return None
    return record["sha256"]


def check_outdir(outdir: str | Path, *, force: bool = False) -> None:
    """Refuse, with a UserError, an analysis folder that `write_analysis` must not write into.

    Always refused: a symbolic link (the outputs would land wherever it points) and a path that is not a
    folder. Refused unless `force`: a folder holding, under one of analyze's names (OUTPUT_FILES and
    MANIFEST), a file analyze did not write or that changed since it did (its MANIFEST has every file's
    sha256). Any other file in the folder is left alone, force or not.
    """
    outdir = Path(outdir)
    if outdir.is_symlink():
        raise UserError(f"{outdir} is a symbolic link; analyze writes only into a real folder (remove the link)")
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"{outdir} is not a folder")
    if force or not outdir.exists():
        return
    own = _manifest(outdir)
    foreign = []
    for name in (*OUTPUT_FILES, MANIFEST):
        path = outdir / name
        if not (path.exists() or path.is_symlink()):
            continue
        if name == MANIFEST:
            mine = own is not None
        else:
            mine = path.is_file() and not path.is_symlink() and _sha256(path) in (own or {}).get(name, ())
        if not mine:
            foreign.append(name)
    if foreign:
        raise UserError(f"{outdir} holds {', '.join(foreign)} that analyze did not write or that changed since; "
                        "add --force to overwrite them")  # fmt: skip


def write_analysis(
    state: Any,
    test: Mapping[str, np.ndarray],
    history: Mapping[str, Any],
    outdir: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    feature_index: int = 0,
    batch_size: int = EVAL_BATCH_SIZE,
    title: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write curves.png, predictions.npz, wrong.json, wrong_grid.png, confusion.png, filters.png,
    feature_maps.png, report.md and manifest.json into `outdir`; return the summary the report is made from.

    Nothing is written until every flag is checked (`check_flags`), the folder is accepted
    (`check_outdir`: no link, nothing foreign overwritten without `force`) and every output is made in
    memory. Each file is then replaced whole (`files.atomic_write`): a failure (a full disk: HostError)
    leaves every file either as it was or as new, and no temporary file.
    """
    images, labels = np.asarray(test["image"]), np.asarray(test["label"])
    check_flags(seed=seed, feature_index=feature_index, num_examples=len(labels))
    outdir = Path(outdir)
    check_outdir(outdir, force=force)

    probabilities = predict_probabilities(state, images, batch_size)
    predicted = probabilities.argmax(axis=-1).astype(np.int32)
    wrong = wrong_predictions(labels, probabilities)
    num_classes = probabilities.shape[-1]
    confusion = confusion_matrix(labels, predicted, num_classes)
    accuracy = per_class_accuracy(confusion)

    outputs: dict[str, bytes] = {}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, predicted=predicted, labels=labels, probabilities=probabilities, confusion=confusion)
    outputs["predictions.npz"] = buffer.getvalue()
    outputs["wrong.json"] = (json.dumps(wrong.to_dict(), indent=1) + "\n").encode()
    outputs["curves.png"] = _png(plot_curves(history))
    outputs["wrong_grid.png"] = _png(plot_wrong(images, wrong, seed=seed, class_names=class_names))
    outputs["confusion.png"] = _png(plot_confusion(confusion, class_names=class_names))
    outputs["filters.png"] = _png(plot_filters(state.params["conv1"]["kernel"]))
    digit = images[feature_index]
    label, guess = int(labels[feature_index]), int(predicted[feature_index])
    outputs["feature_maps.png"] = _png(plot_feature_maps(
        digit,
        feature_maps(state, digit),
        title=f"Feature maps of test image {feature_index}: "
        f"label {_name(class_names, label)}, predicted {_name(class_names, guess)}",
    ))  # fmt: skip
    summary = {
        "title": title,
        "total": len(labels),
        "wrong": len(wrong),
        # fit's own definition (cross-entropy of the logits): the log of a float32 probability loses
        # confident examples to rounding and underflow, and moved the 4th decimal.
        "test_loss": loop.evaluate(state, test, batch_size)["loss"],
        "test_accuracy": float((predicted == labels).mean()),
        "first_predictions": predicted[:10].tolist(),
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in accuracy],
        "support": confusion.sum(axis=1).tolist(),
        "top_confusions": top_confusions(confusion),
        "feature_index": feature_index,
        "feature_label": label,
        "outdir": str(outdir),
    }
    outputs["report.md"] = report_markdown(summary, class_names).encode()
    assert set(outputs) == set(OUTPUT_FILES)

    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {outdir}: {err.strerror}") from None
    check_outdir(outdir, force=True)  # still no link (it could have appeared meanwhile)
    new = {name: hashlib.sha256(data).hexdigest() for name, data in outputs.items()}
    # While the files are replaced one by one, the manifest accepts the old and the new content of
    # each, so that an interrupted analyze does not make its own files look foreign to the next one.
    during = {name: sorted({new[name], *([_sha256(outdir / name)] if (outdir / name).is_file() else [])}) for name in new}
    _write_manifest(outdir, during)
    for name, data in outputs.items():
        atomic_write(outdir / name, lambda tmp, data=data: tmp.write_bytes(data))
    _write_manifest(outdir, {name: [digest] for name, digest in new.items()})
    return summary


def _write_manifest(outdir: Path, digests: Mapping[str, list[str]]) -> None:
    record = {"written_by": WRITER, "sha256": dict(digests)}
    atomic_write(outdir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
