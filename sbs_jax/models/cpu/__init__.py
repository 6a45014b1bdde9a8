"""What only the CPU backend uses, kept apart from the model: the general layers know nothing of
it. `training_model(config)` is the one way in (the train loop calls it)."""

from sbs_jax.models.cpu.training import training_model

__all__ = ["training_model"]
