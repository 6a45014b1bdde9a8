"""Launchers: the commands they would run (dry runs), their argument checks, and the SLURM and
plain multi-node paths run for real on 127.0.0.1 through a stand-in `srun`."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import socket
import stat
import subprocess
import sys
import tarfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"
TPU_ARGS = ["--name", "sbs-v4", "--project", "my-proj", "--zone", "us-central2-b",
            "--accelerator_type", "v4-32"]


@pytest.fixture()
def fake_gcloud(tmp_path):
    """A `gcloud` first on PATH that records any call: a dry run must make none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud_calls"
    script = bin_dir / "gcloud"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               TMPDIR=str(tmp_path))
    env.pop("SBS_DRY_RUN", None)
    return env, calls


@pytest.fixture(scope="module")
def tracked_gin_file() -> str:
    """A gin file git tracks (tpu_pod.sh ships only tracked files and refuses others)."""
    tracked = subprocess.run(["git", "ls-files", "gin"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    gin_files = [f for f in tracked if f.endswith(".gin")]
    if not gin_files:
        pytest.skip("no gin file is tracked yet")
    return "gin/quickstart.gin" if "gin/quickstart.gin" in gin_files else gin_files[0]


def _run(cmd, env, **kwargs):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=60,
                          cwd=kwargs.pop("cwd", REPO_ROOT), **kwargs)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.strip().splitlines()]


def test_tpu_pod_dry_run_v4_32(fake_gcloud, tracked_gin_file, tmp_path):
    env, calls = fake_gcloud
    result = _run(["bash", str(LAUNCH / "tpu_pod.sh"), *TPU_ARGS, "--gin_file", tracked_gin_file,
                   "--model_dir", "gs://bucket/sbs/run1", "--gin.TRAIN_STEPS=100",
                   "--gin_bindings=ALPHA=0.5", "--dry_run"], env)
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), "a dry run called gcloud"
    create, ship, scp, unpack, install, train = _commands(result.stdout)
    where = ["--project=my-proj", "--zone=us-central2-b"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sbs-v4", *where,
                      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[-1] == "--worker=all" and scp[6] == "sbs-v4:sbs_jax_code.tar.gz"
    for ssh in (unpack, install, train):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sbs-v4"]
        assert ssh[6:9] == [*where, "--worker=all"] and ssh[9].startswith("--command=")
    assert "scripts/setup_env.sh tpu" in install[9]  # pip install -c requirements.lock -e '.[tpu]'
    remote_train = shlex.split(train[9].removeprefix("--command="))
    start = remote_train.index("-m")
    assert remote_train[start - 1: start + 2] == [".venv/bin/python", "-m", "sbs_jax.train"]
    assert "JAX_COMPILATION_CACHE_DIR=gs://bucket/sbs/run1/jax_compilation_cache" in remote_train
    assert remote_train[start + 2: start + 6] == [
        f"--gin_file={tracked_gin_file}", '--gin.MODEL_DIR="gs://bucket/sbs/run1"',
        "--gin.TRAIN_STEPS=100", "--gin_bindings=ALPHA=0.5"]
    assert "tensorboard --logdir gs://bucket/sbs/run1" in result.stderr

    # The shipping command, run here, packs exactly the tracked files.
    assert subprocess.run(ship, env=env, check=False, timeout=60).returncode == 0
    with tarfile.open(scp[5]) as tar:
        names = set(tar.getnames())
    assert {"sbs_jax/runtime/distributed.py", "launch/tpu_pod.sh", tracked_gin_file} <= names
    assert not any(n.startswith(".venv") for n in names)


def test_tpu_pod_v5e_spot_teardown(fake_gcloud, tracked_gin_file):
    env, calls = fake_gcloud
    args = ["--name", "pod", "--project", "p", "--zone", "us-west4-a",
            "--accelerator_type=v5e-16", f"--gin_file={tracked_gin_file}",
            "--model_dir=gs://b/r", "--spot", "--teardown", "--skip_install", "--dry_run"]
    result = _run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], env)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert "--accelerator-type=v5litepod-16" in commands[0]
    assert "--version=v2-alpha-tpuv5-lite" in commands[0] and "--spot" in commands[0]
    assert not any("setup_env.sh" in " ".join(c) for c in commands)
    assert commands[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod",
                            "--project=p", "--zone=us-west4-a", "--quiet"]
    only = _run(["bash", str(LAUNCH / "tpu_pod.sh"), "--name", "pod", "--project", "p",
                 "--zone", "us-west4-a", "--teardown_only", "--dry_run"], env)
    assert _commands(only.stdout) == [commands[-1]]
    assert not calls.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--name is required"),
        (["--name", "Bad_Name"], "must be lowercase letters"),
        (["--name", "x", "--zone", "us-central2-b"], "--project is required"),
        (["--name", "x", "--project", "p", "--zone", "central"], "does not look like a zone"),
        (["--name", "x", "--project", "p", "--zone", "us-central2-b"],
         "--accelerator_type is required"),
        (TPU_ARGS[:-1] + ["v3-8"], "must be v4-N, v5e-N"),
        (TPU_ARGS, "--gin_file is required"),
        (TPU_ARGS + ["--gin_file", "gin/missing.gin"], "not found in"),
        (TPU_ARGS + ["--gin_file", "/abs/x.gin"], "must be relative to the checkout"),
        (TPU_ARGS + ["--gin_file", ".git/HEAD"], "not tracked by git"),
        (TPU_ARGS + ["--gin_file", "pyproject.toml"], "--model_dir gs://... is required"),
        (TPU_ARGS + ["--gin_file", "pyproject.toml", "--model_dir", "/local/dir"],
         "must be a gs:// path"),
        (TPU_ARGS + ["--gin_file", "pyproject.toml", "--model_dir", "gs://b/r",
                     "--gin.MODEL_DIR='gs://x'"], "give the model directory as --model_dir"),
        (TPU_ARGS + ["--bogus"], "unknown argument '--bogus'"),
        (["--name", "x", "--project"], "--project needs a value"),
    ],
)
def test_tpu_pod_bad_arguments_fail_clearly(fake_gcloud, args, message):
    env, calls = fake_gcloud
    result = _run(["bash", str(LAUNCH / "tpu_pod.sh"), *args, "--dry_run"], env)
    assert result.returncode == 2
    assert message in result.stderr and result.stdout == ""
    assert not calls.exists()


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_slurm.sbatch", "gpu_multinode.sh",
                                    "local_multihost.sh"])
