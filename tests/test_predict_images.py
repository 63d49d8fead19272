"""mnist_jax.images and `predict`: user image files (any size, colour, polarity) to MNIST inputs."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnist_jax import Config, analysis, fit
from mnist_jax.cli import main
from mnist_jax.data import CLASS_NAMES
from mnist_jax.images import (
    ImageError,
    center_of_mass,
    format_prediction,
    load_image,
    preprocess_image,
    read_image,
    to_grayscale,
)

LINE = re.compile(r"^(?P<path>.+): (?P<digit>\d) \((?P<p>[\d.]+)%\)  top 3: (?P<top>.+)$")


@pytest.fixture(scope="module")
def model(tmp_path_factory, mnist_dirs):
    """(workdir, state) of one epoch on 2,000 images: ~92% test accuracy in a few seconds of training."""
    workdir = tmp_path_factory.mktemp("predict") / "run"
    state, _ = fit(Config(epochs=1, train_examples=2000, workdir=str(workdir), **mnist_dirs), verbose=False)
    return workdir, state


def u8(image: np.ndarray) -> np.ndarray:
    return (np.asarray(image).squeeze() * 255).round().astype(np.uint8)


def draw_digit(digit: str, size: int = 200, ink=0, paper=255, mode: str = "L") -> Image.Image:
    """A thick-stroked 0, 1 or 7 drawn with Pillow, `ink` on `paper`."""
    image = Image.new(mode, (size, size), paper)
    pen = ImageDraw.Draw(image)
    s = size / 200
    width = round(16 * s)
    if digit == "1":
        pen.line([(100 * s, 25 * s), (100 * s, 175 * s)], fill=ink, width=width)
    elif digit == "7":
        pen.line([(45 * s, 30 * s), (155 * s, 30 * s), (85 * s, 175 * s)], fill=ink, width=width)
    elif digit == "0":
        pen.ellipse([55 * s, 20 * s, 145 * s, 180 * s], outline=ink, width=width)
    return image


def assert_mnist_like(x: np.ndarray) -> None:
    """28x28x1 in [0, 1], dark background, digit inside a 20x20 box, centre of mass near MNIST's (14, 14)."""
    assert x.shape == (28, 28, 1) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() == pytest.approx(1.0)
    plane = x[..., 0]
    assert plane[[0, 0, -1, -1], [0, -1, 0, -1]].max() == 0 and np.mean(plane == 0) > 0.5  # background is 0
    rows, cols = np.flatnonzero(plane.any(1)), np.flatnonzero(plane.any(0))
    assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) <= 21  # 20, +1 for resampling spill
    cy, cx = center_of_mass(plane)
    assert abs(cy - 14) <= 0.75 and abs(cx - 14) <= 0.75


# --- preprocessing -----------------------------------------------------------


def test_dark_on_light_200px_drawing_is_inverted_and_fitted(model):
    _, state = model
    inputs = {}
    for digit in "017":
        x = preprocess_image(np.asarray(draw_digit(digit)))
        assert_mnist_like(x)
        assert x.mean() < 0.3  # light digit on dark: inverted
        inputs[digit] = x
    rows = np.flatnonzero(inputs["1"][..., 0].any(1))
    assert rows[-1] - rows[0] + 1 in (20, 21)  # the tall stroke is scaled to the 20-pixel box
    predicted = analysis.predict_labels(state, np.stack(list(inputs.values())))
    assert predicted.tolist() == [0, 1, 7]


def test_light_on_dark_28px_mnist_digit_is_nearly_unchanged(mnist_small, tmp_path):
    images = mnist_small[1]["image"][:50]
    diffs = []
    for i, image in enumerate(images):
        path = tmp_path / f"{i}.png"
        Image.fromarray(u8(image)).save(path)
        x = read_image(path)
        assert_mnist_like(x)
        diffs.append(np.abs(x - image).mean())
    # MNIST digits already fill 20x20 centred by mass: most come back as they were (up to a peak of
    # 254/255 stretched to 1); a few whose faint edge widens their box are rescaled or moved a pixel.
    assert np.mean(np.array(diffs) < 0.002) >= 0.9 and max(diffs) < 0.1


def test_rgb_and_transparent_files_match_their_grayscale_version(tmp_path):
    gray = preprocess_image(np.asarray(draw_digit("7")))
    rgb = draw_digit("7", ink=(20, 30, 140), paper=(250, 235, 190), mode="RGB")  # navy on cream
    rgb.save(tmp_path / "seven.png")
    rgb.save(tmp_path / "seven.jpg", quality=90)
    transparent = draw_digit("7", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0), mode="RGBA")  # black on nothing
    transparent.save(tmp_path / "seven_alpha.png")
    for name, tolerance in (("seven.png", 0.02), ("seven.jpg", 0.04), ("seven_alpha.png", 0.01)):
        x = read_image(tmp_path / name)
        assert_mnist_like(x)
        assert np.abs(x - gray).mean() < tolerance, name
    assert load_image(tmp_path / "seven.png").ndim == 2


