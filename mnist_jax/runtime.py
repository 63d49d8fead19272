"""Process-wide settings, for entry points only (the CLI, the bench, the experiments), and the machine's CPU name and flags.

Nothing in the library calls these: importing or calling `fit` changes no setting of the process.
A research script that wants them calls them first, as `python -m mnist_jax train` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import platform
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import jax


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled programs on disk, so a second run (or an experiment's next variant) skips XLA compilation.

    Default: $MNIST_JAX_COMPILATION_CACHE, else ~/.cache/mnist_jax/xla; an empty value turns it off."""
    directory = os.environ.get("MNIST_JAX_COMPILATION_CACHE", "~/.cache/mnist_jax/xla") if directory is None else directory
    if not str(directory):
        return None
    path = Path(directory).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def reuse_freed_host_memory() -> bool:
    """Make glibc's malloc keep large freed blocks for reuse instead of unmapping them; True if it applied.

    XLA:CPU allocates an execution's scratch memory as one block; above 32 MiB (glibc's largest mmap
    threshold) malloc would map it afresh and fault its pages in on every step, as with several vmapped
    models (docs/performance.md). Freed memory then stays with the process until it exits.
    Call it before JAX's first computation: threads that already hold a malloc arena keep it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # mallopt parameters from <malloc.h>
    # One arena: a thread's own arena gives large freed blocks back to the kernel (and faults them in again).
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 1 << 30))
    return all([bool(libc.mallopt(param, value)) for param, value in settings])


@dataclasses.dataclass
class StopRequest:
    """A request to stop training, polled by `fit` between compiled calls; `signal` names its cause."""

    signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "request"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn the first SIGTERM/SIGINT into a `StopRequest` for `fit`; a second one ends the process at once.
    The previous handlers come back on exit. Off the main thread (where signals cannot be caught) the
    request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        request.signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one, else the platform's name for it)."""
    return cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's instruction-set flags (from /proc/cpuinfo where there is one; empty where unknown)."""
    return frozenset(cpuinfo_field("flags", cpuinfo).split())


def cpuinfo_field(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The value of the first `name : value` line of a /proc/cpuinfo file; "" when it has none or cannot be read."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""
