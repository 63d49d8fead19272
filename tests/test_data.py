"""The data loader's own code paths, offline, on tiny IDX archives the tests write themselves."""

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mnist_jax import UserError, data

# Content and registration tables for a fake four-file data set, built per test.
FILES = data.FILES


def _idx_images(n: int, seed: int) -> bytes:
    header = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    return header + np.random.default_rng(seed).integers(0, 256, n * 784, dtype=np.uint8).tobytes()


def _idx_labels(n: int, seed: int) -> bytes:
    return (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + np.random.default_rng(seed).integers(0, 10, n, dtype=np.uint8).tobytes()


def _write_set(folder, mtime: int):
    """Write the four archives; `mtime` changes the gzip header, so the bytes differ while the content does not."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = {FILES[0]: _idx_images(6, 0), FILES[1]: _idx_labels(6, 1), FILES[2]: _idx_images(3, 2), FILES[3]: _idx_labels(3, 3)}
    for name, content in contents.items():
        (folder / name).write_bytes(gzip.compress(content, mtime=mtime))
    registered = {}
    for name in FILES:
        raw = (folder / name).read_bytes()
        registered[name] = (len(raw), hashlib.sha256(raw).hexdigest())
    content_sha = {name: hashlib.sha256(c).hexdigest() for name, c in contents.items()}
    return registered, content_sha


def test_files_that_match_the_registered_checksums_need_nothing(tmp_path):
    registered, content_sha = _write_set(tmp_path, mtime=1)
    assert data.check_manual_files("mnist", tmp_path, registered, content_sha) == {}


def test_recompressed_files_are_accepted_by_content(tmp_path):
    registered, content_sha = _write_set(tmp_path / "original", mtime=1)
    _write_set(tmp_path / "debian", mtime=2)  # same data, other gzip bytes
    accepted = data.check_manual_files("fashion_mnist", tmp_path / "debian", registered, content_sha)
    assert set(accepted) == set(FILES)
    for name, (size, digest) in accepted.items():
        raw = (tmp_path / "debian" / name).read_bytes()
        assert (size, digest) == (len(raw), hashlib.sha256(raw).hexdigest()) != registered[name]


def test_changed_content_is_rejected(tmp_path):
    registered, content_sha = _write_set(tmp_path, mtime=1)
    (tmp_path / FILES[1]).write_bytes(gzip.compress(_idx_labels(6, 99)))
    with pytest.raises(UserError, match="wrong checksum.*train-labels"):
        data.check_manual_files("mnist", tmp_path, registered, content_sha)


def test_truncated_archive_is_rejected(tmp_path):
    registered, content_sha = _write_set(tmp_path, mtime=1)
    raw = (tmp_path / FILES[0]).read_bytes()
    (tmp_path / FILES[0]).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="not a valid gzip"):
        data.check_manual_files("mnist", tmp_path, registered, content_sha)


def test_missing_files_are_named(tmp_path):
    registered, content_sha = _write_set(tmp_path, mtime=1)
    (tmp_path / FILES[2]).unlink()
    with pytest.raises(UserError, match="lacks t10k-images-idx3-ubyte.gz"):
        data.check_manual_files("mnist", tmp_path, registered, content_sha)


UNROUTABLE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never routed, so a connection to it fails or times out


def test_unprepared_data_without_manual_dir_fails_fast_naming_the_files(tmp_path, monkeypatch):
    # Offline whatever this machine is: every name resolves to an unroutable address, below the library
    # (its reachability check, and tfds' downloader should it get that far, run for real against it).
    import socket

    resolved = []

    def unroutable(host, port, *args, **kwargs):
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (UNROUTABLE, port))]

    monkeypatch.setattr(socket, "getaddrinfo", unroutable)
    # And that address is a black hole whatever this machine's routes (some answer TEST-NET-1 with a refusal at
    # once): a connection to it waits out its socket's timeout, or a minute without one, then times out.
    real_connect = socket.socket.connect

    def black_hole(sock, address):
        if address[0] != UNROUTABLE:
            return real_connect(sock, address)
        timeout = sock.gettimeout()
        time.sleep(60 if timeout is None else min(timeout, 60))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket.socket, "connect", black_hole)
    monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        data.load_split("mnist", "test", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 30
    assert resolved, "the network was never tried"
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in FILES)


def test_manual_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.MANUAL_DIR_ENV, str(tmp_path))
    assert data.resolve_manual_dir(None) == tmp_path
    assert data.resolve_manual_dir("/elsewhere") == data.Path("/elsewhere")


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(UserError, match="unknown dataset 'cifar'"):
        data.prepare("cifar")


def test_real_mnist_split_as_arrays(mnist_dirs):
    test = data.load_split("mnist", "test", **mnist_dirs)
    assert test["image"].shape == (10_000, 28, 28, 1) and test["image"].dtype == np.float32
    assert test["label"].dtype == np.int32 and set(np.unique(test["label"])) == set(range(10))
    assert 0.0 == test["image"].min() and test["image"].max() == 1.0
    head = data.load_split("mnist", "train", num_examples=100, **mnist_dirs)
    assert head["image"].shape == (100, 28, 28, 1)
    full = data.load_split("mnist", "train", **mnist_dirs)
    assert full["image"].shape == (60_000, 28, 28, 1)
    np.testing.assert_array_equal(head["image"], full["image"][:100])  # "first N" is a fixed, reproducible subset
    with pytest.raises(UserError, match="asked for 70000"):
        data.load_split("mnist", "train", num_examples=70_000, **mnist_dirs)


def test_tfdata_pipeline_yields_the_batches_named_by_the_order():
    rng = np.random.default_rng(0)
    train = {"image": rng.random((100, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, 100).astype(np.int32)}
    order = np.arange(96).reshape(3, 32)[::-1]
    batches = list(data.tf_batches(train, order))
    assert len(batches) == 3
    for idx, batch in zip(order, batches):
        np.testing.assert_array_equal(batch["image"], train["image"][idx])
        np.testing.assert_array_equal(batch["label"], train["label"][idx])


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_prepares_despite_recompression_beside_mnist(tmp_path, mnist_dirs):
    # In the data_dir where MNIST was prepared first: tfds extracts manual files by file name, and both
    # data sets name theirs alike, so a shared extraction folder once turned "fashion_mnist" into MNIST.
    shutil.copytree(mnist_dirs["data_dir"], tmp_path / "tfds")
    test = data.load_split("fashion_mnist", "test", data_dir=str(tmp_path / "tfds"), manual_dir=FASHION_DIR)
    assert test["image"].shape == (10_000, 28, 28, 1)
    assert np.bincount(test["label"]).tolist() == [1000] * 10
    mnist = data.load_split("mnist", "test", data_dir=str(tmp_path / "tfds"))
    assert not np.array_equal(test["image"], mnist["image"])


def test_exported_arrays_equal_tfds_and_train_without_tensorflow(tmp_path, mnist_dirs):
    path = data.export_arrays(tmp_path / "mnist.npz", "mnist", **mnist_dirs)
    for split, n in (("train", 500), ("test", None)):
        from_tfds = data.load_split("mnist", split, num_examples=n, **mnist_dirs)
        from_file = data.load_split("mnist", split, num_examples=n, arrays=path)
        for key in ("image", "label"):
            np.testing.assert_array_equal(from_tfds[key], from_file[key])
            assert from_tfds[key].dtype == from_file[key].dtype
    with pytest.raises(UserError, match="holds mnist, not fashion_mnist"):
        data.load_split("fashion_mnist", "test", arrays=path)
    with pytest.raises(UserError, match="cannot read arrays file"):
        data.load_split("mnist", "test", arrays=tmp_path / "absent.npz")

    # As on an accelerator machine without TensorFlow: importing it (or tfds) fails, training still runs.
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
        "from mnist_jax import Config, fit\n"
        f"_, h = fit(Config(epochs=1, train_examples=320, arrays={str(path)!r}, workdir={str(tmp_path / 'run')!r}), verbose=False)\n"
        "print('val_accuracy', h['val_accuracy'][-1])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) > 0.5


def test_another_data_set_under_a_dataset_name_is_refused(tmp_path, mnist_small):
    # E.g. a tfds data_dir whose "fashion_mnist" was prepared from the MNIST archives: MNIST's test split posing as Fashion's.
    _, test = mnist_small
    mnist_test = (test["image"] * 255).round().astype(np.uint8)
    data.check_fingerprint(mnist_test, "mnist", "test", "here")  # the real one passes
    with pytest.raises(UserError, match="does not hold the real fashion_mnist test split"):
        data.check_fingerprint(mnist_test, "fashion_mnist", "test", "here")
    with pytest.raises(UserError, match="does not hold the real mnist test split"):
        data.check_fingerprint(mnist_test[:-1], "mnist", "test", "here")
    fake = tmp_path / "fake.npz"
    np.savez(fake, dataset=np.array("fashion_mnist"), train_image=mnist_test, train_label=test["label"],
             test_image=mnist_test, test_label=test["label"])  # fmt: skip
    with pytest.raises(UserError, match=r"fake\.npz does not hold the real fashion_mnist test split"):
        data.load_split("fashion_mnist", "test", arrays=fake)
