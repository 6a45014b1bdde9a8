"""Multi-process JAX on 127.0.0.1: start-up rules, a cross-process sum, and dying processes.

The subprocess tests start real JAX processes (2 x 4 CPU devices) through
launch/local_multihost.sh or directly, the way a cluster would.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sbs_jax.runtime.distributed import (
    ClusterSpec,
    DistributedSetupError,
    batch_shard_layout,
    resolve_cluster,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO_ROOT / "launch" / "local_multihost.sh"


# --- whether and how to start (pure) -----------------------------------------------------------


def _slurm_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4100", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[007-008]",
           "SLURM_STEP_NUM_NODES": "2"}
    env.update(extra)
    return env


def test_single_process_when_nothing_is_set():
    assert resolve_cluster(environ={}, tpu_vm=False) == ClusterSpec("single")
    assert not resolve_cluster(environ={"JAX_NUM_PROCESSES": "1"}, tpu_vm=False).is_multiprocess


def test_single_task_of_a_launcher_is_a_single_process():
    for env in (_slurm_env(SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0"),
                {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}):
        assert resolve_cluster(environ=env, tpu_vm=False) == ClusterSpec("single")


def test_jax_environment_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert resolve_cluster(environ=env, tpu_vm=False) == ClusterSpec("env", "10.0.0.1:1234", 4, 3)


def test_explicit_arguments_override_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    spec = resolve_cluster("host-a:99", 2, 1, environ=env, tpu_vm=False)
    assert spec == ClusterSpec("flags", "host-a:99", 2, 1)


def test_launchers_are_left_to_jax_detection():
    # JAX reads the coordinator, count and id from the launcher's variables itself.
    assert resolve_cluster(environ=_slurm_env(), tpu_vm=False) == ClusterSpec(
        "slurm", None, None, None)
    ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"}
    assert resolve_cluster(environ=ompi, tpu_vm=False) == ClusterSpec("ompi", None, None, None)
    assert resolve_cluster(environ={}, tpu_vm=True) == ClusterSpec("tpu", None, None, None)


def test_jax_variables_win_over_launchers_and_may_leave_the_rest_to_them():
    env = _slurm_env(JAX_COORDINATOR_ADDRESS="n1:7", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
    assert resolve_cluster(environ=env, tpu_vm=True).source == "env"
    # a coordinator of one's own choosing; SLURM supplies the process count and id
    partial = resolve_cluster(environ=_slurm_env(JAX_COORDINATOR_ADDRESS="n1:7"), tpu_vm=False)
    assert partial == ClusterSpec("env", "n1:7", None, None)


def test_slurm_one_task_per_node_sees_all_its_gpus():
    # JAX alone would give each task the GPU of its local rank, here GPU 0 only.
    env = _slurm_env(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
    spec = resolve_cluster(environ=dict(env, CUDA_VISIBLE_DEVICES="0,1,2,3"), tpu_vm=False)
    assert spec.local_device_ids == (0, 1, 2, 3)
    spec = resolve_cluster(environ=dict(env, SLURM_GPUS_ON_NODE="8"), tpu_vm=False)
    assert spec.local_device_ids == tuple(range(8))
    spec = resolve_cluster(environ=dict(env, JAX_LOCAL_DEVICE_IDS="2,3"), tpu_vm=False)
    assert spec.local_device_ids is None  # JAX reads that variable itself


def test_slurm_one_task_per_gpu_keeps_jax_choice_unless_slurm_narrowed_it():
    assert resolve_cluster(environ=_slurm_env(CUDA_VISIBLE_DEVICES="0,1,2,3"),
                           tpu_vm=False).local_device_ids is None
    # --gpus-per-task=1: the task's only GPU is device 0, whatever its local rank
    narrowed = resolve_cluster(environ=_slurm_env(CUDA_VISIBLE_DEVICES="5"), tpu_vm=False)
    assert narrowed.local_device_ids == (0,)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "missing: coordinator_address"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "missing: process_id"),
        ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
         "must be HOST:PORT"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
         r"process_id=2 must be in \[0, 2\)"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
         "JAX_NUM_PROCESSES='two' is not an integer"),
        (_slurm_env(SLURM_NTASKS="eight"), "SLURM_NTASKS='eight' is not an integer"),
    ],
)
def test_inconsistent_settings_fail_clearly(env, message):
    with pytest.raises(DistributedSetupError, match=message):
        resolve_cluster(environ=env, tpu_vm=False)


def _grid(num_processes: int, mesh_shape: tuple[int, int, int]) -> np.ndarray:
    """Process index of each mesh device, devices in jax.devices() order (process 0 first)."""
    per_process = int(np.prod(mesh_shape)) // num_processes
    return np.repeat(np.arange(num_processes), per_process).reshape(mesh_shape)


@pytest.mark.parametrize(
    "num_processes, mesh_shape, layouts",
    [
        (2, (8, 1, 1), [(0, 2), (1, 2)]),
        (2, (2, 2, 2), [(0, 2), (1, 2)]),
        (4, (2, 4, 1), [(0, 4), (1, 4), (2, 4), (3, 4)]),
        # model axis spanning processes: both halves of a model replica read the same rows
        (4, (2, 1, 4), [(0, 2), (0, 2), (1, 2), (1, 2)]),
        (2, (1, 1, 8), [(0, 1), (0, 1)]),
    ],
)
def test_batch_shard_layout(num_processes, mesh_shape, layouts):
    grid = _grid(num_processes, mesh_shape)
    assert [batch_shard_layout(grid, p) for p in range(num_processes)] == layouts


def test_batch_shard_layout_rejects_interleaved_processes():
    with pytest.raises(DistributedSetupError, match=r"process 0 holds batch rows \[0, 2\]"):
        batch_shard_layout(np.array([0, 1, 0, 1]).reshape(4, 1, 1), 0)
    overlapping = np.array([0, 0, 0, 1, 1, 1, 1, 1]).reshape(4, 1, 2)
    with pytest.raises(DistributedSetupError, match="not one aligned block|overlapping"):
        batch_shard_layout(overlapping, 1)


# --- real processes ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_the_rest(procs: list[subprocess.Popen]) -> None:
    """Kills (and reaps) the processes of a test that are still running."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _process_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"))}
    env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env.update(extra)
    return env


