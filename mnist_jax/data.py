"""MNIST-style data through tensorflow-datasets, prepared offline from a manual dir.

Two ways to feed the steps, both from tfds:
- `load_split` returns a whole split as numpy arrays; `fit` places them on the
  device once and gathers every batch inside the compiled step (fast path).
- `tf_batches` is a tf.data pipeline (batch, prefetch) over the same arrays and
  the same per-epoch order, for data that should stay on the host.
Neither holds a second copy of the data set per epoch: an epoch is a permutation
of indices.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import socket
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mnist_jax.config import DATASETS, HostError, UserError
from mnist_jax.files import atomic_write

MANUAL_DIR_ENV = "MNIST_JAX_MANUAL_DIR"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}  # fmt: skip

# Sizes of the decompressed IDX files (the same for MNIST and Fashion-MNIST): a header of 16 bytes
# (images) or 8 (labels), then one byte per pixel or label. No archive may decompress to more.
CONTENT_SIZES = {
    "train-images-idx3-ubyte.gz": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte.gz": 8 + 60000,
    "t10k-images-idx3-ubyte.gz": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte.gz": 8 + 10000,
}

# SHA-256 of the *decompressed* IDX files. Debian's dataset-fashion-mnist
# recompressed the original archives, so their .gz bytes miss tfds's registered
# checksums while the data inside is the same: such a file is accepted when its
# content hashes to the value here, and rejected otherwise.
CONTENT_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}


# Order-free fingerprints of the real splits, (examples, sum of all uint8 pixel values), computed from
# the original IDX files. A tfds data_dir (or an .npz) whose data is another data set under this name is
# refused, instead of silently training on the wrong images.
SPLIT_FINGERPRINTS = {
    "mnist": {"train": (60000, 1567298545), "test": (10000, 264923200)},
    "fashion_mnist": {"train": (60000, 3431114169), "test": (10000, 573469082)},
}


IMAGE_SHAPE = (28, 28, 1)  # one example, as tfds stores it (uint8)


def check_split(
    images: np.ndarray, labels: np.ndarray, dataset: str, where: str, *, names: tuple[str, str] = ("image", "label")
) -> None:
    """Raise UserError, one line starting with `where`, unless `images` are uint8 [N, 28, 28, 1] (so every
    pixel is in 0..255) and `labels` are N integers in 0..classes-1 for `dataset`. `names` name the two
    arrays in the message. Vectorised: one pass over the labels, none over the images."""
    image_name, label_name = names
    classes = len(CLASS_NAMES[dataset])
    if images.dtype != np.uint8:
        raise UserError(f"{where}: {image_name} must be uint8 (pixels 0..255, as `export` writes them), got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise UserError(f"{where}: {image_name} must have shape (N, 28, 28, 1), got {images.shape}")
    if labels.ndim != 1:
        raise UserError(f"{where}: {label_name} must be one label per image, shape (N,), got {labels.shape}")
    if len(labels) != len(images):
        raise UserError(f"{where}: {len(images)} images and {len(labels)} labels ({image_name}, {label_name})")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where}: {label_name} must hold integers, got {labels.dtype}")
    outside = (labels < 0) | (labels >= classes)
    if outside.any():
        first = int(np.argmax(outside))
        raise UserError(
            f"{where}: {label_name} holds {labels[first]} (example {first}, {int(outside.sum())} such in all); "
            f"{dataset}'s labels are 0..{classes - 1}"
        )


def check_fingerprint(images: np.ndarray, dataset: str, split: str, where: str) -> None:
    """Raise UserError unless uint8 `images` are the whole real `split` of `dataset`."""
    got = (len(images), int(images.sum(dtype=np.int64)))
    if got != SPLIT_FINGERPRINTS[dataset][split]:
        raise UserError(
            f"{where} does not hold the real {dataset} {split} split (examples and pixel sum {got}, "
            f"expected {SPLIT_FINGERPRINTS[dataset][split]}): delete it and prepare {dataset} again from its original files"
        )


def import_tf():
    """Import TensorFlow for data only: hide every GPU from it so it never takes accelerator memory."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF only reads and batches data here; this also silences its banner
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def resolve_manual_dir(manual_dir: str | None) -> Path | None:
    """The `--manual-dir` flag, else $MNIST_JAX_MANUAL_DIR, else None."""
    chosen = manual_dir or os.environ.get(MANUAL_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gunzip_sha256(path: Path, limit: int) -> str:
    """SHA-256 of a gzip file's content, decompressed a chunk at a time; UserError past `limit` bytes."""
    digest, total = hashlib.sha256(), 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise UserError(f"{path} decompresses to more than {limit} bytes, the size of the data it should hold")
            digest.update(chunk)
    return digest.hexdigest()


def missing_data_message(dataset: str, manual_dir: Path | None) -> str:
    where = f"in {manual_dir}" if manual_dir else f"in a folder passed as --manual-dir or ${MANUAL_DIR_ENV}"
    return f"{dataset} is not prepared and cannot be downloaded here: put {', '.join(FILES)} {where}"


def check_manual_files(
    dataset: str,
    manual_dir: Path,
    registered: dict[str, tuple[int, str]],
    content_sha256: dict[str, str] | None = None,
) -> dict[str, tuple[int, str]]:
    """Check the four archives in `manual_dir` against tfds's registered (size, sha256).

    Returns the (size, sha256) of files that miss the registered checksum but
    whose decompressed content is known to be the data set's (recompressed
    copies); tfds must accept those. Files that match need nothing. Raises
    UserError for a missing or unknown file, HostError for an unreadable one.

    Memory stays bounded whatever the files hold: archives are hashed and decompressed a chunk at a
    time, and one that decompresses to more than its known `CONTENT_SIZES` (a gzip bomb), or is
    larger than any compression of that much data, is refused as soon as that shows.
    """
    content_sha256 = CONTENT_SHA256[dataset] if content_sha256 is None else content_sha256
    missing = [name for name in FILES if not (manual_dir / name).is_file()]
    if missing:
        raise UserError(f"{manual_dir} lacks {', '.join(missing)} (a manual dir needs all four of {', '.join(FILES)})")
    recompressed = {}
    for name in FILES:
        path, limit = manual_dir / name, CONTENT_SIZES[name]
        try:
            size = path.stat().st_size
            if size == registered[name][0] and _file_sha256(path) == registered[name][1]:
                continue
            if size > limit + limit // 1000 + 1024:  # deflate's worst case (stored blocks) adds ~0.01 %
                raise UserError(f"{path} is {size} bytes, more than any gzip of {dataset}'s {name}")
            content = _gunzip_sha256(path, limit)
            actual = (size, _file_sha256(path))
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise UserError(f"{path} is not a valid gzip file ({err})") from None
        except OSError as err:
            raise HostError(f"cannot read {path}: {err.strerror or err}") from None
        if content != content_sha256[name]:
            raise UserError(f"{path} has the wrong checksum and is not {dataset}'s {name}")
        recompressed[name] = actual
    return recompressed


def check_data_dir(root: Path) -> None:
    """Make sure tfds can write under `root` (a data_dir), before it prepares anything there: UserError if
    it is not a folder, HostError if the machine refuses (permissions, a read-only or full disk)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"data dir {root} is not a folder (or lies under a file): pass a folder as --data-dir") from None
    except OSError as err:
        raise HostError(f"cannot write the data dir {root}: {err.strerror or err}") from None


@contextlib.contextmanager
def _accept_recompressed(builder_cls, recompressed: dict[str, tuple[int, str]]):
    """Temporarily register the checksums of content-verified recompressed files."""
    from tensorflow_datasets.core.download import checksums

    url_infos = builder_cls.url_infos  # memoised dict that tfds hands its DownloadManager
    saved = dict(url_infos)
    for url, info in saved.items():
        if info.filename in recompressed:
            size, digest = recompressed[info.filename]
            url_infos[url] = checksums.UrlInfo(size=size, checksum=digest, filename=info.filename)
    try:
        yield
    finally:
        url_infos.clear()
        url_infos.update(saved)


def _can_reach(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def prepare(dataset: str, *, data_dir: str | None = None, manual_dir: str | None = None):
    """Return a prepared tfds builder, preparing it from a manual dir (or the network) first if needed."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    import_tf()
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, data_dir=data_dir, try_gcs=False)
    if builder.is_prepared():
        return builder
    manual = resolve_manual_dir(manual_dir)
    registered = {info.filename: (info.size, info.checksum) for info in type(builder).url_infos.values()}
    root = Path(builder.data_dir).parents[1]  # builder.data_dir is <root>/<dataset>/<version>
    if manual is not None:
        recompressed = check_manual_files(dataset, manual, registered)
        check_data_dir(root)
        config = tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False)
        # tfds extracts manual files to <download_dir>/extracted/GZIP.<file name>, and MNIST and
        # Fashion-MNIST share file names: a download dir per data set keeps one from reusing the other's.
        download_dir = root / "downloads" / f"manual-{dataset}"
        with _accept_recompressed(type(builder), recompressed):
            try:
                builder.download_and_prepare(download_dir=str(download_dir), download_config=config)
            except OSError as err:  # e.g. the disk filled up: tfds leaves only its incomplete.* folder
                raise HostError(f"preparing {dataset} in {root} failed: {err.strerror or err}") from None
        return builder
    # Fail in seconds rather than hang on network probes when offline.
    host = next(iter(type(builder).url_infos)).split("/")[2]
    if not _can_reach(host):
        raise UserError(missing_data_message(dataset, None))
    check_data_dir(root)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def load_split(
    dataset: str = "mnist",
    split: str = "train",
    *,
    num_examples: int | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    arrays: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """A whole split as arrays: {"image": float32[N, 28, 28, 1] in [0, 1], "label": int32[N]}.

    `num_examples` keeps only the first N examples of the split. With `arrays` (an .npz written by
    `export_arrays`), the split is read from that file and TensorFlow is never imported. Whichever the
    source, what it gives is checked (`check_split`: shapes, dtypes, labels in range) before it is
    returned, and a whole split against its fingerprint; UserError in one line otherwise.
    """
    if arrays is not None:
        raw = _npz_split(Path(arrays), dataset, split)
        check_fingerprint(raw["image"], dataset, split, str(arrays))
        _check_available(num_examples, len(raw["label"]), dataset, split)
        raw = {k: v[:num_examples] for k, v in raw.items()}
    else:
        raw = _tfds_split(dataset, split, data_dir, manual_dir, num_examples)
    return {"image": raw["image"].astype(np.float32) / np.float32(255.0), "label": raw["label"].astype(np.int32)}


def _check_available(num_examples: int | None, available: int, dataset: str, split: str) -> None:
    if num_examples is not None and num_examples > available:
        raise UserError(f"asked for {num_examples} {split} examples, {dataset} has {available}")


def _tfds_split(
    dataset: str, split: str, data_dir: str | None, manual_dir: str | None, num_examples: int | None = None
) -> dict[str, np.ndarray]:
    """The first `num_examples` (all: None) of a split as tfds stores them: uint8 images [N, 28, 28, 1], int64 labels."""
    import tensorflow_datasets as tfds

    builder = prepare(dataset, data_dir=data_dir, manual_dir=manual_dir)
    _check_available(num_examples, builder.info.splits[split].num_examples, dataset, split)
    if num_examples is not None:  # a slice cannot be fingerprinted: check the (small) test split instead, once
        _check_prepared(dataset, str(builder.data_dir))
    split_spec = split if num_examples is None else f"{split}[:{num_examples}]"
    arrays = _read_whole(builder, split_spec, dataset)
    check_split(arrays["image"], arrays["label"], dataset, f"tfds's {split_spec} split in {builder.data_dir}")
    if num_examples is None:
        check_fingerprint(arrays["image"], dataset, split, f"tfds's prepared {builder.data_dir}")
    return {"image": arrays["image"], "label": arrays["label"]}


@functools.lru_cache(maxsize=None)  # a memo of folders already checked, not state: the answer never changes
def _check_prepared(dataset: str, builder_dir: str) -> None:
    import tensorflow_datasets as tfds

    test = _read_whole(tfds.builder_from_directory(builder_dir), "test", dataset)
    check_fingerprint(test["image"], dataset, "test", f"tfds's prepared {builder_dir}")


def _read_whole(builder, split_spec: str, dataset: str) -> dict[str, np.ndarray]:
    """A prepared split (or slice) read whole as numpy; UserError in one line if its records are damaged on disk."""
    import tensorflow_datasets as tfds

    tf = import_tf()
    try:
        with _native_stderr_held():  # TensorFlow's C++ log lines about the failure, on top of the one below
            return tfds.as_numpy(builder.as_dataset(split=split_spec, batch_size=-1, shuffle_files=False))
    except tf.errors.OpError as err:  # DataLossError: a corrupt record (its CRC fails), a cut file, ...
        raise UserError(
            f"tfds's prepared {builder.data_dir} is damaged ({type(err).__name__} reading {split_spec}): "
            f"delete it and prepare {dataset} again from its original files"
        ) from None


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[None]:
    """Hold what native code writes to file descriptor 2 meanwhile (C++ logging that no Python setting
    reaches once jax is imported): written out when the block succeeds, dropped when it raises, whose
    own one-line error then stands alone."""
    sys.stderr.flush()
    saved, held, ok = os.dup(2), tempfile.TemporaryFile(), False
    try:
        os.dup2(held.fileno(), 2)
        yield
        ok = True
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if ok:
            held.seek(0)
            os.write(2, held.read())
        held.close()


ZIP_MAGIC, NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"


def _npz_split(path: Path, dataset: str, split: str) -> dict[str, np.ndarray]:
    """One split of an `export_arrays` .npz, checked before and after reading: its members' headers first
    (so a member claiming another shape is never read), then `check_split`. UserError in one line."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as err:
        raise UserError(f"cannot read arrays file {path}: {err.strerror or err}") from None
    export = "write it with `python -m mnist_jax export --out FILE.npz`"
    if not magic:
        raise UserError(f"arrays file {path} is empty (an interrupted copy?): {export}")
    if magic.startswith(NPY_MAGIC):
        raise UserError(f"arrays file {path} is one array (.npy), not the .npz of both splits: {export}")
    if not magic.startswith(ZIP_MAGIC):
        raise UserError(f"cannot read arrays file {path}: not an .npz (zip) file; {export}")
    names = (f"{split}_image", f"{split}_label")
    expected = SPLIT_FINGERPRINTS[dataset][split][0]
    try:
        with np.load(path) as npz:
            missing = [name for name in ("dataset", *names) if name not in npz.files]
            if missing:
                raise UserError(f"arrays file {path} lacks {', '.join(missing)}: {export}")
            if str(npz["dataset"]) != dataset:
                raise UserError(f"{path} holds {npz['dataset']}, not {dataset}")
            for name, shape in zip(names, ((expected, *IMAGE_SHAPE), (expected,))):
                _check_member_header(npz.zip, name, shape, path)
            raw = {"image": npz[names[0]], "label": npz[names[1]]}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
        # np.load finds a cut-off zip; the members' CRC-32 (or inflate) finds changed bytes.
        damaged = isinstance(err, zlib.error) or "CRC" in str(err)
        raise UserError(f"cannot read arrays file {path}{': it is damaged' if damaged else ''} ({err}); {export}") from None
    check_split(raw["image"], raw["label"], dataset, str(path), names=names)
    return raw


def _check_member_header(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], path: Path) -> None:
    """UserError unless the .npz member `name`'s .npy header promises `shape` (uint8 images, integer labels)."""
    with archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise UserError(f"{path}: {name} is written in .npy format {version}, not one `export` writes")
        got, _, dtype = read_header(member)
    is_image = len(shape) > 1
    right_dtype = dtype == np.uint8 if is_image else np.issubdtype(dtype, np.integer)
    if not right_dtype:
        raise UserError(f"{path}: {name} must be {'uint8' if is_image else 'integer'} (as `export` writes it), got {dtype}")
    if got != shape:
        raise UserError(f"{path}: {name} must have shape {shape} (the whole split), got {got}")


def export_arrays(
    path: str | os.PathLike, dataset: str = "mnist", *, data_dir: str | None = None, manual_dir: str | None = None
) -> Path:
    """Write both splits of `dataset` (uint8 images, as tfds gives them) to one compressed .npz.

    `load_split(..., arrays=path)` and `train --arrays path` read it without TensorFlow, e.g. on an
    accelerator machine where only jax/flax/optax/orbax are installed (MNIST: ~15 MB).
    """
    path = Path(path)
    try:  # before loading anything, so that an unwritable place is found out at once
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from None
    splits = {split: _tfds_split(dataset, split, data_dir, manual_dir) for split in ("train", "test")}
    flat = {f"{split}_{key}": value for split, arrays in splits.items() for key, value in arrays.items()}
    # Never a half-written file under the final name; a full disk is HostError (exit 1), as for every output.
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, dataset=np.array(dataset), **flat))


