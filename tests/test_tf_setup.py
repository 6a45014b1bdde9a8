"""TensorFlow loads quietly: its C++ start-up lines are dropped, anything else still shows."""

import subprocess
import sys

from sbs_jax.runtime import tf_setup

CUDA_STUB_LINE = ("I0000 00:00:1795621432.911440   31669 cudart_stub.cc:31] Could not find cuda "
                  "drivers on your machine, GPU will not be used.\n")


def test_noise_lines_are_dropped_and_other_lines_kept():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
            "STDERR\n" + CUDA_STUB_LINE + "E0000 some_op.cc:12] a real error\n")
    assert tf_setup.drop_startup_noise(text) == "E0000 some_op.cc:12] a real error\n"


def test_library_imports_print_nothing_on_stderr():
    # train_loop pulls in seqio, clu and TF; on a fresh interpreter none of it may be noisy.
    code = "import sbs_jax.train.loop, tasks, sys; sys.stderr.write('done')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stderr == "done", result.stderr
