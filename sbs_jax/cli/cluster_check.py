"""`sbs-cluster-check` (`python -m sbs_jax.cli.cluster_check`): a cluster smoke test.

Starts like `sbs-train` does (`sbs_jax.runtime.distributed.initialize_from_env`), then sums a
value over every device of every process: run it under the same launcher before a long job.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from sbs_jax.runtime import distributed


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
        prog="sbs-cluster-check",
        description="Cluster smoke test: start like sbs_jax.train does, then sum a value over "
        "every device of every process and print one JSON line per process: source (flags, env, "
        "the launcher JAX detected: slurm, ompi, tpu, k8s; or single), then the process index "
        "and count and the device counts as JAX reports them.",
    )
    parser.add_argument(
        "--coordinator_address", help=f"HOST:PORT of process 0 (${distributed.ENV_COORDINATOR})"
    )
    parser.add_argument(
        "--num_processes", type=int, help=f"processes in the job (${distributed.ENV_NUM_PROCESSES})"
    )
    parser.add_argument("--process_id", type=int,
                        help=f"this process, 0-based (${distributed.ENV_PROCESS_ID})")
    parser.add_argument("--rounds", type=int, default=1, help="how many sums to run")
    parser.add_argument("--interval_s", type=float, default=0.0, help="pause between rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        spec = distributed.initialize_from_env(args.coordinator_address, args.num_processes,
                                               args.process_id)
    except distributed.DistributedSetupError as err:
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
