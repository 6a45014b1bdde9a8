"""Token losses for T5 targets and the distilling step-by-step objective.

Everything here is a pure function of logits and a T5X feature-converter batch
(`decoder_target_tokens`, `decoder_loss_weights`). Each task's loss is its token sum divided by
its token count, and `sbs_loss` mixes the two tasks' means: the paper's objective is
`alpha * mean_label + (1 - alpha) * mean_rationale`, never a sum over both batches (long
rationales would dominate it). The counts can be given (T5X's loss normalizing factor): the
trainer passes the whole batch's counts to each micro-batch, so the micro-batch losses add up to
the large-batch loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLossSums(NamedTuple):
    """Sums over the real target tokens of one batch."""

    loss: jax.Array  # cross entropy (incl. label smoothing and z-loss) summed over tokens
    z_loss: jax.Array  # the z-loss part of `loss`, for logging
    num_tokens: jax.Array  # sum of decoder_loss_weights


def _smoothing_constant(num_classes: int, label_smoothing: float) -> float:
    """Entropy of the smoothed target distribution, so a perfect prediction has loss 0."""
    if label_smoothing == 0.0:
        return 0.0
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (num_classes - 1)
    return -(confidence * math.log(confidence) + (num_classes - 1) * low * math.log(low + 1e-20))


def token_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy [batch, len] and its z-loss part, computed in float32.

    z-loss adds `z_loss * log(Z)**2` (Z the softmax normaliser), as in T5X/PaLM, to keep logits
    from drifting. Label smoothing spreads `label_smoothing` over the other classes and subtracts
    the target distribution's entropy.
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    target_log_prob = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), -1)[
        ..., 0
    ]
    if label_smoothing > 0.0:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (num_classes - 1)
        mean_log_prob = jnp.sum(log_probs, axis=-1)
        smoothed = confidence * target_log_prob + low * (mean_log_prob - target_log_prob)
        loss = -smoothed - _smoothing_constant(num_classes, label_smoothing)
    else:
        loss = -target_log_prob
    z_term = z_loss * jnp.square(log_z)
    return loss + z_term, z_term


def token_loss_sums(
    logits: jax.Array,
    batch: Mapping[str, jax.Array],
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> TokenLossSums:
    """Token sums of the loss over the real targets of `batch` (weights from the batch)."""
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    loss, z_term = token_cross_entropy(
        logits, batch["decoder_target_tokens"], label_smoothing, z_loss
    )
    return TokenLossSums(jnp.sum(loss * weights), jnp.sum(z_term * weights), jnp.sum(weights))


def mean_loss(sums: TokenLossSums) -> jax.Array:
    """Token mean; 0 for a batch with no real targets rather than NaN."""
    return sums.loss / jnp.maximum(sums.num_tokens, 1.0)


def sbs_loss(
    label_logits: jax.Array,
    label_batch: Mapping[str, jax.Array],
    rationale_logits: jax.Array | None,
    rationale_batch: Mapping[str, jax.Array] | None,
    alpha: float,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_normalizing_factors: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The distilling step-by-step loss: each task's token mean over its own real targets.

    Returns `(total, {"label_loss", "rationale_loss"})`, plus the z-loss part of each
    (`label_z_loss`, `rationale_z_loss`) when `z_loss` is on. With `rationale_logits=None`
    (standard fine-tuning / distillation) the total is the label loss alone.
    `loss_normalizing_factors` (`{"label": n, "rationale": m}`) replaces each task's own token
    count as its divisor.
    """
    views = {"label": (label_logits, label_batch)}
    if rationale_logits is not None:
        if rationale_batch is None:
            raise ValueError("sbs_loss got rationale_logits without a rationale_batch")
        views["rationale"] = (rationale_logits, rationale_batch)
    sums = {view: token_loss_sums(logits, batch, label_smoothing, z_loss)
            for view, (logits, batch) in views.items()}
    if loss_normalizing_factors is not None:
        sums = {view: s._replace(num_tokens=loss_normalizing_factors[view])
                for view, s in sums.items()}
    parts = {f"{view}_loss": mean_loss(s) for view, s in sums.items()}
    if z_loss:
        parts.update({f"{view}_z_loss": s.z_loss / jnp.maximum(s.num_tokens, 1.0)
                      for view, s in sums.items()})
    if rationale_logits is None:
        return parts["label_loss"], parts
    return alpha * parts["label_loss"] + (1.0 - alpha) * parts["rationale_loss"], parts