def test_two_processes_sum_over_all_eight_devices(tmp_path):
    result = subprocess.run(
        ["bash", str(LAUNCHER), "-n", "2", "-d", "4", "--module", "sbs_jax.cli.cluster_check",
         "--log_dir", str(tmp_path), "--", "--rounds", "2"],
        env=_process_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    reports = []
    for index in range(2):
        last_line = (tmp_path / f"process_{index}.log").read_text().strip().splitlines()[-1]
        reports.append(json.loads(last_line))
    assert [r["process_index"] for r in reports] == [0, 1]
    for report in reports:
        assert report["process_count"] == 2 and report["source"] == "env"
        assert report["local_devices"] == 4 and report["global_devices"] == 8
        # each device contributes its process index + 1: 4 * 1 + 4 * 2
        assert report["sum"] == report["expected"] == 12.0


# The per-task variables each launcher sets (SLURM `srun -n 2`, Open MPI `mpirun -np 2`), for
# two tasks on 127.0.0.1; JAX's own detection reads them.
LAUNCHER_VARIABLES = {
    "slurm": lambda rank: {
        "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank), "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_STEP_NUM_NODES": "1"},
    "ompi": lambda rank: {
        "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911",
        "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank)},
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHER_VARIABLES))
def test_processes_find_each_other_from_the_launchers_variables(launcher):
    port = _free_port()
    procs = []
    try:
        for rank in range(2):
            env = _process_env(JAX_COORDINATOR_PORT=str(port), SBS_INIT_TIMEOUT_S="60",
                               **LAUNCHER_VARIABLES[launcher](rank))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sbs_jax.cli.cluster_check"], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        _kill_the_rest(procs)
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["process_index"] for r in reports] == [0, 1]  # the launcher's ranks
    for report in reports:
        assert report["source"] == launcher and report["process_count"] == 2
        assert report["sum"] == report["expected"] == 12.0


def _wait_for_rounds(log: pathlib.Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and "round 2:" in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no progress in {log}:\n{log.read_text() if log.exists() else ''}")


@pytest.mark.parametrize("victim", [0, 1])
def test_survivor_exits_with_clear_error_when_a_process_dies(tmp_path, victim):
    port = _free_port()
    procs, logs = [], []
    for index in range(2):
        logs.append(tmp_path / f"p{index}.log")
        env = _process_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                           JAX_PROCESS_ID=str(index), SBS_HEARTBEAT_TIMEOUT_S="10")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sbs_jax.cli.cluster_check", "--rounds", "100000",
                 "--interval_s", "0.05"], env=env, stdout=log, stderr=subprocess.STDOUT))
    survivor = procs[1 - victim]
    try:
        _wait_for_rounds(logs[1 - victim])
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = survivor.wait(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        _kill_the_rest(procs)
    assert returncode != 0
    # bounded by the 10 s heartbeat (plus start-up noise on a loaded machine), not a hang
    assert elapsed < 60, elapsed
    assert "another task died" in logs[1 - victim].read_text()


def test_launcher_stops_the_rest_when_one_process_dies(tmp_path):
    launcher = subprocess.Popen(
        ["bash", str(LAUNCHER), "-n", "2", "-d", "4", "--module", "sbs_jax.cli.cluster_check",
         "--log_dir", str(tmp_path), "--", "--rounds", "100000", "--interval_s", "0.05"],
        env=_process_env(SBS_HEARTBEAT_TIMEOUT_S="60"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for_rounds(tmp_path / "process_0.log")
        pids = [int((tmp_path / f"process_{i}.pid").read_text()) for i in range(2)]
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    assert "process 1 exited with status 137; stopping the others" in stderr
    # faster than the 60 s heartbeat: the launcher itself stopped process 0
    assert elapsed < 30, elapsed
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_unreachable_coordinator_is_a_clear_bounded_error():
    env = _process_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1", SBS_INIT_TIMEOUT_S="2")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sbs_jax.cli.cluster_check"], env=env,
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2
    assert "did not answer within 2s (SBS_INIT_TIMEOUT_S)" in result.stderr
    assert "Is process 0 running" in result.stderr
    assert time.monotonic() - started < 30


# --- the trainer on 2 processes x 4 devices ----------------------------------------------------

TRAIN_FLAGS = [
    "--gin_file=gin/quickstart.gin", "--gin.BATCH_SIZE=16", "--gin.CHECKPOINT_PERIOD=2",
    "--gin.RunConfig.log_period=1",
    # evaluation at the last step: decoding sharded over both processes' devices, 12 rows
    # padded to 16 for the 8 batch shards
    "--gin.EVAL_PERIOD=4", "--gin.RunConfig.eval_max_examples=12",
    "--gin.RunConfig.eval_batch_size=12", "--gin.RunConfig.max_decode_len=4",
    # a schedule that does not depend on TRAIN_STEPS, so a run stopped at step 2 and resumed to
    # step 4 follows the same path as one that ran straight to step 4
    "--gin.RunConfig.schedule='constant'", "--gin.RunConfig.warmup_steps=0",
    # smaller than the quickstart model and one length bucket per view: compiling the train step
    # is most of this test's time
    '--gin.TASK_FEATURE_LENGTHS={"inputs": 16, "targets": 8}',
    ('--gin.RunConfig.model_overrides={"emb_dim": 32, "num_heads": 2, "head_dim": 16, '
     '"mlp_dim": 64, "num_encoder_layers": 1, "num_decoder_layers": 1, "dropout_rate": 0.0}'),
]


def _step_losses(log_text: str) -> dict[int, tuple[float, float, float]]:
    """{step: (loss, label, rationale)} from the trainer's progress lines."""
    losses = {}
    for line in log_text.splitlines():
        line = line.split(" ", 2)[-1]  # after the time stamp
        if line.startswith("step ") and "| loss" in line:
            fields = dict(part.strip().split(" ", 1) for part in line.split("|"))
            step = int(fields["step"].split("/")[0])
            losses[step] = (float(fields["loss"]), float(fields["label"]),
                            float(fields["rationale"]))
    return losses


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory):
    """One single-process (8 devices) run to step 4, and a 2 x 4 run to step 2 resumed to 4."""
    root = tmp_path_factory.mktemp("multihost_train")
    # The resumed run reuses the first run's compiled programs from JAX's persistent cache. The
    # heartbeat is generous: this test is about equal losses, and a loaded 2-core CI machine can
    # starve a process's heartbeat thread for a minute (failure detection is tested above).
    env = _process_env(SBS_DATA_DIR=str(root / "data"), SBS_HEARTBEAT_TIMEOUT_S="240",
                       JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    single_dir, multi_dir = root / "single", root / "multi"
    single = subprocess.run(
        [sys.executable, "-m", "sbs_jax.train", *TRAIN_FLAGS, "--gin.TRAIN_STEPS=4",
         f"--gin.MODEL_DIR='{single_dir}'"],
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, check=False)
    assert single.returncode == 0, single.stdout + single.stderr
    phases = []
    for steps in (2, 4):
        log_dir = root / f"logs_to_{steps}"
        launched = subprocess.run(
            ["bash", str(LAUNCHER), "-n", "2", "-d", "4", "--log_dir", str(log_dir), "--",
             *TRAIN_FLAGS, f"--gin.TRAIN_STEPS={steps}", f"--gin.MODEL_DIR='{multi_dir}'"],
            env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, check=False)
        process_0 = (log_dir / "process_0.log").read_text()
        assert launched.returncode == 0, launched.stderr + process_0
        phases.append(process_0)
    return single.stdout, phases, multi_dir


def test_two_processes_train_resume_and_match_one_process(training_runs):
    single_log, (first_phase, resumed_phase), multi_dir = training_runs
    assert "mesh {'data': 8, 'fsdp': 1, 'model': 1} | steps 0->2" in first_phase
    assert "steps 2->4" in resumed_phase
    single = _step_losses(single_log)
    multi = {**_step_losses(first_phase), **_step_losses(resumed_phase)}
    assert sorted(single) == sorted(multi) == [1, 2, 3, 4]
    assert single[4][0] < single[1][0]  # it learns
    for step in single:
        # progress lines print 4 decimals; cross-process reductions differ only in rounding
        assert multi[step] == pytest.approx(single[step], abs=2e-3), step
    # both end with the same evaluation of the same 12 examples
    eval_line = re.compile(r"eval step 4 \(valid\): accuracy [0-9.]+%, num_examples 12")
    assert eval_line.search(single_log).group() == eval_line.search(resumed_phase).group()
    summary = json.loads((multi_dir / "run_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_devices"] == 8
    assert summary["resumed_from"] == 2 and summary["step"] == 4


def test_sigterm_to_one_process_checkpoints_every_process_at_one_step(tmp_path):
    """Preemption notices reach hosts at different times, or only one host: the save decision
    must still be the same step everywhere (orbax's save is collective)."""
    env = _process_env(SBS_DATA_DIR=str(tmp_path / "data"), SBS_HEARTBEAT_TIMEOUT_S="240")
    port, model_dir = _free_port(), tmp_path / "run"
    flags = [*TRAIN_FLAGS, "--gin.TRAIN_STEPS=100000", "--gin.EVAL_PERIOD=0",
             "--gin.CHECKPOINT_PERIOD=100000", f"--gin.MODEL_DIR='{model_dir}'"]
    procs, logs = [], [tmp_path / f"p{index}.log" for index in range(2)]
    for index in range(2):
        process_env = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
        with open(logs[index], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "sbs_jax.train", *flags],
                                          env=process_env, cwd=REPO_ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 400
        while "| loss" not in logs[0].read_text():  # both processes are stepping
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # process 0 never gets a signal
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        _kill_the_rest(procs)
    texts = [log.read_text() for log in logs]
    assert codes == [143, 143], texts[0][-3000:] + texts[1][-3000:]
    saved = re.search(r"SIGTERM: checkpoint of step (\d+) saved; exiting", texts[0])
    assert saved, texts[0][-3000:]
    step = int(saved.group(1))
    from sbs_jax.train import checkpoint_steps, checkpoints

    assert checkpoint_steps.all_steps(str(model_dir)) == [step]
    assert checkpoint_steps.latest_good_step(str(model_dir)) == step  # its checksums match
    assert set(checkpoints.load_params(str(model_dir), step)) >= {"encoder", "decoder"}
