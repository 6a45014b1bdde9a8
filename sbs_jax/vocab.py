"""`sbs_jax.vocab.train_vocab`, kept at this path for callers outside the package; the
vocabulary code lives in `sbs_jax.data.vocab`."""

from sbs_jax.data.vocab import train_vocab

__all__ = ["train_vocab"]
