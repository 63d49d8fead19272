"""Writing an output file so that no reader ever sees part of it: `atomic_write`.

Every command that writes a file the user reads (analyze's outputs, compare's plot) goes through it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from mnist_jax.config import HostError, UserError

# Errors that mean the machine ran out of room (exit 1); any other OSError means the place given cannot
# be written (a missing or read-only folder, a name that is a folder: the user's choice, exit 2).
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write `path` by calling `write(tmp)` on a temporary file in the same folder, then `os.replace`.

    Contract: afterwards `path` holds either its previous content (or does not exist) or the whole new
    content, never a part; the temporary file is gone, whatever happened (an exception, Ctrl-C). The
    temporary name keeps `path`'s suffix, so writers that read the format from it (matplotlib's savefig,
    numpy's savez) work unchanged. If `path` is a symbolic link, the link is replaced: nothing is written
    through it. The new file gets the mode a plain `open` would give it, and is on disk (fsync) before it
    takes the name. Raises HostError when the disk is full, UserError when the folder cannot be written.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as err:
        raise _error(path, err) from None
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        write(tmp)
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _error(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _error(path: Path, err: OSError) -> Exception:
    if err.errno in NO_ROOM:
        return HostError(f"disk full writing {path} ({err.strerror}); it is unchanged")
    return UserError(f"cannot write {path}: {err.strerror}")
