"""mnist_jax.analysis: predictions, the wrong list, every plot (figure contents and PNG file), and `analyze`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mnist_jax import Config, analysis, fit, predict
from mnist_jax.cli import main
from mnist_jax.data import CLASS_NAMES
from tests.conftest import REPO

TITLE = re.compile(r"^Label (.+), Predict (.+) \((\d+)%\)$")
OUTPUTS = (
    "curves.png", "predictions.npz", "wrong.json", "wrong_grid.png",
    "confusion.png", "filters.png", "feature_maps.png", "report.md",
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dirs):
    """(workdir, state) of a one-epoch run on 512 images: ~70% accurate, so plenty of wrong predictions."""
    workdir = tmp_path_factory.mktemp("analysis") / "tiny"
    state, _ = fit(Config(epochs=1, train_examples=512, workdir=str(workdir), **mnist_dirs), verbose=False)
    return workdir, state


@pytest.fixture(scope="module")
def test_probs(run, mnist_small):
    _, test = mnist_small
    return analysis.predict_probabilities(run[1], test["image"])


def assert_png(path, min_size=(300, 200)):
    """A real, non-blank PNG at least `min_size` pixels."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1], image.size
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # something is drawn


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def synthetic_wrong(labels, predicted, total=100):
    labels, predicted = np.asarray(labels, np.int32), np.asarray(predicted, np.int32)
    return analysis.WrongPredictions(
        indices=np.arange(len(labels)), labels=labels, predicted=predicted,
        confidence=np.full(len(labels), 0.5, np.float32), total=total,
    )  # fmt: skip


# --- predictions and the wrong list ------------------------------------------


def test_batched_predictions_match_one_call(run, mnist_small):
    _, state = run
    images = mnist_small[1]["image"][:250]
    direct = np.asarray(predict(state, images))
    batched = analysis.predict_probabilities(state, images, batch_size=64)  # 3 full batches + a padded one
    assert batched.shape == (250, 10)
    np.testing.assert_allclose(batched, direct, atol=1e-5)
    np.testing.assert_array_equal(analysis.predict_labels(state, images, batch_size=100), direct.argmax(-1))


def test_wrong_predictions_agree_with_independent_argmax(run, mnist_small, test_probs):
    workdir, state = run
    labels = mnist_small[1]["label"]
    wrong = analysis.wrong_predictions(labels, test_probs)
    # The count implied by fit's own evaluation (eval_step, argmax of logits).
    accuracy = json.loads((workdir / "metrics.json").read_text())["test_accuracy"]
    assert len(wrong) == round((1 - accuracy) * len(labels)) and wrong.total == 10000
    assert 0 < len(wrong) < 10000
    # Indices from logits computed without `predict`, on the first 1,000 images.
    logits = state.apply_fn({"params": state.params}, mnist_small[1]["image"][:1000], train=False)
    expected = np.flatnonzero(np.asarray(jax.numpy.argmax(logits, -1)) != labels[:1000])
    np.testing.assert_array_equal(wrong.indices[wrong.indices < 1000], expected)
    np.testing.assert_array_equal(wrong.labels, labels[wrong.indices])
    assert np.all(wrong.predicted != wrong.labels)
    np.testing.assert_allclose(wrong.confidence, test_probs[wrong.indices].max(-1))
    record = json.loads(json.dumps(wrong.to_dict()))
    assert record["count"] == len(wrong) and record["indices"] == wrong.indices.tolist()


def test_wrong_predictions_on_known_probabilities():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], np.float32)
    wrong = analysis.wrong_predictions(np.array([0, 1, 1, 0]), probs)
    assert wrong.indices.tolist() == [2, 3]
    assert wrong.labels.tolist() == [1, 0] and wrong.predicted.tolist() == [0, 2]
    np.testing.assert_allclose(wrong.confidence, [0.6, 0.8])
    with pytest.raises(ValueError):
        analysis.wrong_predictions(np.array([0, 1]), probs)


def test_sample_wrong_is_reproducible_and_takes_all_when_few():
    wrong = synthetic_wrong(np.zeros(40), np.ones(40))
    a, b, c = (analysis.sample_wrong(wrong, 16, seed) for seed in (3, 3, 4))
    assert len(a) == 16 and len(set(a.tolist())) == 16 and a.max() < 40
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert analysis.sample_wrong(synthetic_wrong([0] * 5, [1] * 5), 16, 0).tolist() == [0, 1, 2, 3, 4]


# --- confusion ---------------------------------------------------------------