def test_every_launcher_answers_help(script):
    result = _run(["bash", str(LAUNCH / script), "--help"], dict(os.environ))
    assert result.returncode == 0 and "sbs_jax.train" in result.stdout + result.stderr


def test_slurm_dry_run_prints_srun_of_the_trainer(tmp_path):
    env = dict(os.environ, SBS_DRY_RUN="1", SLURM_JOB_ID="77", SLURM_NTASKS="16",
               SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(REPO_ROOT),
               JAX_COMPILATION_CACHE_DIR=f"{tmp_path}/jax_cache")
    result = _run(["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--gin_file=gin/sbs_large.gin",
                   "--gin.MODEL_DIR='/shared/run 1'"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (command,) = _commands(result.stdout)
    assert command == ["srun", "--kill-on-bad-exit=1", f"--chdir={REPO_ROOT}", "env",
                       f"JAX_COMPILATION_CACHE_DIR={tmp_path}/jax_cache",
                       f"{REPO_ROOT}/.venv/bin/python", "-m", "sbs_jax.train",
                       "--gin_file=gin/sbs_large.gin", "--gin.MODEL_DIR='/shared/run 1'"]
    assert "16 processes on 2 nodes" in result.stderr


def test_slurm_outside_a_job_and_without_arguments_fail_clearly():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBS_"))}
    no_args = _run(["bash", str(LAUNCH / "gpu_slurm.sbatch")], env)
    assert no_args.returncode == 2 and "pass the training arguments" in no_args.stderr
    no_job = _run(["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--gin_file=x.gin"],
                  dict(env, SBS_PYTHON=sys.executable))
    assert no_job.returncode == 2 and "not inside a SLURM job" in no_job.stderr


# A stand-in for SLURM's srun (outside us): starts SLURM_NTASKS local copies of the command with
# the per-task variables a real step sets, on one "node" called localhost.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do
  case "$1" in --chdir=*) cd "${1#--chdir=}" ;; esac
  shift
done
pids=()
for (( i = 0; i < SLURM_NTASKS; i++ )); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 \
    "$@" > "$SRUN_LOG_DIR/task_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                "JAX_PROCESS_ID"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               SBS_ENTRY_MODULE="sbs_jax.cli.cluster_check", SBS_INIT_TIMEOUT_S="60")
    env.update(extra)
    return env


def _reports(log_dir: pathlib.Path, pattern: str) -> list[dict]:
    logs = sorted(log_dir.glob(pattern))
    return [json.loads(p.read_text().strip().splitlines()[-1]) for p in logs]


def test_slurm_script_starts_processes_from_the_slurm_environment(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = _cpu_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SRUN_LOG_DIR=str(tmp_path),
                   SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
                   SLURM_SUBMIT_DIR=str(REPO_ROOT), SBS_PYTHON=sys.executable,
                   JAX_COORDINATOR_PORT=str(_free_port()))
    result = _run(["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--rounds", "2"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + "".join(
        p.read_text() for p in tmp_path.glob("task_*.log"))
    reports = _reports(tmp_path, "task_*.log")
    assert [r["process_index"] for r in reports] == [0, 1]
    assert all(r["source"] == "slurm" and r["global_devices"] == 8 for r in reports)
    assert all(r["sum"] == r["expected"] == 12.0 for r in reports)


def test_gpu_multinode_two_nodes_on_localhost(tmp_path):
    port = _free_port()
    env = _cpu_env()
    dry = _run(["bash", str(LAUNCH / "gpu_multinode.sh"), "--coordinator", f"127.0.0.1:{port}",
                "--num_nodes", "2", "--node_rank", "1", "--python", sys.executable, "--dry_run",
                "--", "--rounds", "2"], env)
    cache = pathlib.Path(env.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    assert _commands(dry.stdout) == [[
        "env", f"JAX_COORDINATOR_ADDRESS=127.0.0.1:{port}", "JAX_NUM_PROCESSES=2",
        "JAX_PROCESS_ID=1", f"JAX_COMPILATION_CACHE_DIR={cache}/sbs_jax/jax_compilation_cache",
        sys.executable, "-m", "sbs_jax.cli.cluster_check", "--rounds", "2"]]
    procs = []
    for rank in range(2):
        with open(tmp_path / f"node_{rank}.log", "w") as log:
            procs.append(subprocess.Popen(
                ["bash", str(LAUNCH / "gpu_multinode.sh"), "--coordinator",
                 f"127.0.0.1:{port}", "--num_nodes", "2", "--node_rank", str(rank),
                 "--python", sys.executable, "--", "--rounds", "2"],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"node_{r}.log").read_text() for r in range(2)]
    reports = _reports(tmp_path, "node_*.log")
    assert [r["source"] for r in reports] == ["env", "env"]
    assert all(r["sum"] == r["expected"] == 12.0 for r in reports)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_nodes", "2", "--node_rank", "0"], "--coordinator must be HOST:PORT"),
        (["--coordinator", "h:1", "--num_nodes", "0", "--node_rank", "0"], "--num_nodes must be"),
        (["--coordinator", "h:1", "--num_nodes", "2", "--node_rank", "2"],
         "--node_rank must be in 0..1"),
        (["--coordinator", "h:1", "--num_nodes", "2", "--node_rank", "0", "--what"],
         "unknown argument '--what'"),
    ],
)
def test_gpu_multinode_bad_arguments(args, message):
    result = _run(["bash", str(LAUNCH / "gpu_multinode.sh"), *args, "--", "x"], dict(os.environ))
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "0", "-d", "4"], "-n NUM_PROCESSES must be a positive integer"),
        (["-n", "2"], "-d DEVICES_PER_PROCESS must be a positive integer"),
        (["-n", "2", "-d", "4", "--port", "70000"], "--port must be 1-65535"),
        (["-n", "2", "-d", "4", "--gin_file=x"], "unknown argument '--gin_file=x'"),
    ],
)
def test_local_multihost_bad_arguments(args, message):
    result = _run(["bash", str(LAUNCH / "local_multihost.sh"), *args], dict(os.environ))
    assert result.returncode == 2 and message in result.stderr


