"""benchmarks/memory.py: compile-only memory accounting of a run's train step and decoding on a
virtual 2x2x2 CPU mesh, from the gin files alone (no data)."""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = {"dtype", "scan_layers", "remat_policy", "num_microbatches", "batch_size",
        "feature_lengths", "peak_bytes_per_device", "device_memory_bytes", "fits", "compile_s",
        "train_step", "generate"}
PROGRAM_KEYS = {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes",
                "compile_s"}


def _account(tmp_path, batch_size: int, *flags: str) -> dict:
    out = tmp_path / f"memory_{batch_size}.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "memory.py"),
         "--gin_file=gin/sbs_small.gin", "--gin_bindings=RunConfig.model_name = 't5_1_1_tiny'",
         ("--gin_bindings=RunConfig.model_overrides = {'vocab_size': 256, 'dtype': 'bfloat16', "
          "'num_encoder_layers': 1, 'num_decoder_layers': 1}"),
         "--gin_bindings=RunConfig.eval_batch_size = 8",
         "--gin_bindings=RunConfig.max_decode_len = 4",
         f"--gin.BATCH_SIZE={batch_size}",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8, 'rationale_targets': 16}",
         "--mesh_shape=2,2,2", "--device_memory_gb=0.001", f"--json_out={out}", *flags],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| train_step |" in result.stdout
    return json.loads(out.read_text())


def test_memory_of_the_step_and_decoding_grows_with_the_batch(tmp_path):
    small, large = _account(tmp_path, 8), _account(tmp_path, 64, "--no_generate")
    assert "generate" not in large
    for result in (small, large):
        assert KEYS - {"generate"} <= set(result)
        for program in {"train_step", "generate"} & set(result):
            assert PROGRAM_KEYS <= set(result[program])
            stats = result[program]
            assert stats["peak_bytes"] == (stats["argument_bytes"] + stats["output_bytes"]
                                           - stats["alias_bytes"] + stats["temp_bytes"])
        assert result["mesh_shape"] == [2, 2, 2] and result["dtype"] == "bfloat16"
        assert result["feature_lengths"] == {"inputs": 32, "targets": 8, "rationale_targets": 16}
        # The donated train state is reused for the new one.
        assert result["train_step"]["alias_bytes"] > 0
        assert result["device_memory_bytes"] == 1_000_000
        assert result["fits"] == (result["peak_bytes_per_device"] <= 0.9 * 1_000_000)
    assert small["batch_size"] == 8 and large["batch_size"] == 64
    assert large["train_step"]["temp_bytes"] > small["train_step"]["temp_bytes"]
    assert large["train_step"]["peak_bytes"] > small["train_step"]["peak_bytes"]
    # The parameters and optimizer state do not depend on the batch.
    assert large["train_step"]["alias_bytes"] == small["train_step"]["alias_bytes"]
