"""`sbs_jax.checkpoints.latest_step` and `load_params`, kept at this path for callers outside
the package; checkpointing lives in `sbs_jax.train.checkpoints`."""

from sbs_jax.train.checkpoints import latest_step, load_params

__all__ = ["latest_step", "load_params"]
