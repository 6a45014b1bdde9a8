"""Where this process stands in a multi-process JAX job, worked out without starting anything.

The rules, in order: explicit arguments (each falling back to `JAX_COORDINATOR_ADDRESS` /
`JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`), a SLURM `srun` step, a Cloud TPU VM, else a single
process. `sbs_jax.distributed` starts the runtime from the answer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_COORDINATOR_PORT = "JAX_COORDINATOR_PORT"
ENV_INIT_TIMEOUT = "SBS_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "SBS_HEARTBEAT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
# SLURM jobs without JAX_COORDINATOR_PORT use a port in [61440, 65535] derived from the job id,
# the same rule JAX's own SLURM detection uses.
_SLURM_PORT_BASE, _SLURM_PORT_RANGE = 65536 - 4096, 4096


class DistributedSetupError(RuntimeError):
    """The cluster description is inconsistent, or the processes could not find each other."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where this process stands. `source` says which rule decided it.

    source: "flags" | "env" | "slurm" | "tpu" | "single". For "tpu", JAX fills in the address,
    count and id from the slice's metadata, so they are None here.
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = 1
    process_id: int | None = 0
    local_device_ids: tuple[int, ...] | None = None

    @property
    def is_multiprocess(self) -> bool:
        return self.source != "single"


def parse_int(value: str | int, name: str) -> int:
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


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-008,011],cpu1' -> 'gpu003'."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[(\w+))?", nodelist)
    if not match:
        raise DistributedSetupError(f"SLURM_STEP_NODELIST={nodelist!r} names no host")
    prefix, first_index = match.groups()
    return prefix + (first_index or "")


def _slurm_spec(environ: Mapping[str, str]) -> ClusterSpec:
    num_processes = parse_int(environ["SLURM_NTASKS"], "SLURM_NTASKS")
    process_id = parse_int(environ.get("SLURM_PROCID", ""), "SLURM_PROCID")
    local_id = parse_int(environ.get("SLURM_LOCALID", ""), "SLURM_LOCALID")
    if num_processes <= 1:
        return ClusterSpec("single")
    if ENV_COORDINATOR_PORT in environ:
        port = parse_int(environ[ENV_COORDINATOR_PORT], ENV_COORDINATOR_PORT)
    else:
        job_id = parse_int(environ.get("SLURM_JOB_ID", ""), "SLURM_JOB_ID")
        port = _SLURM_PORT_BASE + job_id % _SLURM_PORT_RANGE
    address = f"{first_slurm_host(environ['SLURM_STEP_NODELIST'])}:{port}"
    num_nodes = parse_int(environ.get("SLURM_STEP_NUM_NODES", "1"), "SLURM_STEP_NUM_NODES")
    # One task per node sees all of its node's accelerators. Several tasks per node each take
    # the device matching their local rank, unless SLURM already narrowed CUDA_VISIBLE_DEVICES
    # to one device per task (--gpus-per-task=1), in which case that device is the only one.
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    per_gpu = num_processes > num_nodes and len(visible) != 1
    local_device_ids = (local_id,) if per_gpu else None
    return _validated(ClusterSpec("slurm", address, num_processes, process_id, local_device_ids))


def _validated(spec: ClusterSpec) -> ClusterSpec:
    if spec.num_processes is not None and spec.num_processes < 1:
        raise DistributedSetupError(
            f"num_processes={spec.num_processes} must be >= 1 ({spec.source})"
        )
    if spec.process_id is not None and spec.num_processes is not None and not (
        0 <= spec.process_id < spec.num_processes
    ):
        raise DistributedSetupError(
            f"process_id={spec.process_id} must be in [0, {spec.num_processes}) ({spec.source})"
        )
    return spec


def on_cloud_tpu_vm() -> bool:
    """libtpu is installed and the VM has a TPU device: JAX can read the slice from metadata."""
    has_device = os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio") and any(
        name.isdigit() for name in os.listdir("/dev/vfio")
    )
    return has_device and importlib.util.find_spec("libtpu") is not None


def resolve_cluster(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
    tpu_vm: bool | None = None,
) -> ClusterSpec:
    """Works out this process's place in the job without starting anything (pure but for TPU
    detection, which `tpu_vm` overrides)."""
    environ = os.environ if environ is None else environ
    explicit = (coordinator_address, num_processes, process_id)
    from_env = (
        environ.get(ENV_COORDINATOR) or None,
        environ.get(ENV_NUM_PROCESSES) or None,
        environ.get(ENV_PROCESS_ID) or None,
    )
    if any(v is not None for v in explicit + from_env):
        source = "flags" if any(v is not None for v in explicit) else "env"
        names = (
            ("coordinator_address", ENV_COORDINATOR),
            ("num_processes", ENV_NUM_PROCESSES),
            ("process_id", ENV_PROCESS_ID),
        )
        values = [a if a is not None else e for a, e in zip(explicit, from_env)]
        address, count, pid = values
        count = None if count is None else parse_int(count, "num_processes / " + ENV_NUM_PROCESSES)
        pid = None if pid is None else parse_int(pid, "process_id / " + ENV_PROCESS_ID)
        if count == 1 and pid in (None, 0):
            return ClusterSpec("single")
        missing = [f"{arg} (or ${env})" for (arg, env), v in zip(names, (address, count, pid))
                   if v is None]
        if missing:
            raise DistributedSetupError(
                f"multi-process start-up needs all of coordinator address, process count and "
                f"process id; missing: {', '.join(missing)}"
            )
        _check_address(address, "coordinator_address / " + ENV_COORDINATOR)
        return _validated(ClusterSpec(source, address, count, pid))
    if "SLURM_STEP_NODELIST" in environ and "SLURM_NTASKS" in environ:
        return _slurm_spec(environ)
    if on_cloud_tpu_vm() if tpu_vm is None else tpu_vm:
        return ClusterSpec("tpu", None, None, None)
    return ClusterSpec("single")
