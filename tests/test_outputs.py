"""Files the commands write: never half-written, never over something that is not theirs without --force,
every input checked before the first byte is written (issue 23, class 6)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mnist_jax.cli import main
from mnist_jax.config import Config, HostError


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist_jax: error: ") and "Traceback" not in err, err
    return lines[0]


def leftovers(folder) -> list[str]:
    """Temporary files an interrupted write could leave behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# --- the helper ----------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_the_disk_fills(tmp_path):
    from mnist_jax.files import atomic_write

    target = tmp_path / "predictions.npz"
    np.savez(target, old=np.arange(3))
    before = target.read_bytes()

    def fills_the_disk(tmp):
        np.savez(tmp, new=np.arange(10_000))  # a whole file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(HostError, match=f"disk full.*{target.name}"):
        atomic_write(target, fills_the_disk)
    assert target.read_bytes() == before and leftovers(tmp_path) == []

    atomic_write(target, lambda tmp: np.savez(tmp, new=np.arange(5)))  # numpy's own writer, into the temp name
    assert np.load(target)["new"].tolist() == [0, 1, 2, 3, 4] and leftovers(tmp_path) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it, not mkstemp's 0o600


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    from mnist_jax.files import atomic_write

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    atomic_write(link, lambda tmp: tmp.write_text("new"))
    assert victim.read_text() == "keep me" and not link.is_symlink() and link.read_text() == "new"


# --- export ----------------------------------------------------------------------


def test_export_refuses_to_overwrite_without_force(tmp_path, mnist_dirs, capsys):
    out = tmp_path / "thesis.npz"
    out.write_bytes(b"three years of work")
    flags = ["--data-dir", mnist_dirs["data_dir"], "--manual-dir", mnist_dirs["manual_dir"]]
    assert main(["export", "--out", str(out), *flags]) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "--force" in line
    assert out.read_bytes() == b"three years of work" and leftovers(tmp_path) == []

    assert main(["export", "--out", str(out), "--force", *flags]) == 0
    with np.load(out) as saved:
        assert saved["train_label"].shape == (60000,) and saved["test_image"].shape[0] == 10000


EXPORT_WITH_A_FULL_DISK = """
import resource, sys
from mnist_jax.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))  # files stop at 1 MiB: a full disk
sys.exit(main(["export", "--out", sys.argv[1], "--data-dir", sys.argv[2], "--manual-dir", sys.argv[3]]))
"""


def test_export_with_a_full_disk_is_one_line_exit_1_and_leaves_nothing(tmp_path, mnist_dirs):
    out = tmp_path / "mnist.npz"
    result = subprocess.run([sys.executable, "-c", EXPORT_WITH_A_FULL_DISK, str(out), mnist_dirs["data_dir"], mnist_dirs["manual_dir"]],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"mnist_jax: error: disk full writing {out} (File too large); it is unchanged"]
    assert list(tmp_path.iterdir()) == []


# --- compare -----------------------------------------------------------------------


def fake_run(folder, learning_rate):
    """A stopped run folder as compare reads it: config.json and history.json."""
    folder.mkdir()
    Config(learning_rate=learning_rate).save(folder / "config.json")
    history = {"loss": [0.5, 0.3], "accuracy": [0.8, 0.9], "val_loss": [0.4, 0.35], "val_accuracy": [0.85, 0.88]}
    (folder / "history.json").write_text(json.dumps(history))
    return folder


def test_compare_checks_its_output_before_writing_and_writes_atomically(tmp_path, capsys):
    runs = [str(fake_run(tmp_path / f"run{i}", lr)) for i, lr in enumerate((0.001, 0.003))]
    out = tmp_path / "curves.xyz"  # no such image format: one line, nothing written
    assert main(["compare", *runs, "--out", str(out)]) == 2
    assert "curves.xyz" in one_error_line(capsys) and not out.exists() and leftovers(tmp_path) == []

    plot = tmp_path / "compare.png"
    assert main(["compare", *runs, "--out", str(plot)]) == 0
    capsys.readouterr()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and leftovers(tmp_path) == []
