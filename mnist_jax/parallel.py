"""Data parallelism with jax.sharding: a 1-D mesh over the batch axis, on one host or many.

Parameters and optimizer state are replicated; every global batch is split
across the mesh's devices along its first axis. The step functions stay the
same pure functions: GSPMD partitions them from the shardings of their inputs
and inserts the gradient all-reduce. Multi-host runs start with
`initialize_distributed`, after which `jax.devices()` spans every process.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnist_jax.config import HostError, UserError

BATCH_AXIS = "batch"
# How long a process of a multi-process run waits for the run to form (train --coordinator-timeout's default).
COORDINATOR_TIMEOUT_S = 300
# JAX's own initialization timeout is this much longer than ours, so that ours ends the wait first.
JAX_TIMEOUT_MARGIN_S = 60


def check_distributed_flags(coordinator: str | None, num_processes: int | None, process_id: int | None,
                            timeout_s: int) -> None:
    """UserError, naming the flag, unless the flags describe a process of a multi-process run (or none is set):
    --coordinator HOST:PORT (a port 1..65535; an IPv6 host in brackets) or 'auto', 1 <= --num-processes,
    0 <= --process-id < --num-processes, and a positive --coordinator-timeout."""
    if coordinator is None and num_processes is None and process_id is None:
        return
    if timeout_s < 1:
        raise UserError(f"--coordinator-timeout must be >= 1 second, got {timeout_s}")
    if coordinator == "auto":  # the cluster's environment says the rest; what is given must still make sense
        if num_processes is not None and num_processes < 1:
            raise UserError(f"--num-processes must be >= 1, got {num_processes}")
        if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
            raise UserError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise UserError("multi-process runs need all of --coordinator HOST:PORT, --num-processes N and --process-id I")
    host, _, port = coordinator.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if not host or (":" in host and not bracketed) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--coordinator must be HOST:PORT (PORT in 1..65535, an IPv6 HOST in [...]) or 'auto', got {coordinator!r}")
    if num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id must be in [0, {num_processes}) for --num-processes {num_processes}, got {process_id}")


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                           timeout_s: int = COORDINATOR_TIMEOUT_S) -> None:
    """Join a multi-process run: explicit flags, or whatever `jax.distributed.initialize()` detects (SLURM, TPU pods, ...).

    The flags are checked first (`check_distributed_flags`: UserError). Then this waits at most `timeout_s`
    seconds for the run to form (the coordinator answering, every process registered); past that, it
    raises HostError naming the coordinator and the wait. JAX itself would wait its `initialization_timeout`
    and then abort the process (no Python exception), so JAX connects in a helper thread, given a longer
    timeout, while this one waits; a process that gave up leaves JAX's half-made connection behind, so it
    exits at interpreter exit without running JAX's shutdown (which would wait on it and log its failure).
    """
    check_distributed_flags(coordinator, num_processes, process_id, timeout_s)
    if coordinator is None and num_processes is None and process_id is None:
        return
    if coordinator == "auto":  # SLURM, Open MPI, TPU pods, ...: let JAX read the cluster's environment
        where, options = "the cluster's coordinator", {"num_processes": num_processes, "process_id": process_id}
    else:
        # CPU devices need a collectives implementation for the cross-process all-reduce (accelerators ignore this).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        where = f"the coordinator {coordinator}"
        options = {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            jax.distributed.initialize(**options, initialization_timeout=timeout_s + JAX_TIMEOUT_MARGIN_S)
        except BaseException as err:  # noqa: BLE001 -- handed to the waiting thread
            failure.append(err)

    joining = threading.Thread(target=connect, name="mnist_jax-distributed-initialize", daemon=True)
    joining.start()
    joining.join(timeout_s)
    who = f"process {process_id} of {num_processes}" if process_id is not None else "this process"
    if joining.is_alive():
        atexit.register(_exit_at_once)
        raise HostError(f"{who}: the multi-process run did not form within {timeout_s} s (--coordinator-timeout): "
                        f"{where} did not answer or not every process joined")  # fmt: skip
    if failure:
        message = str(failure[0]).strip().splitlines()
        raise HostError(f"{who}: cannot join {where}: {message[0] if message else type(failure[0]).__name__}")


def _exit_at_once() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """Block until every process reaches the barrier `name` (a no-op with one process). A name may be used
    once in a process's life: callers make it unique with what every process agrees on (workdir, step).

    The coordinator's barrier, not a device collective like `multihost_utils.sync_global_devices`:
    a CPU collective's setup (gloo) gives up after 30 s when one process arrives late, while
    compiling or loading data can keep one process minutes behind another on a busy machine."""
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp

        ocp.multihost.sync_global_processes(name, timeout=timeout_s, processes=set(range(jax.process_count())))


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """The mesh and the two shardings a data-parallel run needs."""

    mesh: Mesh

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    def batch_rows(self, global_batch: np.ndarray) -> np.ndarray:
        """This process's rows of a global batch (processes own contiguous blocks, in process order)."""
        per_process = len(global_batch) // jax.process_count()
        start = jax.process_index() * per_process
        return global_batch[start : start + per_process]

    def put_batch(self, global_batch: Any) -> Any:
        """Place a global batch (numpy, identical on every process) split over the batch axis."""
        if jax.process_count() == 1:
            return jax.device_put(global_batch, self.batch)
        local = jax.tree.map(self.batch_rows, global_batch)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch, x), local)

    def settle(self, tree: Any) -> Any:
        """Return `tree`, first waiting for it on CPU meshes of several devices (elsewhere: at once).

        XLA's CPU client launches each device's part of a program from a thread pool, and a launch
        may block there (on the previous collective's launch, on the in-flight limit). With programs
        queued behind a collective one, gdb showed (two processes x two devices, 2 cores) one device's
        part of an evaluation step waiting in gloo while the other device's part never started, its
        launch stuck behind the queued ones: both processes hung, 4 runs in 4. Waiting for each
        collective program before dispatching the next leaves nothing queued behind it (9 clean runs
        in 9). One process with 4 forced CPU devices hung the same way once (3 of 4 devices in an
        all-reduce). It costs little on CPU, where the steps run back to back anyway.
        """
        if self.num_devices > 1 and self.platform == "cpu":
            jax.block_until_ready(tree)
        return tree

    def put_replicated(self, tree: Any) -> Any:
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x), np.shape(x)), tree
        )


def data_parallel(devices: str | int = "all") -> DataParallel:
    """A 1-D mesh over the first N devices (all of them, across processes, by default)."""
    available = jax.devices()
    if devices in ("all", 0, "0"):
        chosen = available
    else:
        try:
            count = int(devices)
        except ValueError:
            raise UserError(f"--devices must be 'all' or a positive number, got {devices!r}") from None
        if not 1 <= count <= len(available):
            raise UserError(f"--devices {count}: this run sees {len(available)} device(s)")
        if jax.process_count() > 1 and count != len(available):
            raise UserError("multi-process runs use every device (--devices all)")
        chosen = available[:count]
    return DataParallel(Mesh(np.asarray(chosen), (BATCH_AXIS,)))


def check_divisible(batch_size: int, num_devices: int, what: str = "batch size") -> None:
    if batch_size % num_devices:
        lower = batch_size // num_devices * num_devices
        options = " or ".join(str(b) for b in (lower, lower + num_devices) if b > 0)
        raise UserError(f"{what} {batch_size} does not divide over {num_devices} devices (try {options})")
