"""Multi-process start-up: one call that makes a JAX job span every host of a cluster.

Every entry point that computes calls `initialize_from_env()` before anything touches JAX
devices. It works out where this process stands, in this order:

1. explicit arguments (`coordinator_address`, `num_processes`, `process_id`), each falling back
   to `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`
   (set by `launch/local_multihost.sh` and `launch/gpu_multinode.sh`);
2. SLURM, inside an `srun` step: `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`, and the first
   host of `SLURM_STEP_NODELIST` as coordinator (port from `JAX_COORDINATOR_PORT`, else derived
   from `SLURM_JOB_ID` so every task agrees on it);
3. a Cloud TPU VM (libtpu installed and a TPU device present): JAX reads the slice's metadata;
4. otherwise a single process, and nothing is done.
(The rules themselves live in `sbs_jax.cluster`; this module acts on them.)

The timeouts are bounded on purpose: a process that cannot reach the coordinator gives up after
`SBS_INIT_TIMEOUT_S` (default 300 s), and when one process dies the coordination service stops
hearing its heartbeat and brings the others down after `SBS_HEARTBEAT_TIMEOUT_S` (default 100 s)
with an error instead of leaving them blocked in a collective forever.

`python -m sbs_jax.distributed` (`sbs-cluster-check`) starts the same way and runs a cross-process
sum over every device: a cluster smoke test before a long training run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from sbs_jax.cluster import (  # noqa: F401  (re-exported: the public names of start-up)
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    DEFAULT_INIT_TIMEOUT_S,
    ENV_COORDINATOR,
    ENV_COORDINATOR_PORT,
    ENV_HEARTBEAT_TIMEOUT,
    ENV_INIT_TIMEOUT,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ClusterSpec,
    DistributedSetupError,
    first_slurm_host,
    on_cloud_tpu_vm,
    parse_int,
    resolve_cluster,
)

if TYPE_CHECKING:
    import jax
    import numpy as np

logger = logging.getLogger(__name__)


def _timeout_s(value: int | None, env_name: str, default: int, environ: Mapping[str, str]) -> int:
    if value is None:
        value = parse_int(environ.get(env_name, default), env_name)
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
    if not spec.is_multiprocess:
        return spec
    if jax.distributed.is_initialized():
        return spec
    init_timeout = _timeout_s(
        initialization_timeout_s, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S, os.environ
    )
    heartbeat = _timeout_s(
        heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S, os.environ
    )
    where = (
        f"process {spec.process_id} of {spec.num_processes}, coordinator "
        f"{spec.coordinator_address} (from {spec.source})"
        if spec.source != "tpu"
        else "a Cloud TPU slice (from TPU metadata)"
    )
    logger.info("Starting JAX distributed runtime as %s", where)
    kwargs = {
        "initialization_timeout": init_timeout,
        "heartbeat_timeout_seconds": heartbeat,
        # A process that finished waits at most this long for the others at shutdown.
        "shutdown_timeout_seconds": max(heartbeat, 30),
    }
    if spec.source != "tpu":
        started = time.monotonic()
        if spec.process_id == 0:
            _check_port_free(spec.coordinator_address)
        else:
            _wait_for_coordinator(spec.coordinator_address, init_timeout)
        kwargs["initialization_timeout"] = max(1, int(init_timeout - (time.monotonic() - started)))
        kwargs.update(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
            cluster_detection_method="deactivate",
        )
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # the runtime raises bare XlaRuntimeError / RuntimeError
        raise DistributedSetupError(
            f"could not start the JAX distributed runtime as {where} within {init_timeout}s "
            f"({ENV_INIT_TIMEOUT}): {err}"
        ) from err
    if spec.source == "tpu":
        spec = ClusterSpec("tpu", None, jax.process_count(), jax.process_index())
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


def _cross_process_sum() -> tuple[float, float]:
    """Each device contributes (its process index + 1); returns (sum over all devices, expected)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("devices",))
    sharding = NamedSharding(mesh, PartitionSpec("devices"))
    local = np.full((jax.local_device_count(),), jax.process_index() + 1, np.float32)
    global_array = jax.make_array_from_process_local_data(sharding, local)
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(
        global_array
    )
    counts = {}
    for device in jax.devices():
        counts[device.process_index] = counts.get(device.process_index, 0) + 1
    expected = float(sum((index + 1) * n for index, n in counts.items()))
    return float(total), expected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sbs_jax.distributed",
        description="Cluster smoke test: start like sbs_jax.train does, then sum a value over "
        "every device of every process and print one JSON line per process.",
    )
    parser.add_argument(
        "--coordinator_address", help=f"HOST:PORT of process 0 (${ENV_COORDINATOR})"
    )
    parser.add_argument(
        "--num_processes", type=int, help=f"processes in the job (${ENV_NUM_PROCESSES})"
    )
    parser.add_argument("--process_id", type=int, help=f"this process, 0-based (${ENV_PROCESS_ID})")
    parser.add_argument("--rounds", type=int, default=1, help="how many sums to run")
    parser.add_argument("--interval_s", type=float, default=0.0, help="pause between rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        spec = initialize_from_env(args.coordinator_address, args.num_processes, args.process_id)
    except DistributedSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import jax

    total, expected = 0.0, 0.0
    for round_index in range(args.rounds):
        total, expected = _cross_process_sum()
        print(f"round {round_index}: sum={total} expected={expected}", file=sys.stderr, flush=True)
        if args.interval_s:
            time.sleep(args.interval_s)
    report = {
        "source": spec.source,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "sum": total,
        "expected": expected,
    }
    print(json.dumps(report), flush=True)
    return 0 if total == expected else 1


if __name__ == "__main__":
    sys.exit(main())
