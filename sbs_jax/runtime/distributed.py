"""Multi-process start-up: one call that makes a JAX job span every host of a cluster.

Every entry point that computes calls `initialize_from_env()` before anything touches JAX
devices. `jax.distributed.initialize()` finds the coordinator, the process count and this
process's id by itself under SLURM (`srun`), Open MPI (`mpirun`), on Cloud TPU VMs and in
Kubernetes indexed Jobs (with the `kubernetes` package, `jax[k8s]`), and it reads
`JAX_COORDINATOR_ADDRESS`, `JAX_COORDINATOR_PORT` and `JAX_LOCAL_DEVICE_IDS`. This module adds
what it leaves to its caller:

- whether to start at all (JAX raises on a plain machine): a process starts the runtime when it
  is given a place (arguments, or `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
  `JAX_PROCESS_ID` as `launch/local_multihost.sh` and `launch/gpu_multinode.sh` set them) or
  runs as one of several tasks of a launcher JAX detects; otherwise it is a single process and
  nothing is done;
- `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, which JAX does not read; a place given in full is
  taken as is, without cluster detection;
- SLURM with one task per node: every GPU of the node (JAX gives a SLURM task the GPU matching
  its local rank, right for one task per GPU), and the single GPU of a task that SLURM already
  narrowed to one (`--gpus-per-task=1`);
- bounded waits: a process that cannot reach the coordinator gives up after
  `SBS_INIT_TIMEOUT_S` (default 300 s), with an error naming it where its address was given
  (under a launcher, JAX's own `DEADLINE_EXCEEDED` abort), and when one process dies the
  coordination service stops hearing its heartbeat and brings the others down after
  `SBS_HEARTBEAT_TIMEOUT_S` (default 100 s) instead of leaving them blocked in a collective.

`sbs-cluster-check` (`sbs_jax.cli.cluster_check`) starts the same way and runs a
cross-process sum over every device: a cluster smoke test before a long training run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax
    import numpy as np

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "SBS_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "SBS_HEARTBEAT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


class DistributedSetupError(RuntimeError):
    """The cluster description is inconsistent, or the processes could not find each other."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where this process stands, as far as it is known before the runtime starts.

    source: "flags", "env" (the JAX_* variables), a launcher whose variables JAX's own detection
    reads ("slurm", "ompi", "tpu", "k8s"), or "single". Fields left None are JAX's to detect.
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = 1
    process_id: int | None = 0
    local_device_ids: tuple[int, ...] | None = None

    @property
    def is_multiprocess(self) -> bool:
        return self.source != "single"


