"""launch/seqio_cache.sh caches a task with Beam's DirectRunner; the cached task yields the same
examples as the task read from records."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import seqio

import tasks
from sbs_jax.data import pipeline, synthetic

SCRIPT = str(pathlib.Path(__file__).resolve().parents[1] / "launch" / "seqio_cache.sh")
TASK = "synthetic_label_gt"


def _run(*args, env=None):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_help_and_missing_arguments():
    assert "DataflowRunner" in _run("--help").stdout
    result = _run("--tasks", TASK)
    assert result.returncode == 2 and "--output_cache_dir" in result.stderr


def test_cached_task_yields_the_same_examples(tmp_path):
    data_dir, cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    synthetic.ensure_dataset(data_dir, vocabulary_path=os.path.join(data_dir, "spiece.model"))
    result = _run("--tasks", TASK, "--output_cache_dir", cache_dir, "--data_dir", data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(os.path.join(cache_dir, TASK, "COMPLETED"))

    tasks.set_data_dir(data_dir)
    seqio.add_global_cache_dirs([cache_dir])
    try:
        tasks.register_all()  # fresh Task objects look the cache up again
        lengths = {"inputs": 64, "targets": 16}
        fresh = pipeline.load_tokenized(TASK, "test", lengths)
        cached = pipeline.load_tokenized(TASK, "test", lengths, use_cached=True)
    finally:
        seqio.set_global_cache_dirs([])
        tasks.register_all()
        tasks.set_data_dir(None)
    assert sorted(cached) == sorted(fresh) and len(fresh) == synthetic.DEFAULT_SIZES["test"]
    for example_id in fresh:
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(cached[example_id][key], fresh[example_id][key])
        assert cached[example_id]["inputs_pretokenized"] == fresh[example_id][
            "inputs_pretokenized"]
    with pytest.raises(AssertionError, match="does not exist in any of the task cache"):
        seqio.get_mixture_or_task(TASK).get_dataset(lengths, split="test", use_cached=True)
