"""Every input is checked before it is used (issue 23): seeds, data arrays, tfds splits, the manual
dir's archives, the data dir. A bad one is one line on stderr, `mnist_jax: error: ...`, exit 2 (bad
input) or 1 (the machine: an unwritable folder), no traceback, and nothing trained on it.

The image files given to `predict` are fuzzed in tests/test_predict_images.py (it has a trained run).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from mnist_jax import Config, UserError, data
from mnist_jax.cli import main

REPO = Path(__file__).resolve().parent.parent
MANUAL_DIR = Path(os.environ.get("MNIST_JAX_MANUAL_DIR", REPO.parent / "shared" / "data" / "mnist"))
TRAIN = ["--train-examples", "640", "--epochs", "1", "--no-tensorboard"]


def assert_one_line(code: int, err: str, expected_code: int, *words: str) -> None:
    """The promise for bad input: that exit code, one line on stderr naming what is wrong, no traceback."""
    assert code == expected_code, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("mnist_jax: error: "), err[-3000:]
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


# --- class 8: seeds outside what the PRNG takes ------------------------------------------------


@pytest.mark.parametrize("seed", [2**32, 1099511627776, -1, -(2**31), 2**64])
def test_seeds_outside_the_prng_range_are_refused(seed, tmp_path, capfd):
    # jax.random.key keeps a seed's low 32 bits: 2**40 trains exactly as 0 does, -1 as 2**32 - 1.
    code = main(["train", "--seed", str(seed), "--workdir", str(tmp_path / "run"), "--arrays", str(tmp_path / "none.npz"), *TRAIN])
    assert_one_line(code, capfd.readouterr().err, 2, "--seed", str(seed))
    with pytest.raises(UserError, match="--seed"):
        Config(seed=seed).validate()


def test_seeds_at_the_prng_range_ends_are_taken():
    import jax

    for seed in (0, 2**32 - 1):
        assert Config(seed=seed).validate().seed == seed
    # The range is the PRNG's: its two ends are different keys, and the next seed aliases the first.
    ends = [np.asarray(jax.random.key_data(jax.random.key(s))).tolist() for s in (0, 2**32 - 1, 2**32)]
    assert ends[0] != ends[1] and ends[2] == ends[0]


def test_fit_many_checks_every_models_seed():
    from mnist_jax.multi import fit_many

    rng = np.random.default_rng(0)
    train = {"image": rng.random((64, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, 64).astype(np.int32)}
    with pytest.raises(UserError, match="--seed must be in 0..4294967295, got 4294967296"):
        fit_many([Config(seed=0, epochs=1), Config(seed=2**32, epochs=1)], train)


# --- class 9: arrays checked at every entry point; the fuzzed --arrays files -----------------


@pytest.fixture(scope="module")
def good_npz(tmp_path_factory, mnist_dirs) -> Path:
    """The real MNIST, as `export` writes it."""
    return data.export_arrays(tmp_path_factory.mktemp("arrays") / "mnist.npz", "mnist", **mnist_dirs)


@pytest.fixture(scope="module")
def members(good_npz) -> dict[str, np.ndarray]:
    with np.load(good_npz) as npz:
        return {name: npz[name] for name in npz.files}


def _with(members: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    values = {**members, **changes}
    return {k: v for k, v in values.items() if v is not None}


def _bad_labels(labels: np.ndarray, value) -> np.ndarray:
    labels = labels.copy()
    labels[1234] = value
    return labels


def malformed_arrays(members: dict[str, np.ndarray], raw: bytes) -> dict[str, tuple[object, int, str]]:
    """{name: (the file's bytes, or members to np.savez, or a function of its path), exit code, a word of the message}."""
    train_image, train_label, test_image = members["train_image"], members["train_label"], members["test_image"]
    middle = raw.find(b"train_image.npy") + 500_000  # inside the train images' deflate stream
    flipped = bytearray(raw)
    flipped[middle : middle + 4] = bytes(255 - b for b in flipped[middle : middle + 4])
    record = raw.rfind(b"train_image.npy") - 46  # its central directory record: the CRC-32 zipfile checks is at +16
    assert raw[record : record + 4] == b"PK\x01\x02"
    crc = bytearray(raw)
    crc[record + 16 : record + 20] = bytes(255 - b for b in crc[record + 16 : record + 20])
    cases = {
        "empty": (b"", 2, "empty"),
        "random-bytes": (np.random.default_rng(0).bytes(5000), 2, "cannot read"),
        "text": (b"train_image,train_label\n1,2\n", 2, "cannot read"),
        "flipped-bytes": (bytes(flipped), 2, "damaged"),
        "crc-field": (bytes(crc), 2, "damaged"),
        "zip-of-other-members": (lambda p: _zip(p, {"hello.txt": b"hi"}), 2, "lacks"),
        "npy-not-npz": (lambda p: np.save(open(p, "wb"), train_image), 2, ".npy"),
        "pickled": (_with(members, train_label=np.array([object()] * 3, dtype=object)), 2, "train_label"),
        "no-test-labels": (_with(members, test_label=None), 2, "test_label"),
        "other-dataset": (_with(members, dataset=np.array("cifar")), 2, "cifar"),
        "flat-images": (_with(members, train_image=train_image.reshape(-1, 784)), 2, "shape"),
        "no-channel": (_with(members, train_image=train_image[..., 0]), 2, "shape"),
        "rgb-images": (_with(members, test_image=np.repeat(test_image, 3, axis=-1)), 2, "shape"),
        "float-images": (_with(members, train_image=train_image.astype(np.float32)), 2, "uint8"),
        "int64-images": (_with(members, test_image=test_image.astype(np.int64)), 2, "uint8"),
        "label-11": (_with(members, train_label=_bad_labels(train_label, 11)), 2, "label"),
        "label-minus-3": (_with(members, test_label=_bad_labels(members["test_label"], -3)), 2, "-3"),
        "float-labels": (_with(members, train_label=train_label.astype(np.float32)), 2, "label"),
        "short-labels": (_with(members, train_label=train_label[:-1]), 2, "label"),
        "2d-labels": (_with(members, test_label=members["test_label"][:, None]), 2, "label"),
        "a-folder": (lambda p: p.mkdir(), 2, "cannot read"),
    }
    for fraction in (0.0001, 0.01, 0.5, 0.9, 0.99999):  # an interrupted copy, cut at several places
        cases[f"cut-at-{fraction}"] = (raw[: int(len(raw) * fraction)], 2, "cannot read")
    return cases


def _zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)


def _write(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        with open(path, "wb") as f:  # a file object: np.savez adds no .npz to the name
            np.savez(f, **content)
    else:
        content(path)


def test_fuzzed_arrays_files_are_one_line_errors(good_npz, members, tmp_path, capfd):
    """Each malformed --arrays file stops `train` in one line before anything is trained; and `data.load_split`
    raises UserError for each."""
    raw = good_npz.read_bytes()
    failures = []
    for name, (content, expected_code, word) in malformed_arrays(members, raw).items():
        path = tmp_path / f"{name}.npz"
        _write(path, content)
        workdir = tmp_path / "runs" / name
        try:
            code = main(["train", "--arrays", str(path), "--workdir", str(workdir), *TRAIN])
        except BaseException as escaped:  # noqa: BLE001 - a traceback is the failure this test looks for
            failures.append(f"{name}: {type(escaped).__name__} escaped main: {escaped}")
            capfd.readouterr()
            continue
        err = capfd.readouterr().err
        try:
            assert_one_line(code, err, expected_code, word, str(path))
            assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
        except AssertionError as failure:
            failures.append(f"{name}: {failure}")
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    assert not failures, "\n".join(failures)


def test_load_split_checks_the_arrays_it_returns(members, tmp_path):
    path = tmp_path / "labels.npz"
    np.savez(path, **_with(members, test_label=_bad_labels(members["test_label"], 11)))
    with pytest.raises(UserError, match=r"labels\.npz: test_label holds 11 .*0\.\.9"):
        data.load_split("mnist", "test", arrays=path)
    data.load_split("mnist", "train", num_examples=10, arrays=path)  # the train split is fine


def test_tfds_splits_are_checked_too(mnist_dirs, monkeypatch):
    # A tfds split whose labels went wrong (a damaged or foreign tfrecord): the same check as for --arrays.
    import tensorflow_datasets as tfds

    real = tfds.as_numpy

    def damaged(dataset):
        arrays = dict(real(dataset))
        arrays["label"] = _bad_labels(arrays["label"], 10)
        return arrays

    monkeypatch.setattr(tfds, "as_numpy", damaged)
    for n in (None, 2000):
        with pytest.raises(UserError, match="label holds 10 "):
            data.load_split("mnist", "test", num_examples=n, **mnist_dirs)


def test_check_split_contract():
    images, labels = np.zeros((5, 28, 28, 1), np.uint8), np.arange(5)
    data.check_split(images, labels, "mnist", "here")  # fine
    for bad, words in (
        ((images[:, :27], labels), "shape"),
        ((images.astype(np.float64), labels), "uint8"),
        ((images, labels[:4]), "5 images and 4 labels"),
        ((images, labels + 6), "holds 10 "),
        ((images, labels.astype(np.float32)), "integer"),
    ):
        with pytest.raises(UserError, match=words):
            data.check_split(*bad, "mnist", "here")


# --- class 10: small files that decode big ------------------------------------------------------


def _peak_rss_growth(code: str) -> tuple[str, int]:
    """Run `code` (which sets `result`) in a fresh interpreter: (result, growth of its peak RSS in MiB)."""
    script = (
        "import resource\n"
        "def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        f"{code}\n"
        "print(result); print(peak() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result, growth = out.stdout.strip().rsplit("\n", 1)
    return result, int(growth)


def gzip_bomb(path: Path, decompressed_mib: int) -> None:
    """A gzip file that decompresses to `decompressed_mib` MiB of zeros (a few hundred KiB on disk):
    copies of one 16 MiB member, as `cat a.gz b.gz` makes."""
    member = gzip.compress(bytes(16 << 20), compresslevel=9)
    path.write_bytes(member * (decompressed_mib // 16))


def test_gzip_bomb_in_the_manual_dir_is_refused_before_it_uses_memory(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in data.FILES:
        shutil.copy(MANUAL_DIR / name, manual / name)
    # tfds's registered (size, sha256) of the real archives, as `prepare` passes them.
    registered = {name: ((MANUAL_DIR / name).stat().st_size, hashlib.sha256((MANUAL_DIR / name).read_bytes()).hexdigest()) for name in data.FILES}
    # MNIST's training images are 47 MB decompressed: this one says 512 MiB.
    gzip_bomb(manual / "train-images-idx3-ubyte.gz", 512)
    code = (
        "from pathlib import Path\n"
        "from mnist_jax import data, UserError\n"
        "before = peak()\n"
        f"try: data.check_manual_files('mnist', Path({str(manual)!r}), {registered!r}); result = 'accepted'\n"
        "except UserError as err: result = f'UserError: {err}'\n"
    )
    result, growth = _peak_rss_growth(code)
    assert growth < 100, f"checking the archives grew the peak RSS by {growth} MiB ({result})"
    assert result.startswith("UserError:") and "train-images-idx3-ubyte.gz" in result and "\n" not in result, result
    assert "more than" in result, result


def huge_png(path: Path, width: int, height: int) -> None:
    """A blank 1-bit grayscale PNG of width x height written by hand (Pillow would need the pixels in memory):
    a few tens of KiB on disk."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    row, deflate = bytes(1 + (width + 7) // 8), zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_image_with_too_many_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    huge_png(path, 13000, 13000)  # 169 million pixels in ~30 KiB
    assert path.stat().st_size < 100_000
    code = (
        "from mnist_jax.images import ImageError, read_image\n"
        "before = peak()\n"
        f"try: read_image({str(path)!r}); result = 'read'\n"
        "except ImageError as err: result = f'ImageError: {err}'\n"
    )
    result, growth = _peak_rss_growth(code)
    assert growth < 100, f"reading the image grew the peak RSS by {growth} MiB ({result})"
    assert result.startswith("ImageError:") and str(path) in result and "13000x13000" in result, result


# --- the data dir, while the data is unprepared ---------------------------------------------------


def test_data_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path, capfd):
    manual = MANUAL_DIR
    (tmp_path / "afile").write_text("not a folder\n")
    code = main(["train", "--data-dir", str(tmp_path / "afile"), "--manual-dir", str(manual), "--workdir", str(tmp_path / "run"), *TRAIN])
    assert_one_line(code, capfd.readouterr().err, 2, str(tmp_path / "afile"), "not a folder")


def test_unwritable_data_dir_is_one_line_and_exit_1(tmp_path, capfd):
    manual = MANUAL_DIR
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked / "tfds"
    if os.access(locked, os.W_OK):  # root ignores the mode bits; sysfs refuses everyone new folders
        target = Path("/sys/mnist_jax_test_unwritable")
        if target.exists() or not Path("/sys").is_dir():
            pytest.skip("no unwritable folder to test with")
    try:
        code = main(["train", "--data-dir", str(target), "--manual-dir", str(manual), "--workdir", str(tmp_path / "run"), *TRAIN])
        assert_one_line(code, capfd.readouterr().err, 1, str(target), "cannot write")
    finally:
        locked.chmod(0o700)


def test_damaged_prepared_tfds_data_is_one_line_and_exit_2(mnist_dirs, tmp_path, capfd):
    # Bytes of a prepared split changed on disk (a bad copy, a failing disk): TensorFlow's DataLossError
    # must not reach the user as a traceback.
    shutil.copytree(mnist_dirs["data_dir"], tmp_path / "tfds")
    (record,) = (tmp_path / "tfds").glob("mnist/*/mnist-test.tfrecord*")
    raw = bytearray(record.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = bytes(16)
    record.write_bytes(bytes(raw))
    code = main(["train", "--data-dir", str(tmp_path / "tfds"), "--workdir", str(tmp_path / "run"), *TRAIN])
    assert_one_line(code, capfd.readouterr().err, 2, "damaged", str(tmp_path / "tfds"))


def test_a_model_with_fewer_outputs_than_the_data_has_classes_is_refused(tmp_path, capfd):
    # MNIST's labels are 0..9: a 5-output model would one-hot labels 5..9 to zeros and train on them silently.
    from mnist_jax import ModelConfig

    with pytest.raises(UserError, match="--num-classes must be at least 10 for mnist, got 5"):
        Config(model=ModelConfig(num_classes=5)).validate()
    Config(model=ModelConfig(num_classes=12)).validate()  # spare outputs are harmless
    code = main(["train", "--num-classes", "9", "--dataset", "fashion_mnist", "--workdir", str(tmp_path / "run"), "--arrays", str(tmp_path / "none.npz"), *TRAIN])
    assert_one_line(code, capfd.readouterr().err, 2, "--num-classes", "fashion_mnist")
