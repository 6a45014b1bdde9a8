"""The student model: T5 configs (config.py), the Flax module (t5.py, built from layers.py), HF
interop (hf.py)."""

from sbs_jax.models.config import config_from_json, config_to_json
from sbs_jax.models.hf import CheckpointError, load_hf, save_hf
from sbs_jax.models.t5 import (
    T5,
    T5Config,
    abstract_params,
    config_from_params,
    config_names,
    get_config,
    init_params,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "T5",
    "CheckpointError",
    "T5Config",
    "abstract_params",
    "config_from_json",
    "config_from_params",
    "config_names",
    "config_to_json",
    "get_config",
    "init_params",
    "load_hf",
    "save_hf",
    "stack_layers",
    "unstack_layers",
]
