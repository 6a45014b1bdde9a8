"""`sbs_jax.losses.sbs_loss`, kept at this path for callers outside the package; the losses
live in `sbs_jax.train.losses`."""

from sbs_jax.train.losses import sbs_loss

__all__ = ["sbs_loss"]
