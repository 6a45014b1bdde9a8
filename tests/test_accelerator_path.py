"""The GPU benchmark path (bench_sbs_step.py --batches, hf_peer.py, accelerator_check.sh) runs on
a host with only jax, flax, optax, orbax, torch and transformers: it imports no TensorFlow,
SeqIO, gin, sentencepiece or clu."""

import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ABSENT = ("tensorflow", "seqio", "gin", "sentencepiece", "clu", "tensorflow_text",
          "tensorflow_datasets")

# Makes the packages absent (None in sys.modules: imports fail, find_spec probes say "not
# installed") and refuses any submodule import that gets past that, then loads every module the
# benchmark path uses, directly or lazily, and runs the peer's step and decode on a tiny model.
SCRIPT = f"""
import importlib.abc, sys
ABSENT = {ABSENT!r}

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Absent())
for name in ABSENT:
    sys.modules[name] = None
sys.path[:0] = [{str(REPO_ROOT)!r}, {str(REPO_ROOT / "benchmarks")!r}]
import bench_sbs_step, flops, hf_peer, peak, step_sweep
from sbs_jax import decoding, models
from sbs_jax.runtime import malloc
from sbs_jax.train import optim, partitioning, step
from sbs_jax.models import hf
config = models.get_config("t5_1_1_tiny", vocab_size=128)
views = hf_peer.random_views(128, 2, 8, 2, 4)
model = hf_peer.hf_model(config)
hf_peer.train_fn(model, views, 0.5, False)()
out = {{}}
hf_peer.decode_fn(model, views["label"]["encoder_input_tokens"], 3, False, out, "hf")()
assert out["hf"].shape == (2, 3), out["hf"].shape
loaded = sorted(k for k, v in sys.modules.items() if k.split(".")[0] in ABSENT and v is not None)
assert not loaded, loaded
print("ok")
"""


def test_gpu_benchmark_path_imports_no_tensorflow_seqio_or_gin():
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_accelerator_check_answers_help():
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "accelerator_check.sh"),
                             "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and "--tiny" in result.stdout