def _parse_int(value: str | int, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


def _check_address(address: str, name: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(
            f"{name}={address!r} must be HOST:PORT (e.g. 10.0.0.1:1234), the address of process 0"
        )
    return address


def _on_cloud_tpu_vm() -> bool:
    """libtpu is installed and the VM has a TPU device: JAX can read the slice from metadata."""
    has_device = os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio") and any(
        name.isdigit() for name in os.listdir("/dev/vfio")
    )
    return has_device and importlib.util.find_spec("libtpu") is not None


def _detected_launcher(environ: Mapping[str, str], tpu_vm: bool) -> str | None:
    """The launcher, among those JAX's detection reads, that started this process as one of
    several tasks (checked in JAX's order); None for none."""
    if _parse_int(environ.get("OMPI_COMM_WORLD_SIZE", 1), "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    if "SLURM_STEP_NODELIST" in environ and _parse_int(
        environ.get("SLURM_NTASKS", 1), "SLURM_NTASKS"
    ) > 1:
        return "slurm"
    if tpu_vm:
        return "tpu"
    if ("JOB_COMPLETION_INDEX" in environ and "KUBERNETES_SERVICE_HOST" in environ
            and importlib.util.find_spec("kubernetes") is not None):
        return "k8s"
    return None


def _slurm_local_device_ids(environ: Mapping[str, str]) -> tuple[int, ...] | None:
    """The GPUs a SLURM task uses where JAX's choice (the one matching SLURM_LOCALID) is wrong;
    None to keep JAX's choice (one task per GPU, or `JAX_LOCAL_DEVICE_IDS` set)."""
    if "JAX_LOCAL_DEVICE_IDS" in environ:
        return None
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:  # --gpus-per-task=1: this task's GPU is device 0
        return (0,)
    num_tasks = _parse_int(environ.get("SLURM_NTASKS", 1), "SLURM_NTASKS")
    num_nodes = _parse_int(environ.get("SLURM_STEP_NUM_NODES", 1), "SLURM_STEP_NUM_NODES")
    if num_tasks > num_nodes:
        return None
    num_gpus = len(visible) or _parse_int(environ.get("SLURM_GPUS_ON_NODE", 0),
                                         "SLURM_GPUS_ON_NODE")
    return tuple(range(num_gpus)) or None


def resolve_cluster(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
    tpu_vm: bool | None = None,
) -> ClusterSpec:
    """Decides whether and how this process joins a multi-process job, starting nothing (pure
    but for TPU detection, which `tpu_vm` overrides)."""
    environ = os.environ if environ is None else environ
    tpu_vm = _on_cloud_tpu_vm() if tpu_vm is None else tpu_vm
    names = (("coordinator_address", ENV_COORDINATOR), ("num_processes", ENV_NUM_PROCESSES),
             ("process_id", ENV_PROCESS_ID))
    explicit = (coordinator_address, num_processes, process_id)
    given = [arg if arg is not None else (environ.get(env) or None)
             for arg, (_, env) in zip(explicit, names)]
    address, count, pid = given
    count = None if count is None else _parse_int(count, "num_processes / " + ENV_NUM_PROCESSES)
    pid = None if pid is None else _parse_int(pid, "process_id / " + ENV_PROCESS_ID)
    launcher = _detected_launcher(environ, tpu_vm)
    if any(v is not None for v in given):
        source = "flags" if any(v is not None for v in explicit) else "env"
        if count == 1 and pid in (None, 0):
            return ClusterSpec("single")
        missing = [f"{arg} (or ${env})" for (arg, env), v in zip(names, (address, count, pid))
                   if v is None]
        if missing and launcher is None:
            raise DistributedSetupError(
                "multi-process start-up needs all of coordinator address, process count and "
                f"process id, and no cluster launcher supplies the rest; missing: "
                f"{', '.join(missing)}"
            )
        if address is not None:
            _check_address(address, "coordinator_address / " + ENV_COORDINATOR)
        if count is not None and count < 1:
            raise DistributedSetupError(f"num_processes={count} must be >= 1 ({source})")
        if pid is not None and (pid < 0 or count is not None and pid >= count):
            raise DistributedSetupError(
                f"process_id={pid} must be in [0, {count or 'num_processes'}) ({source})")
    elif launcher is not None:
        source = launcher
    else:
        return ClusterSpec("single")
    local_ids = _slurm_local_device_ids(environ) if launcher == "slurm" else None
    return ClusterSpec(source, address, count, pid, local_ids)


def _timeout_s(value: int | None, env_name: str, default: int, environ: Mapping[str, str]) -> int:
    if value is None:
        value = _parse_int(environ.get(env_name, default), env_name)
    if value <= 0:
        raise DistributedSetupError(f"{env_name}={value} must be a positive number of seconds")
    return value


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls process 0's port so that an absent coordinator is a clear Python error.

    (The runtime's own connect failure aborts the process with a message blaming a dead task.)
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedSetupError(
                    f"coordinator {address} ({ENV_COORDINATOR}) did not answer within "
                    f"{timeout_s:.0f}s ({ENV_INIT_TIMEOUT}): {err}. Is process 0 running, and "
                    "is that host and port reachable from here?"
                ) from None
            time.sleep(0.5)


def _check_port_free(address: str) -> None:
    """Process 0 serves the coordinator on every interface at the address's port."""
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as err:
            raise DistributedSetupError(
                f"process 0 cannot serve the coordinator on port {port} of {address} "
                f"({ENV_COORDINATOR}): {err}. Pick a free port."
            ) from None


def initialize_from_env(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout_s: int | None = None,
    heartbeat_timeout_s: int | None = None,
) -> ClusterSpec:
    """Joins this process to the multi-process job, or does nothing for a single process.

    Call it first, before any JAX computation or `jax.devices()`. Calling it again after a
    successful start is harmless and returns the same description.
    """
    import jax

    spec = resolve_cluster(coordinator_address, num_processes, process_id)
    if not spec.is_multiprocess or jax.distributed.is_initialized():
        return spec
    init_timeout = _timeout_s(
        initialization_timeout_s, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S, os.environ
    )
    heartbeat = _timeout_s(
        heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S, os.environ
    )
    complete = None not in (spec.coordinator_address, spec.num_processes, spec.process_id)
    where = (f"process {spec.process_id} of {spec.num_processes}, coordinator "
             f"{spec.coordinator_address} (from {spec.source})" if complete
             else f"a {spec.source} job (JAX's cluster detection fills in the rest)")
    logger.info("Starting JAX distributed runtime as %s", where)
    if complete:
        started = time.monotonic()
        if spec.process_id == 0:
            _check_port_free(spec.coordinator_address)
        else:
            _wait_for_coordinator(spec.coordinator_address, init_timeout)
        init_timeout = max(1, int(init_timeout - (time.monotonic() - started)))
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
            # A place given in full is not second-guessed by the launcher's variables.
            cluster_detection_method="deactivate" if complete else None,
            initialization_timeout=init_timeout,
            heartbeat_timeout_seconds=heartbeat,
            # A process that finished waits at most this long for the others at shutdown.
            shutdown_timeout_seconds=max(heartbeat, 30),
        )
    except Exception as err:  # the runtime raises bare ValueError / XlaRuntimeError
        raise DistributedSetupError(
            f"could not start the JAX distributed runtime as {where} within {init_timeout}s "
            f"({ENV_INIT_TIMEOUT}): {err}"
        ) from err
    return spec


def batch_shard_layout(
    process_grid: np.ndarray, process_index: int, batch_axes: Sequence[int] = (0, 1)
) -> tuple[int, int]:
    """Which block of the global batch a process feeds: (shard_index, num_shards).

    `process_grid` holds each mesh device's process index, shaped like the mesh; the batch is
    split over `batch_axes` (data, fsdp). Processes whose devices hold the same batch rows (a
    model axis spanning hosts) get the same shard and must read the same examples. Raises when
    some process's rows are not one aligned block shared with no other, which per-process data
    loading cannot feed.
    """
    import numpy as np

    grid = np.asarray(process_grid)
    other_axes = [axis for axis in range(grid.ndim) if axis not in batch_axes]
    rows = np.transpose(grid, list(batch_axes) + other_axes).reshape(
        int(np.prod([grid.shape[a] for a in batch_axes])), -1
    )
    total = rows.shape[0]
    blocks = {}
    for process in np.unique(rows):
        held = [row for row in range(total) if (rows[row] == process).any()]
        size = len(held)
        if held != list(range(held[0], held[0] + size)) or held[0] % size or total % size:
            raise DistributedSetupError(
                f"process {process} holds batch rows {held} of {total}: not one aligned block; "
                "lay the mesh out so each process's devices sit together on the batch axes"
            )
        blocks[int(process)] = (held[0], size)
    for process, (first, size) in blocks.items():
        for other, (other_first, other_size) in blocks.items():
            overlap = first < other_first + other_size and other_first < first + size
            if overlap and (first, size) != (other_first, other_size):
                raise DistributedSetupError(
                    f"processes {process} and {other} hold overlapping but different batch rows"
                )
    if process_index not in blocks:
        raise DistributedSetupError(f"process {process_index} holds no device of the mesh")
    first, size = blocks[process_index]
    return first // size, total // size


def process_batch_shard(mesh: jax.sharding.Mesh) -> tuple[int, int]:
    """(shard_index, num_shards) of the global batch that this process reads, for a
    (data, fsdp, model) mesh with the batch split over data and fsdp."""
    import jax
    import numpy as np

    grid = np.vectorize(lambda device: device.process_index, otypes=[int])(mesh.devices)
    return batch_shard_layout(grid, jax.process_index(), batch_axes=(0, 1))


def value_of_process_0(value: int) -> int:
    """Process 0's `value` on every process: what process 0 alone decided (a lock it took, a
    checkpoint it verified). Every process must call this at the same point."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))
