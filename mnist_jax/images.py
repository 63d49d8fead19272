"""Turn a user's image file into an MNIST-style input: 28x28, light digit on dark, in [0, 1].

MNIST's own recipe (LeCun et al.): the digit's bounding box is scaled, keeping
its aspect ratio, to fit a 20x20 box (anti-aliased, hence grey levels), then
placed in a 28x28 field so that its centre of mass sits at the centre. On the
real test set that centre of mass is at pixel (14.0, 14.0), so that is the
target here. Fashion-MNIST instead fits the item to the whole 28x28 field and
centres its bounding box (`box=28, center="box"`).

    from mnist_jax.images import read_image
    x = read_image("my_digit.png")          # float32[28, 28, 1]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_jax.config import UserError

SIZE = 28
DIGIT_BOX = 20
# Where MNIST test digits have their centre of mass, in pixel-index coordinates.
MNIST_CENTER = (14.0, 14.0)
# The most pixels `load_image` decodes (a 48-megapixel photo fits): the size is read from the file's
# header first, so a small file that claims a huge image is refused before any memory goes to it.
MAX_PIXELS = 64 * 2**20
# ITU-R 601 luma, what Pillow's convert("L") uses.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class ImageError(UserError):
    """A file that cannot be read as an image, or an image with no digit in it."""


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file (PNG, JPEG, anything Pillow reads) as grayscale float32[H, W] in [0, 1].

    Transparent pixels are composited over white, as an image viewer shows them.
    Raises ImageError naming the file for a missing, empty, corrupt or non-image file, and for one of
    more than MAX_PIXELS pixels (found from its header, before decoding).
    """
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        with warnings.catch_warnings():  # Pillow's own bomb warning: the lower cap below names the size instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{path}: image too large ({width}x{height} pixels; at most {MAX_PIXELS} are read)")
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            mode = image.mode
            # 16/32-bit grayscale would lose its depth in "L": read those as floats.
            gray = image.convert("F") if mode.startswith("I") or mode == "F" else image.convert("L")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: image too large ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or malformed data
        raise ImageError(f"{path}: cannot decode image ({err})") from None
    array = np.asarray(gray, np.float32)
    if gray.mode == "L":
        return array / np.float32(255.0)
    if mode.startswith("I;16"):
        return array / np.float32(65535.0)
    # Mode "I" (Pillow also opens some 16-bit PNGs so) or "F": no fixed range, so its own.
    top = 1.0 if mode == "F" and array.max() <= 1.0 else (65535.0 if array.max() > 255 else 255.0)
    return np.clip(array / np.float32(top), 0.0, 1.0)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Any image array as float32[H, W] in [0, 1].

    Accepts [H, W], [H, W, 1], RGB [H, W, 3] or RGBA [H, W, 4] (alpha composited
    over white); integer arrays are scaled by their dtype's maximum, float
    arrays are taken as already in [0, 1].
    """
    array = np.asarray(image)
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    else:
        array = np.clip(array.astype(np.float32), 0.0, 1.0)
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # gray+alpha or RGBA
        color, alpha = array[..., :-1], array[..., -1:]
        array = color * alpha + (1.0 - alpha)
    if array.ndim == 3 and array.shape[-1] == 3:
        array = array @ LUMA
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or min(array.shape) == 0:
        raise ValueError(f"expected an image [H, W] or [H, W, C] with C in 1..4, got shape {np.shape(image)}")
    return array


def _border(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


def center_of_mass(array: np.ndarray) -> tuple[float, float]:
    """The intensity-weighted centre (row, column) of a 2-D array, in pixel-index coordinates."""
    total = float(array.sum())
    if total <= 0:
        return ((array.shape[0] - 1) / 2, (array.shape[1] - 1) / 2)
    rows, cols = np.indices(array.shape, dtype=np.float64)
    return float((rows * array).sum() / total), float((cols * array).sum() / total)


def preprocess_image(
    image: np.ndarray,
    *,
    box: int = DIGIT_BOX,
    center: str = "mass",
    threshold: float = 0.2,
) -> np.ndarray:
    """An image of a digit, any size and colour, as MNIST's float32[28, 28, 1] in [0, 1].

    1. grayscale; invert when the background (the median of the border pixels)
       is light, since MNIST digits are light on dark;
    2. subtract the background level and stretch the digit's peak to 1;
    3. crop to the digit's bounding box (pixels at least `threshold`, so paper
       texture and JPEG ringing do not widen it) and scale it, aspect ratio
       kept, to fit a `box` x `box` square;
    4. paste it into 28x28 with its centre of mass at MNIST's centre
       (`center="mass"`), or its box centred (`center="box"`).

    Raises ImageError when nothing stands out from the background.
    """
    if center not in ("mass", "box"):
        raise ValueError(f"center must be 'mass' or 'box', got {center!r}")
    if not 1 <= box <= SIZE:
        raise ValueError(f"box must be in 1..{SIZE}, got {box}")
    gray = to_grayscale(image)
    background = float(np.median(_border(gray)))
    if background > 0.5:
        gray, background = 1.0 - gray, 1.0 - background
    digit = np.clip(gray - background, 0.0, None)
    peak = float(digit.max())
    if peak < 0.05:  # under ~13 grey levels of contrast: a blank page, not a faint digit
        raise ImageError("no digit found: the image is blank")
    digit = digit / peak
    # Only the bounding box uses the threshold: zeroing the faint pixels would
    # erase the anti-aliased edges that MNIST digits have.
    mask = digit >= threshold
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    digit = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    scale = box / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        # Pillow's resampling widens its kernel when shrinking, so a large image
        # is area-averaged (anti-aliased) rather than point-sampled.
        resized = Image.fromarray(digit.astype(np.float32)).resize((new_w, new_h), Image.Resampling.LANCZOS)
        digit = np.clip(np.asarray(resized, np.float32), 0.0, 1.0)
        digit = digit / max(float(digit.max()), 1e-6)  # MNIST digits peak at 1

    if center == "mass":
        cy, cx = center_of_mass(digit)
        top, left = round(MNIST_CENTER[0] - cy), round(MNIST_CENTER[1] - cx)
    else:
        top, left = (SIZE - new_h) // 2, (SIZE - new_w) // 2
    # Keep the whole digit in the field even when its mass is far off-centre.
    top, left = min(max(top, 0), SIZE - new_h), min(max(left, 0), SIZE - new_w)
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top : top + new_h, left : left + new_w] = digit
    return out[..., None]


def read_image(path: str | Path, **options) -> np.ndarray:
    """`preprocess_image(load_image(path))`: float32[28, 28, 1]; ImageError names the file on failure."""
    gray = load_image(path)
    try:
        return preprocess_image(gray, **options)
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from None


def format_prediction(name: str | Path, probabilities: np.ndarray, class_names: Sequence[str], top: int = 3) -> str:
    """One line: `name: 7 (98.2%)  top 3: 7 98.2%, 9 1.1%, 2 0.4%`."""
    probabilities = np.asarray(probabilities)
    order = np.argsort(-probabilities, kind="stable")[:top]
    best = int(order[0])
    ranked = ", ".join(f"{class_names[i]} {probabilities[i]:.1%}" for i in order)
    return f"{name}: {class_names[best]} ({probabilities[best]:.1%})  top {len(order)}: {ranked}"
