"""sbs-jax: Distilling Step-by-Step in JAX/Flax with T5X/SeqIO conventions.

Importing the package quiets TensorFlow's C++ start-up logging; modules that need TensorFlow
import it through `sbs_jax.runtime.tf_setup` so TF never claims a GPU that JAX needs.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
