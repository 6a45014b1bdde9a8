"""`sbs_jax.checkpoints.latest_step` and `load_params`, kept at this path for callers outside
the package; checkpointing lives in `sbs_jax.train.checkpoints` and
`sbs_jax.train.checkpoint_steps`."""

from sbs_jax.train.checkpoint_steps import latest_step
from sbs_jax.train.checkpoints import load_params

__all__ = ["latest_step", "load_params"]