def test_confusion_matrix_per_class_accuracy_and_top_confusions():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2, 1, 1, 0])
    cm = analysis.confusion_matrix(labels, predicted, num_classes=4)
    assert cm.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [1, 2, 1, 0], [0, 0, 0, 0]]
    acc = analysis.per_class_accuracy(cm)
    np.testing.assert_allclose(acc[:3], [2 / 3, 1 / 2, 1 / 4])
    assert np.isnan(acc[3])  # no examples of class 3
    assert analysis.top_confusions(cm, k=3) == [(2, 1, 2), (0, 1, 1), (1, 0, 1)]
    with pytest.raises(ValueError):
        analysis.confusion_matrix(np.array([0, 5]), np.array([0, 1]), num_classes=4)


def test_plot_confusion_holds_the_whole_test_split(mnist_small, test_probs, tmp_path):
    labels = mnist_small[1]["label"]
    predicted = test_probs.argmax(-1)
    cm = analysis.confusion_matrix(labels, predicted)
    assert cm.shape == (10, 10) and cm.sum() == 10000 and np.trace(cm) == np.sum(predicted == labels)
    fig = analysis.plot_confusion(cm, path=tmp_path / "confusion.png")
    matrix_ax = fig.axes[0]
    shown = np.asarray(matrix_ax.images[0].get_array())
    assert shown.shape == (10, 10) and shown.sum() == 10000
    np.testing.assert_array_equal(shown, cm)
    counts = sorted(int(t.get_text()) for t in matrix_ax.texts)
    assert counts == sorted(cm.ravel().tolist())  # every cell is written out
    assert matrix_ax.get_xlabel() == "Predicted label" and matrix_ax.get_ylabel() == "True label"
    assert f"{np.trace(cm)} of 10000" in matrix_ax.get_title()
    bars = [ax for ax in fig.axes if ax.get_title() == "Per-class accuracy"][0]
    widths = [patch.get_width() for patch in bars.patches]
    np.testing.assert_allclose(widths, analysis.per_class_accuracy(cm))
    assert_png(tmp_path / "confusion.png", (800, 400))


# --- plots -------------------------------------------------------------------


def test_plot_curves_draws_both_panels(tmp_path):
    history = {
        "loss": [0.5, 0.3, 0.2], "val_loss": [0.4, 0.35, 0.3],
        "accuracy": [0.8, 0.9, 0.95], "val_accuracy": [0.85, 0.9, 0.92],
    }  # fmt: skip
    fig = analysis.plot_curves(history, path=tmp_path / "curves.png")
    assert len(fig.axes) == 2
    for ax, keys in zip(fig.axes, (("loss", "val_loss"), ("accuracy", "val_accuracy"))):
        assert ax.get_title() and ax.get_xlabel() == "Epoch" and ax.get_ylabel()
        lines = ax.get_lines()
        assert [list(line.get_ydata()) for line in lines] == [history[k] for k in keys]
        assert list(lines[0].get_xdata()) == [1, 2, 3]
        assert len(ax.get_legend().get_texts()) == 2
        assert all(g.get_visible() for g in ax.xaxis.get_gridlines())
    assert_png(tmp_path / "curves.png", (800, 300))


def test_plot_wrong_grid_of_16(run, mnist_small, test_probs, tmp_path):
    images, labels = mnist_small[1]["image"], mnist_small[1]["label"]
    wrong = analysis.wrong_predictions(labels, test_probs)
    assert len(wrong) > 16
    fig = analysis.plot_wrong(images, wrong, seed=1, path=tmp_path / "wrong.png")
    axes = image_axes(fig)
    assert len(axes) == 16
    chosen = analysis.sample_wrong(wrong, 16, seed=1)
    for ax, position in zip(axes, chosen):
        label, guess, percent = TITLE.match(ax.get_title()).groups()
        index = wrong.indices[position]
        assert int(label) == labels[index] and int(guess) == test_probs[index].argmax() and label != guess
        assert abs(int(percent) - 100 * test_probs[index].max()) <= 0.5 + 1e-6
        np.testing.assert_array_equal(ax.images[0].get_array(), images[index, ..., 0])
        assert ax.images[0].get_cmap().name == "Greys" and not ax.axison
    again = [ax.get_title() for ax in image_axes(analysis.plot_wrong(images, wrong, seed=1))]
    other = [ax.get_title() for ax in image_axes(analysis.plot_wrong(images, wrong, seed=2))]
    assert again == [ax.get_title() for ax in axes] and other != again
    assert_png(tmp_path / "wrong.png", (600, 600))


