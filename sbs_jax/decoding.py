"""`sbs_jax.decoding.generate`, kept at this path for callers outside the package; decoding
lives in `sbs_jax.infer.decoding`."""

from sbs_jax.infer.decoding import generate

__all__ = ["generate"]
