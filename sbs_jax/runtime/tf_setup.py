"""Import TensorFlow the way sbs-jax needs it: quiet, and with every GPU hidden from it.

TensorFlow is only our input pipeline (SeqIO, tf.data, TFRecords). If it initialised CUDA it
would reserve most of the GPU memory that JAX needs for training, so GPUs are hidden from TF
before it touches them. Import `tf` from here instead of `import tensorflow as tf`.

TF's C++ start-up lines (CUDA stub probing, CPU feature notices) are written before absl logging
is initialised, so TF_CPP_MIN_LOG_LEVEL cannot silence them. The import therefore runs with the
process's stderr (fd 2) captured; afterwards the captured text is written back without the lines
known to be start-up noise, so a real warning or error still shows.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Start-up lines of TF 2.x CPU/CUDA wheels that say nothing the user can act on.
STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc|cuda_platform\.cc|failed call to cuInit|cuda_diagnostics"
    r"|cpu_feature_guard\.cc|^To enable the following instructions:"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning"
    r"|oneDNN custom operations are on|computation placer already registered"
)


def drop_startup_noise(text: str) -> str:
    """`text` without TF's start-up noise lines."""
    kept = [line for line in text.splitlines(keepends=True) if not STARTUP_NOISE.search(line)]
    return "".join(kept)


@contextlib.contextmanager
def _stderr_filtered() -> Iterator[None]:
    """Captures fd 2 (C++ writes included) and writes back all but the start-up noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            # On a failed import every line may matter: show all of it.
            sys.stderr.write(text if failed else drop_startup_noise(text))
            sys.stderr.flush()


with _stderr_filtered():
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        # Devices were already initialised by an earlier import; nothing more can be done here.
        pass

# absl/TF python-side warnings (e.g. apitools notices from beam) are noise for our users.
logging.getLogger("tensorflow").setLevel(logging.ERROR)

__all__ = ["tf"]