def test_plot_wrong_shows_all_when_fewer_than_16_and_uses_class_names():
    images = np.random.default_rng(0).random((100, 28, 28, 1), dtype=np.float32)
    wrong = synthetic_wrong([6, 0, 9], [0, 6, 7])
    fig = analysis.plot_wrong(images, wrong, class_names=CLASS_NAMES["fashion_mnist"])
    titles = [ax.get_title() for ax in image_axes(fig)]
    assert titles == [
        "Label Shirt, Predict T-shirt/top (50%)",
        "Label T-shirt/top, Predict Shirt (50%)",
        "Label Ankle boot, Predict Sneaker (50%)",
    ]
    none = analysis.plot_wrong(images, synthetic_wrong([], []))
    assert not image_axes(none) and any("No wrong predictions" in t.get_text() for t in none.texts)


def test_plot_filters_shows_32_first_layer_filters(run, tmp_path):
    kernel = np.asarray(run[1].params["conv1"]["kernel"])
    assert kernel.shape == (5, 5, 1, 32)
    fig = analysis.plot_filters(kernel, path=tmp_path / "filters.png")
    axes = image_axes(fig)
    assert len(axes) == 32
    for i, ax in enumerate(axes):
        np.testing.assert_array_equal(ax.images[0].get_array(), kernel[:, :, 0, i])
        assert ax.images[0].get_clim() == axes[0].images[0].get_clim()  # one shared scale
    assert "32" in fig.get_suptitle() and "5x5" in fig.get_suptitle()
    assert_png(tmp_path / "filters.png", (600, 300))


def test_feature_maps_are_post_relu_and_pooled(run, mnist_small, tmp_path):
    _, state = run
    image = mnist_small[1]["image"][0]
    maps = analysis.feature_maps(state, image)
    assert list(maps) == ["conv1", "pool1", "conv2", "pool2"]
    assert [m.shape for m in maps.values()] == [(28, 28, 32), (14, 14, 32), (14, 14, 64), (7, 7, 64)]
    assert all(m.min() >= 0 for m in maps.values()) and maps["conv1"].max() > 0
    # The model's pool1 is the 2x2 max of ReLU(conv1): holds only if ReLU was applied here.
    pooled = maps["conv1"].reshape(14, 2, 14, 2, 32).max(axis=(1, 3))
    np.testing.assert_allclose(pooled, maps["pool1"], rtol=1e-6)

    fig = analysis.plot_feature_maps(image, maps, title="digit 0", path=tmp_path / "maps.png")
    axes = image_axes(fig)
    assert [ax.get_title().split(":")[0] for ax in axes] == ["Input", "conv1 + ReLU", "pool1", "conv2 + ReLU", "pool2"]
    montage = np.asarray(axes[1].images[0].get_array())
    assert montage.shape == (4 * 29 - 1, 8 * 29 - 1)  # 4 x 8 tiles of 28x28, 1-pixel gaps
    np.testing.assert_array_equal(montage[:28, 29:57], maps["conv1"][..., 1])
    assert_png(tmp_path / "maps.png", (800, 500))


def test_load_history_falls_back_to_the_checkpoint(run, tmp_path):
    workdir, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("analysis"))
    expected = json.loads((copy / "history.json").read_text())
    (copy / "history.json").unlink()  # as for a run stopped before fit wrote it
    restored = analysis.load_history(copy)
    assert restored["val_accuracy"] == expected["val_accuracy"] and restored["loss"] == expected["loss"]


# --- the CLI -----------------------------------------------------------------