def test_local_multihost_dry_run(tmp_path):
    result = _run(["bash", str(LAUNCH / "local_multihost.sh"), "-n", "2", "-d", "4", "--port",
                   "4321", "--log_dir", str(tmp_path / "logs"), "--dry_run", "--",
                   "--gin_file=gin/quickstart.gin", "--gin.MODEL_DIR='/tmp/m'"],
                  dict(os.environ, PYTHON="python", JAX_COMPILATION_CACHE_DIR="/tmp/c"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and not (tmp_path / "logs").exists()
    for index, line in enumerate(lines):
        words = shlex.split(line.removesuffix("&"))
        assert words[:8] == ["env", "JAX_PLATFORMS=cpu",
                             "XLA_FLAGS=--xla_force_host_platform_device_count=4",
                             "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321", "JAX_NUM_PROCESSES=2",
                             f"JAX_PROCESS_ID={index}", "JAX_COMPILATION_CACHE_DIR=/tmp/c",
                             "PYTHONUNBUFFERED=1"]
        assert words[8:13] == ["python", "-m", "sbs_jax.train", "--gin_file=gin/quickstart.gin",
                               "--gin.MODEL_DIR='/tmp/m'"]


def _recorder(bin_dir: pathlib.Path, name: str, calls: pathlib.Path, body: str = "exit 0") -> None:
    """A stand-in `name` on PATH (outside us: gcloud, srun, python) that logs its arguments."""
    script = bin_dir / name
    script.write_text(f"#!/usr/bin/env bash\necho \"{name} $*\" >> {calls}\n{body}\n")
    script.chmod(0o755)


LAUNCHERS = ["tpu_pod.sh", "gpu_slurm.sbatch", "gpu_multinode.sh", "local_multihost.sh",
             "seqio_cache.sh"]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_every_launcher_prints_usage_not_its_own_lines(script):
    result = _run(["bash", str(LAUNCH / script), "--help"], dict(os.environ))
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stdout
    for script_line in ("set -euo", "$#", "esac", "#!/"):
        assert script_line not in result.stdout


@pytest.mark.parametrize("script, args", [
    ("tpu_pod.sh", TPU_ARGS + ["--gin_file=pyproject.toml", "--model_dir=gs://b/r"]),
    ("gpu_slurm.sbatch", ["--gin_file=x.gin"]),
    ("gpu_multinode.sh", ["--coordinator", "h:1", "--num_nodes", "1", "--node_rank", "0",
                          "--python", "python", "--", "--gin_file=x.gin"]),
    ("local_multihost.sh", ["-n", "2", "-d", "1", "--port", "4321", "--", "--rounds", "1"]),
    ("seqio_cache.sh", ["--tasks", "synthetic_label_gt", "--output_cache_dir", "CACHE"]),
])
def test_sbs_dry_run_runs_nothing_in_every_launcher(script, args, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for name in ("gcloud", "srun", "python", "sbatch"):
        _recorder(bin_dir, name, calls)
    args = [a.replace("CACHE", str(tmp_path / "cache")) for a in args]
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SBS_DRY_RUN="1",
               PYTHON="python", SBS_PYTHON="python", SLURM_JOB_ID="1", TMPDIR=str(tmp_path),
               SLURM_SUBMIT_DIR=str(REPO_ROOT))
    result = _run(["bash", str(LAUNCH / script), *args], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "a dry run prints what it would run"
    assert not calls.exists(), calls.read_text()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args, message", [
    (["--tasks"], "--tasks needs a value"),
    (["--tasks", "--output_cache_dir", "c"], "--tasks needs a value"),
    (["--tasks", "t", "--output_cache_dir"], "--output_cache_dir needs a value"),
    (["--tasks", "t"], "--output_cache_dir is required"),
    (["--tasks", "t", "--output_cache_dir", "c", "--min_shards", "0"],
     "--min_shards must be a positive integer"),
    (["--tasks", "t", "--output_cache_dir", "c", "--what"], "unknown argument '--what'"),
])
def test_seqio_cache_checks_its_flags(args, message):
    result = _run(["bash", str(LAUNCH / "seqio_cache.sh"), *args], dict(os.environ))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "unbound variable" not in result.stderr


def _fake_cloud(tmp_path, slice_exists: bool, train_status: int = 0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "gcloud_calls"
    _recorder(bin_dir, "gcloud", calls, body=(
        f'[[ "$*" == *" describe "* ]] && exit {0 if slice_exists else 1}\n'
        f'[[ "$*" == *sbs_jax.train* ]] && exit {train_status}\nexit 0'))
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               TMPDIR=str(tmp_path))
    env.pop("SBS_DRY_RUN", None)
    return env, calls


@pytest.mark.parametrize("slice_exists, train_status", [(True, 0), (False, 0), (False, 3)])
def test_tpu_pod_teardown_deletes_only_a_slice_it_created(tmp_path, tracked_gin_file,
                                                          slice_exists, train_status):
    env, calls = _fake_cloud(tmp_path, slice_exists, train_status)
    result = _run(["bash", str(LAUNCH / "tpu_pod.sh"), *TPU_ARGS, "--gin_file", tracked_gin_file,
                   "--model_dir", "gs://b/r", "--skip_install", "--teardown"], env)
    assert result.returncode == train_status, result.stderr
    made = [line for line in calls.read_text().splitlines() if " create sbs-v4 " in line]
    deleted = [line for line in calls.read_text().splitlines() if " delete sbs-v4 " in line]
    assert len(made) == len(deleted) == (0 if slice_exists else 1)
    if slice_exists:
        assert "not deleting slice sbs-v4: this command did not create it" in result.stderr


def _tarball(path: pathlib.Path, files: dict[str, str]) -> None:
    source = path.parent / "src"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_text(text)
            tar.add(source / name, arcname=name)


def test_tpu_pod_code_sync_replaces_only_what_it_shipped(tmp_path, fake_gcloud, tracked_gin_file):
    env, _ = fake_gcloud
    result = _run(["bash", str(LAUNCH / "tpu_pod.sh"), *TPU_ARGS, "--gin_file", tracked_gin_file,
                   "--model_dir", "gs://b/r", "--dry_run"], env)
    sync = _commands(result.stdout)[3][9].removeprefix("--command=")
    home = tmp_path / "home"
    home.mkdir()
    worker = dict(os.environ, HOME=str(home))

    def sync_now():
        return subprocess.run(["bash", "-c", sync], env=worker, capture_output=True, text=True,
                              timeout=60, check=False)

    _tarball(home / "sbs_jax_code.tar.gz", {"a.py": "1", "pkg/b.py": "1", "old.py": "1"})
    first = sync_now()
    assert first.returncode == 0, first.stderr
    code = home / "sbs-jax"
    (code / ".venv").mkdir()
    (code / ".venv" / "python").write_text("kept")
    (code / "results.txt").write_text("mine")
    (code / "a.py").write_text("edited on the worker")
    _tarball(home / "sbs_jax_code.tar.gz", {"a.py": "2", "pkg/b.py": "2"})
    second = sync_now()
    assert second.returncode == 0, second.stderr
    assert "2 tracked files written" in second.stderr and "1 it had shipped" in second.stderr
    assert not (code / "old.py").exists()
    assert (code / "a.py").read_text() == "2" and (code / "pkg" / "b.py").read_text() == "2"
    assert (code / "results.txt").read_text() == "mine"
    assert (code / ".venv" / "python").read_text() == "kept"

    # A folder the launcher did not make is not touched at all.
    (home / "sbs-jax" / ".sbs-shipped").unlink()
    third = sync_now()
    assert third.returncode == 3 and "was not made by tpu_pod.sh" in third.stderr
    assert (code / "pkg" / "b.py").exists() and (code / "results.txt").exists()