def padded_batches(arrays: dict[str, Any], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `arrays` ({"image", "label"}) in batches of exactly `batch_size`, so one compiled
    shape serves them all: the last batch is padded with zeros, and "mask" is False on the padding."""
    n = len(arrays["label"])
    padded = -(-n // batch_size) * batch_size
    pad = lambda x: np.concatenate([np.asarray(x), np.zeros((padded - n, *x.shape[1:]), x.dtype)])  # noqa: E731
    images, labels, mask = pad(arrays["image"]), pad(arrays["label"]), np.arange(padded) < n
    for start in range(0, padded, batch_size):
        window = slice(start, start + batch_size)
        yield {"image": images[window], "label": labels[window], "mask": mask[window]}


def epoch_permutation(data_key: jax.Array, epoch: int, num_examples: int, batch_size: int) -> jax.Array:
    """Indices for one epoch as [steps, batch_size]; the partial last batch is dropped.

    The order depends only on (key, epoch), so a resumed run and every process
    of a multi-host run see the same order.
    """
    steps = num_examples // batch_size
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def tf_batches(arrays: dict[str, np.ndarray], batch_indices: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """A tf.data pipeline yielding the batches named by `batch_indices` [steps, B], prefetched."""
    tf = import_tf()
    images = tf.constant(arrays["image"])
    labels = tf.constant(arrays["label"])
    dataset = (
        tf.data.Dataset.from_tensor_slices(np.asarray(batch_indices))
        .map(lambda idx: {"image": tf.gather(images, idx), "label": tf.gather(labels, idx)})
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset.as_numpy_iterator()