def test_analyze_cli_writes_all_outputs(run, capsys):
    workdir, _ = run
    assert main(["analyze", "--workdir", str(workdir), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    accuracy = json.loads((workdir / "metrics.json").read_text())["test_accuracy"]
    count = int(re.search(r"^Wrong predictions: (\d+) of 10000$", out, re.M).group(1))
    assert count == round((1 - accuracy) * 10000)
    assert re.search(r"^First 10 predictions: \[(\d ){9}\d\]$", out, re.M)
    assert f"Test Accuracy : {accuracy:.4f}" in out
    loss = json.loads((workdir / "metrics.json").read_text())["test_loss"]
    assert f"Test Loss : {loss:.4f}" in out  # fit's and analyze's test loss are one definition

    outdir = workdir / "analysis"
    assert all((outdir / name).is_file() for name in OUTPUTS)
    for name in OUTPUTS:
        if name.endswith(".png"):
            assert_png(outdir / name)
    saved = np.load(outdir / "predictions.npz")
    assert saved["predicted"].shape == (10000,)
    np.testing.assert_array_equal(saved["predicted"], saved["probabilities"].argmax(-1))
    assert saved["confusion"].sum() == 10000
    wrong = json.loads((outdir / "wrong.json").read_text())
    assert wrong["count"] == count == len(wrong["indices"]) == len(wrong["confidence"])
    assert all(saved["predicted"][i] == p != saved["labels"][i] for i, p in zip(wrong["indices"], wrong["predicted"]))
    report = (outdir / "report.md").read_text()
    assert f"Wrong predictions: {count} of 10000" in report and f"{accuracy:.4f}" in report
    for image in ("curves.png", "wrong_grid.png", "confusion.png", "filters.png", "feature_maps.png"):
        assert f"]({image})" in report


def test_analyze_cli_bad_workdir_is_one_line(tmp_path, capsys):
    assert main(["analyze", "--workdir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


# --- analyze's outputs (issue 23): checked before writing, atomic, never through a link or over what is not its own


def analysed_copy(run, tmp_path):
    """A copy of the trained run without its analysis/ folder."""
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("analysis"))
    return copy


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist_jax: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("flags", "message"), [(["--seed", "-1"], "--seed"), (["--index", "10000"], "--index")])
def test_analyze_checks_its_flags_before_writing_anything(run, tmp_path, capsys, flags, message):
    copy = analysed_copy(run, tmp_path)
    assert main(["analyze", "--workdir", str(copy), *flags]) == 2
    assert message in one_error_line(capsys)
    assert not (copy / "analysis").exists()


def test_analyze_does_not_write_through_a_symlinked_folder(run, tmp_path, capsys):
    copy = analysed_copy(run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (copy / "analysis").symlink_to(elsewhere)
    assert main(["analyze", "--workdir", str(copy)]) == 2
    assert "symbolic link" in one_error_line(capsys)
    assert list(elsewhere.iterdir()) == []


def test_analyze_overwrites_its_own_outputs_but_not_others_without_force(run, tmp_path, capsys):
    copy = analysed_copy(run, tmp_path)
    outdir = copy / "analysis"
    outdir.mkdir()
    (outdir / "report.md").write_text("my notes")  # not analyze's
    (outdir / "notes.txt").write_text("mine too")  # a name analyze never writes
    assert main(["analyze", "--workdir", str(copy)]) == 2
    line = one_error_line(capsys)
    assert "report.md" in line and "--force" in line
    assert sorted(p.name for p in outdir.iterdir()) == ["notes.txt", "report.md"]
    assert (outdir / "report.md").read_text() == "my notes"

    assert main(["analyze", "--workdir", str(copy), "--force"]) == 0
    assert all((outdir / name).is_file() for name in OUTPUTS) and (outdir / "notes.txt").read_text() == "mine too"
    first = (outdir / "wrong_grid.png").read_bytes()
    assert main(["analyze", "--workdir", str(copy), "--seed", "5"]) == 0  # its own outputs: no --force needed
    assert (outdir / "wrong_grid.png").read_bytes() != first  # another sample of wrong predictions
    assert not [p for p in outdir.iterdir() if ".tmp" in p.name]
    capsys.readouterr()


ANALYZE_WITH_A_FULL_DISK = """
import resource, sys
from mnist_jax.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))  # files stop growing: a full disk
sys.exit(main(["analyze", "--workdir", sys.argv[1], "--seed", "7"]))
"""


@pytest.mark.slow  # a whole process: make test-slow
def test_analyze_with_a_full_disk_is_one_line_and_leaves_no_partial_file(run, tmp_path):
    copy = analysed_copy(run, tmp_path)
    assert main(["analyze", "--workdir", str(copy)]) == 0
    outdir = copy / "analysis"
    before = {p.name: p.read_bytes() for p in outdir.iterdir()}
    limit = os.path.getsize(outdir / "predictions.npz") // 2  # no room for predictions.npz (10,000 x 10 probabilities)
    result = subprocess.run([sys.executable, "-c", ANALYZE_WITH_A_FULL_DISK, str(copy), str(limit)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "disk full" in lines[0], result.stderr[-3000:]
    after = {p.name: p.read_bytes() for p in outdir.iterdir()}
    assert set(after) == set(before)  # no temp file left
    with np.load(outdir / "predictions.npz") as saved:  # whole, as before
        assert saved["predicted"].shape == (10000,)
    assert after["predictions.npz"] == before["predictions.npz"]
    assert main(["analyze", "--workdir", str(copy)]) == 0  # the interrupted analyze's files are still its own
