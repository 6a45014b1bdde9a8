"""Exact resume: SIGKILL mid-run, then SIGTERM (preemption), then finish == one clean run."""

import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from sbs_jax import checkpoints

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 20
FLAGS = ["--gin_file=gin/quickstart.gin", "--gin.MESH_SHAPE=(2, 2, 2)",
         f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_PERIOD=4", "--gin.EVAL_PERIOD=0",
         "--gin.BATCH_SIZE=16", "--gin_bindings=RunConfig.warmup_steps=2",
         "--gin_bindings=RunConfig.log_period=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    env["SBS_DATA_DIR"] = str(tmp_path_factory.mktemp("resume_data"))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    # Runs of one test compile the same programs: a shared persistent cache saves the repeats.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _command(model_dir):
    return [sys.executable, "-m", "sbs_jax.train", *FLAGS, f"--gin.MODEL_DIR='{model_dir}'"]


def _run_until(model_dir, env, sig, need_checkpoint):
    """Starts training and sends `sig` at the first progress line (once a checkpoint is
    finalised, with `need_checkpoint`). Returns (exit code, output)."""
    proc = subprocess.Popen(_command(model_dir), cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        ready = not need_checkpoint or checkpoints.latest_step(str(model_dir)) is not None
        if " | loss " in line and ready:  # a progress line
            proc.send_signal(sig)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=300), "".join(lines)


def test_sigkill_and_sigterm_then_resume_is_bitwise_equal(tmp_path, env):
    clean = tmp_path / "clean"
    done = subprocess.run(_command(clean), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    interrupted = tmp_path / "interrupted"
    rc, out = _run_until(interrupted, env, signal.SIGKILL, need_checkpoint=True)
    assert rc == -signal.SIGKILL, out[-2000:]
    killed_at = checkpoints.latest_step(str(interrupted))
    assert killed_at is not None and killed_at < STEPS
    assert not (interrupted / "run_summary.json").exists()

    rc, out = _run_until(interrupted, env, signal.SIGTERM, need_checkpoint=False)
    assert rc == 143, out[-2000:]
    assert f"steps {killed_at}->{STEPS}" in out
    saved_line = [line for line in out.splitlines() if "SIGTERM: checkpoint" in line]
    assert saved_line, out[-2000:]
    term_step = int(saved_line[0].split("checkpoint of step ")[1].split(" ")[0])
    assert killed_at < term_step < STEPS
    assert checkpoints.latest_step(str(interrupted)) == term_step

    resumed = subprocess.run(_command(interrupted), cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=400, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"steps {term_step}->{STEPS}" in resumed.stdout

    want = checkpoints.load_params(str(clean), STEPS)
    got = checkpoints.load_params(str(interrupted), STEPS)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        assert np.array_equal(a, b), f"parameter {jax.tree_util.keystr(path)} differs"
