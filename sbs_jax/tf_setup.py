"""Import TensorFlow the way sbs-jax needs it: quiet, and with every GPU hidden from it.

TensorFlow is only our input pipeline (SeqIO, tf.data, TFRecords). If it initialised CUDA it
would reserve most of the GPU memory that JAX needs for training, so GPUs are hidden from TF
before it touches them. Import `tf` from here instead of `import tensorflow as tf`.
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    # Devices were already initialised by an earlier import; nothing more can be done here.
    pass

# absl/TF python-side warnings (e.g. apitools notices from beam) are noise for our users.
logging.getLogger("tensorflow").setLevel(logging.ERROR)

__all__ = ["tf"]