def test_to_grayscale_accepts_common_array_layouts():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: white
    np.testing.assert_allclose(to_grayscale(rgba), 1.0)
    np.testing.assert_allclose(to_grayscale(np.full((3, 3), 65535, np.uint16)), 1.0)
    np.testing.assert_allclose(to_grayscale(np.full((3, 3, 3), [255, 0, 0], np.uint8)), 0.299, rtol=1e-5)
    with pytest.raises(ValueError):
        to_grayscale(np.zeros((2, 2, 5)))


def test_blank_and_unreadable_files_raise_one_line_errors(tmp_path):
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    (tmp_path / "notes.jpg").write_text("not an image at all\n")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {
        "blank.png": "blank", "corrupt.png": "cannot decode", "notes.jpg": "not an image",
        "empty.png": "empty", "missing.png": "no such file", ".": "directory",
    }  # fmt: skip
    for name, words in cases.items():
        path = tmp_path / name
        with pytest.raises(ImageError, match=words) as info:
            read_image(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_format_prediction_lists_top_classes():
    probs = np.array([0.05, 0.6, 0.0, 0.3, 0.05, 0, 0, 0, 0, 0])
    line = format_prediction("x.png", probs, CLASS_NAMES["fashion_mnist"])
    assert line == "x.png: Trouser (60.0%)  top 3: Trouser 60.0%, Dress 30.0%, T-shirt/top 5.0%"


# --- the round trip: MNIST test digits as user files --------------------------


def test_mnist_digits_saved_as_large_inverted_pngs_are_read_back(model, mnist_small, tmp_path):
    """Each test digit upscaled (56 to 300 px, some on a wider page), inverted to dark on light, saved as
    PNG, then read back: predicted as the array is, with the model's accuracy on the arrays."""
    _, state = model
    images, labels = mnist_small[1]["image"][:200], mnist_small[1]["label"][:200]
    sizes = (56, 100, 200, 300)
    read = []
    for i, image in enumerate(images):
        size = sizes[i % len(sizes)]
        page = Image.fromarray(255 - u8(image)).resize((size, size), Image.Resampling.BICUBIC)
        if i % 3 == 0:  # off-centre on a wider sheet: the crop and centring must find it
            sheet = Image.new("L", (size * 2, size + 40), 255)
            sheet.paste(page, (size // 3, 10))
            page = sheet
        path = tmp_path / f"digit{i}.png"
        page.save(path)
        read.append(read_image(path))
    original = analysis.predict_probabilities(state, images)
    from_files = analysis.predict_probabilities(state, np.stack(read))
    same = original.argmax(-1) == from_files.argmax(-1)
    accuracy_arrays = np.mean(original.argmax(-1) == labels)
    accuracy_files = np.mean(from_files.argmax(-1) == labels)
    assert accuracy_arrays > 0.85
    assert same.mean() >= 0.95
    assert accuracy_files >= accuracy_arrays - 0.03
    confident = original.max(-1) > 0.9  # a digit the model is sure of keeps its prediction
    assert same[confident].mean() >= 0.98
    assert same[0]  # the first test digit in particular


# --- the CLI -----------------------------------------------------------------


def test_predict_cli_reports_each_file_and_fails_only_the_bad_ones(model, mnist_small, tmp_path, capsys):
    workdir, state = model
    digit = mnist_small[1]["image"][1]
    expected = int(analysis.predict_labels(state, digit[None])[0])
    Image.fromarray(255 - u8(digit)).resize((280, 280), Image.Resampling.BICUBIC).save(tmp_path / "mnist.png")
    draw_digit("1", ink=(200, 0, 0), paper=(255, 255, 255), mode="RGB").save(tmp_path / "one.jpg")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 5)
    (tmp_path / "empty.jpg").write_bytes(b"")
    files = ["mnist.png", "corrupt.png", "one.jpg", "empty.jpg", "missing.png"]
    code = main(["predict", "--workdir", str(workdir), *(str(tmp_path / f) for f in files)])
    captured = capsys.readouterr()
    assert code == 1  # the promised exit code when some files could not be read
    lines = captured.out.splitlines()
    assert len(lines) == 2
    results = [LINE.match(line).groupdict() for line in lines]
    assert [r["path"] for r in results] == [str(tmp_path / "mnist.png"), str(tmp_path / "one.jpg")]
    assert [int(r["digit"]) for r in results] == [expected, 1]
    for r in results:
        top = [(name, float(p)) for name, p in re.findall(r"(\d) ([\d.]+)%", r["top"])]
        assert len(top) == 3 and top[0] == (r["digit"], float(r["p"]))
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    errors = captured.err.splitlines()
    assert len(errors) == 3
    for name, error in zip(("corrupt.png", "empty.jpg", "missing.png"), errors):
        assert error.startswith("mnist_jax: error: ") and str(tmp_path / name) in error


def test_predict_cli_all_good_exits_zero(model, tmp_path, capsys):
    workdir, _ = model
    draw_digit("0").save(tmp_path / "zero.png")
    assert main(["predict", "--workdir", str(workdir), str(tmp_path / "zero.png")]) == 0
    assert LINE.match(capsys.readouterr().out.strip()).group("digit") == "0"


def test_predict_cli_bad_workdir_is_one_line_and_exit_2(tmp_path, capsys):
    draw_digit("0").save(tmp_path / "zero.png")
    assert main(["predict", "--workdir", str(tmp_path / "nowhere"), str(tmp_path / "zero.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("mnist_jax: error: "), captured.err


# --- fuzzed files: each bad one is its own line, the good ones are still predicted ---------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def huge_png(width: int, height: int) -> bytes:
    """A blank 1-bit grayscale PNG of width x height, written without holding its pixels: tens of KiB."""
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    row, deflate = bytes(1 + (width + 7) // 8), zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def malformed_images(folder: Path) -> list[Path]:
    """Files a user may pass by mistake, or that a copy cut short: each must be reported in one line."""
    good = io.BytesIO()
    draw_digit("7").save(good, format="PNG")
    png = good.getvalue()
    jpeg = io.BytesIO()
    draw_digit("7", mode="RGB").save(jpeg, format="JPEG")
    idat = png.find(b"IDAT") + 20
    files = {
        "empty.png": b"",
        "random.png": np.random.default_rng(1).bytes(3000),
        "text.jpg": b"hello, not an image\n",
        "signature-only.png": png[:8],
        "flipped-pixels.png": png[:idat] + bytes(255 - b for b in png[idat : idat + 8]) + png[idat + 8 :],
        "bad-header-crc.png": png[:29] + bytes(255 - b for b in png[29:33]) + png[33:],
        "zero-width.png": png[:16] + bytes(4) + png[20:],
        "huge.png": huge_png(13000, 13000),  # 169 million pixels in ~30 KiB
        "wide.png": huge_png(200_000, 2),
        "gif-junk.gif": b"GIF89a" + bytes(20),
        "array.npy": b"\x93NUMPY" + bytes(100),
        "blank.png": None,
    }
    for cut in (0.1, 0.5, 0.9):
        files[f"cut-{cut}.png"] = png[: int(len(png) * cut)]
        files[f"cut-{cut}.jpg"] = jpeg.getvalue()[: int(len(jpeg.getvalue()) * cut)]
    paths = []
    for name, content in files.items():
        path = folder / name
        if content is None:
            Image.new("L", (40, 40), 255).save(path)
        else:
            path.write_bytes(content)
        paths.append(path)
    (folder / "a-folder.png").mkdir()
    return [*paths, folder / "a-folder.png", folder / "missing.png"]


def test_predict_reports_each_malformed_file_in_one_line(model, tmp_path):
    """In a real process (so that any warning or traceback would show): exit 1, the good file predicted,
    and one `mnist_jax: error: FILE: ...` line per bad file, in order."""
    workdir, _ = model
    bad = malformed_images(tmp_path)
    draw_digit("1").save(tmp_path / "good.png")
    args = [str(tmp_path / "good.png"), *map(str, bad)]
    result = subprocess.run(
        [sys.executable, "-m", "mnist_jax", "predict", "--workdir", str(workdir), *args],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert [LINE.match(line).group("path") for line in result.stdout.splitlines()] == [str(tmp_path / "good.png")]
    errors = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and len(errors) == len(bad), result.stderr[-3000:]
    for path, error in zip(bad, errors):
        assert error.startswith(f"mnist_jax: error: {path}: "), (path, error)
    too_large = errors[[p.name for p in bad].index("huge.png")]
    assert "13000x13000" in too_large, too_large


def test_evaluate_refuses_labels_out_of_range(model, mnist_small, tmp_path, capfd):
    """The real test images with one label of -3: `evaluate --arrays` once printed `Test Loss : nan`, exit 0."""
    workdir, _ = model
    test = mnist_small[1]
    labels = test["label"].copy()
    labels[7] = -3
    path = tmp_path / "test.npz"
    np.savez(path, dataset=np.array("mnist"), test_image=(test["image"] * 255).round().astype(np.uint8), test_label=labels)
    code = main(["evaluate", "--workdir", str(workdir), "--arrays", str(path)])
    out, err = capfd.readouterr()
    assert code == 2 and out == "", out
    assert err.count("\n") == 1 and err.startswith(f"mnist_jax: error: {path}: test_label holds -3 (example 7"), err
