"""launch/seqio_cache.sh caches tasks with Beam's DirectRunner; a cached task yields the same
examples as the task read from records, USE_CACHED_TASKS trains from the cache, and the run
records the cache so eval --model_dir finds it without the flag."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import seqio
from conftest import fresh_env

import tasks
from sbs_jax.data import pipeline, synthetic
from sbs_jax.train import run_files
from tasks import config as tasks_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(REPO_ROOT / "launch" / "seqio_cache.sh")
TASK = "synthetic_label_gt"
RATIONALE_TASK = "synthetic_rationale"


def _run(*args, env=None):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})},
                          check=False)


def test_help_shows_the_beam_runners():
    assert "DataflowRunner" in _run("--help").stdout


def test_a_missing_output_folder_is_refused():
    result = _run("--tasks", TASK)
    assert result.returncode == 2 and "--output_cache_dir" in result.stderr


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(data folder, cache folder): the synthetic dataset and its label and rationale tasks
    cached by the launcher."""
    root = tmp_path_factory.mktemp("seqio_cache")
    data_dir, cache_dir = str(root / "data"), str(root / "cache")
    synthetic.ensure_dataset(data_dir, vocabulary_path=os.path.join(data_dir, "spiece.model"))
    result = _run("--tasks", f"{TASK},{RATIONALE_TASK}", "--output_cache_dir", cache_dir,
                  "--data_dir", data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return data_dir, cache_dir


def test_cached_task_yields_the_same_examples(cached):
    data_dir, cache_dir = cached
    assert os.path.exists(os.path.join(cache_dir, TASK, "COMPLETED"))

    tasks.set_data_dir(data_dir)
    seqio.add_global_cache_dirs([cache_dir])
    try:
        tasks.register_all()  # fresh Task objects look the cache up again
        lengths = {"inputs": 64, "targets": 16}
        fresh = pipeline.load_tokenized(TASK, "test", lengths)
        from_cache = pipeline.load_tokenized(TASK, "test", lengths, use_cached=True)
    finally:
        seqio.set_global_cache_dirs([])
        tasks.register_all()
        tasks.set_data_dir(None)
    assert sorted(from_cache) == sorted(fresh) and len(fresh) == synthetic.DEFAULT_SIZES["test"]
    for example_id in fresh:
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(from_cache[example_id][key], fresh[example_id][key])
        assert from_cache[example_id]["inputs_pretokenized"] == fresh[example_id][
            "inputs_pretokenized"]
    with pytest.raises(AssertionError, match="does not exist in any of the task cache"):
        seqio.get_mixture_or_task(TASK).get_dataset(lengths, split="test", use_cached=True)


def test_training_reads_the_cache_with_use_cached_tasks(cached, tmp_path):
    """USE_CACHED_TASKS: train and eval read the cache alone (the data folder keeps its
    info.json and vocabulary but no record shard)."""
    data_dir, cache_dir = cached
    no_shards = tmp_path / "data"
    shutil.copytree(data_dir, no_shards, ignore=shutil.ignore_patterns("*.tfrecord"))
    assert not list(no_shards.rglob("*.tfrecord"))
    env = {**os.environ, "SBS_DATA_DIR": str(no_shards), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    model_dir = tmp_path / "run"
    command = [sys.executable, "-m", "sbs_jax.train", "--gin_file=gin/quickstart.gin",
               "--gin.USE_CACHED_TASKS=True", f"--gin.MODEL_DIR='{model_dir}'",
               "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=2",
               "--gin_bindings=RunConfig.warmup_steps=0",
               "--gin_bindings=RunConfig.eval_max_examples=8",
               '--gin.TASK_FEATURE_LENGTHS={"inputs": 16, "targets": 8}',
               ('--gin.RunConfig.model_overrides={"emb_dim": 32, "num_heads": 2, "head_dim": 16, '
                '"mlp_dim": 64, "num_encoder_layers": 1, "num_decoder_layers": 1}')]
    missing = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=300, check=False)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert f"task {TASK!r} is not in any seqio cache folder" in missing.stderr
    assert "--seqio_additional_cache_dirs" in missing.stderr
    assert not (model_dir / "checkpoints").exists()

    trained = subprocess.run([*command, f"--seqio_additional_cache_dirs={cache_dir}"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
                             check=False)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    summary = json.loads((model_dir / "run_summary.json").read_text())
    assert summary["step"] == 2 and summary["eval_metrics"]["num_examples"] == 8
    assert json.loads((model_dir / "run_config.json").read_text())["use_cached_tasks"] is True
    recorded = json.loads((model_dir / run_files.DATA_CONFIG_FILE).read_text())
    assert recorded["seqio_cache_dirs"] == [cache_dir]
    # The run recorded its cache: eval --model_dir needs no flag, even in a fresh shell.
    evaluated = subprocess.run(
        [sys.executable, "-m", "sbs_jax.eval", "--model_dir", str(model_dir), "--split", "test",
         "--max_examples", "8", "--output", str(tmp_path / "test.json")],
        cwd=tmp_path, env=fresh_env(tmp_path), capture_output=True, text=True, timeout=600,
        check=False)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-3000:]
    assert f"seqio cache: the run's {cache_dir}" in evaluated.stderr
    assert json.loads((tmp_path / "test.json").read_text())["num_examples"] == 8


def test_a_run_records_its_cache_and_a_flag_chooses_another(tmp_path):
    """eval/infer --model_dir search the run's seqio cache folders unless
    --seqio_additional_cache_dirs named some; the job leaves seqio's folders as it found them."""
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    run_files.pin(str(model_dir), None, str(tmp_path / "data"), ["cache_a", "gs://b/cache"])
    recorded = json.loads((model_dir / run_files.DATA_CONFIG_FILE).read_text())
    assert recorded["seqio_cache_dirs"] == [os.path.abspath("cache_a"), "gs://b/cache"]
    assert seqio.get_global_cache_dirs() == []
    with tasks_config.overrides_restored():
        run_files.use_run_data(str(model_dir))
        assert seqio.get_global_cache_dirs() == recorded["seqio_cache_dirs"]
    assert seqio.get_global_cache_dirs() == []
    seqio.set_global_cache_dirs(["/flag/cache"])  # as --seqio_additional_cache_dirs puts it
    try:
        with tasks_config.overrides_restored():
            assert not any("seqio cache" in n for n in run_files.use_run_data(str(model_dir)))
            assert seqio.get_global_cache_dirs() == ["/flag/cache"]
    finally:
        seqio.set_global_cache_dirs([])
    run_files.pin(str(model_dir), None, None)  # a run that read no cache records none
    assert "seqio_cache_dirs" not in json.loads(
        (model_dir / run_files.DATA_CONFIG_FILE).read_text())
