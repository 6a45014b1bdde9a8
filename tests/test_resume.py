"""Resume: SIGKILL mid-run, then SIGTERM (preemption), then finish == one clean run; a damaged
newest checkpoint is skipped by every command; one trainer per MODEL_DIR."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sbs_jax.cli import convert as convert_cli
from sbs_jax.cli import eval as eval_cli
from sbs_jax.cli import infer as infer_cli
from sbs_jax.train import checkpoint_steps, checkpoints, run_lock

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
        ready = not need_checkpoint or checkpoint_steps.latest_step(str(model_dir)) is not None
        if " | loss " in line and ready:  # a progress line
            proc.send_signal(sig)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=300), "".join(lines)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, env):
    """A run that went straight to step STEPS (checkpoints STEPS - 8, STEPS - 4, STEPS)."""
    clean = tmp_path_factory.mktemp("clean") / "run"
    done = subprocess.run(_command(clean), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert checkpoint_steps.all_steps(str(clean)) == [STEPS - 8, STEPS - 4, STEPS]
    return clean


def test_sigkill_and_sigterm_then_resume_is_bitwise_equal(tmp_path, env, clean_run):
    clean = clean_run
    interrupted = tmp_path / "interrupted"
    rc, out = _run_until(interrupted, env, signal.SIGKILL, need_checkpoint=True)
    assert rc == -signal.SIGKILL, out[-2000:]
    killed_at = checkpoint_steps.latest_step(str(interrupted))
    assert killed_at is not None and killed_at < STEPS
    assert not (interrupted / "run_summary.json").exists()

    rc, out = _run_until(interrupted, env, signal.SIGTERM, need_checkpoint=False)
    assert rc == 143, out[-2000:]
    assert f"steps {killed_at}->{STEPS}" in out
    saved_line = [line for line in out.splitlines() if "SIGTERM: checkpoint" in line]
    assert saved_line, out[-2000:]
    term_step = int(saved_line[0].split("checkpoint of step ")[1].split(" ")[0])
    assert killed_at < term_step < STEPS
    assert checkpoint_steps.latest_step(str(interrupted)) == term_step

    resumed = subprocess.run(_command(interrupted), cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=400, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"steps {term_step}->{STEPS}" in resumed.stdout

    want = checkpoints.load_params(str(clean), STEPS)
    got = checkpoints.load_params(str(interrupted), STEPS)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        assert np.array_equal(a, b), f"parameter {jax.tree_util.keystr(path)} differs"


def _damage_newest(model_dir, kind):
    """Truncates, or overwrites 8 bytes of, the largest array file of step STEPS's params."""
    target = max((model_dir / "checkpoints" / str(STEPS) / "params" / "d").iterdir(),
                 key=lambda path: path.stat().st_size)
    data = target.read_bytes()
    middle = len(data) // 2
    target.write_bytes(data[:middle] if kind == "truncated" else
                       data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8])
                       + data[middle + 8:])


def _skip_lines(text):
    return [line for line in text.splitlines() if "skipping damaged checkpoint" in line]


@pytest.mark.parametrize("kind", ["truncated", "overwritten"])
def test_a_damaged_newest_checkpoint_is_skipped_by_every_command(
        clean_run, env, tmp_path, kind, capsys, monkeypatch):
    good = STEPS - 4
    model_dir = tmp_path / "run"
    shutil.copytree(clean_run, model_dir)
    _damage_newest(model_dir, kind)
    monkeypatch.setenv("SBS_DATA_DIR", env["SBS_DATA_DIR"])
    flags = [*FLAGS, f"--gin.MODEL_DIR='{model_dir}'", "--split=test", "--max_examples=4"]
    capsys.readouterr()
    assert eval_cli.main([*flags, f"--output={tmp_path / 'eval.json'}"]) == 0
    assert f'"step": {good},' in (tmp_path / "eval.json").read_text()
    assert infer_cli.main([*flags, "--step=latest", f"--output={tmp_path / 'p.jsonl'}"]) == 0
    assert convert_cli.main(["--to=hf", f"--model_dir={model_dir}",
                             f"--hf_dir={tmp_path / 'hf'}"]) == 0
    captured = capsys.readouterr()
    assert f"4 predictions (step {good})" in captured.out
    # One line per process that looked at the step, naming it: readers leave the folder alone.
    assert len(_skip_lines(captured.err)) == 1
    assert str(model_dir / "checkpoints" / str(STEPS)) in captured.err
    assert checkpoint_steps.all_steps(str(model_dir)) == [STEPS - 8, good, STEPS]

    resumed = subprocess.run(_command(model_dir), cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=400, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"steps {good}->{STEPS}" in resumed.stdout
    lines = _skip_lines(resumed.stderr)
    moved = model_dir / checkpoint_steps.DAMAGED_SUBDIR / str(STEPS)
    assert len(lines) == 1 and lines[0].endswith(f"; moved to {moved}"), resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    assert checkpoint_steps.latest_good_step(str(model_dir)) == STEPS and moved.is_dir()
    # The same parameters as the run that was never damaged.
    want, got = (checkpoints.load_params(str(d), STEPS) for d in (clean_run, model_dir))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert np.array_equal(a, b)


def test_a_second_trainer_is_refused_until_the_first_dies(tmp_path, env, capsys):
    model_dir = tmp_path / "run"
    first = subprocess.Popen([*_command(model_dir), "--gin.TRAIN_STEPS=100000"], cwd=REPO_ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock_file = model_dir / run_lock.LOCK_FILE
        deadline = time.monotonic() + 300
        while not (lock_file.exists() and f"pid {first.pid} " in lock_file.read_text()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        from sbs_jax.cli import train as train_cli

        with pytest.raises(SystemExit) as refused:
            train_cli.main([*FLAGS, f"--gin.MODEL_DIR='{model_dir}'"])
        assert refused.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"sbs-train: error: MODEL_DIR={model_dir} is in use by another trainer "
            f"(pid {first.pid} on {socket.gethostname()}, holding {lock_file}); wait for it to "
            "finish, stop it, or use another MODEL_DIR")
    finally:
        first.kill()
        first.wait(timeout=60)
    with run_lock.RunLock(str(model_dir)).acquire():  # the kernel dropped the dead holder's lock
        assert f"pid {os.getpid()} " in lock_file.read_text()
