"""Optimizers and learning-rate schedules (thin, explicit layers over optax).

The paper's reference recipe is AdamW with weight decay 0 (optax's default is 1e-4, so it is
set explicitly), lr 5e-5 decaying linearly to 0 with no warmup, and global-norm clipping at 1.0;
Adafactor with T5X's defaults is the T5X-style alternative. Gradient accumulation is not done
here: the train step sums token losses over micro-batches and divides once (see sbs_jax.train.step),
which optax.MultiSteps (a mean of per-micro-batch means) would not reproduce.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "warmup_rsqrt", "rsqrt_decay", "linear", "cosine")
OPTIMIZERS = ("adamw", "adafactor")


def make_schedule(
    name: str = "linear",
    learning_rate: float = 5e-5,
    total_steps: int = 10_000,
    warmup_steps: int = 0,
    end_value: float = 0.0,
) -> optax.Schedule:
    """A schedule from its name.

    - `constant`: `learning_rate` (after an optional linear warmup from 0).
    - `warmup_rsqrt`: linear warmup, then `learning_rate * sqrt(warmup_steps / step)` (T5's
      inverse square root decay, continuous at the end of warmup).
    - `rsqrt_decay`: `learning_rate / sqrt(max(step, warmup_steps))`, T5X's
      `constant * rsqrt_decay` (its pretrain default with learning_rate 1.0 and warmup_steps
      10,000: a constant 0.01 for 10k steps, no linear warmup, then 1/sqrt(step)). Here
      warmup_steps is the plateau and may exceed total_steps.
    - `linear`: linear warmup, then linear decay to `end_value` at `total_steps` (HF's
      `get_linear_schedule_with_warmup`, the reference's schedule).
    - `cosine`: linear warmup, then cosine decay to `end_value` at `total_steps`.
    """
    if name not in SCHEDULES:
        raise ValueError(f"make_schedule.name={name!r} is not one of {SCHEDULES}")
    if name == "rsqrt_decay":
        if warmup_steps <= 0:
            raise ValueError("make_schedule.name='rsqrt_decay' needs warmup_steps > 0 "
                             "(the steps of constant learning_rate / sqrt(warmup_steps))")
        return lambda count: learning_rate / jnp.sqrt(jnp.maximum(count, warmup_steps))
    if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise ValueError(
            f"make_schedule needs 0 <= warmup_steps <= total_steps and total_steps > 0; "
            f"got warmup_steps={warmup_steps}, total_steps (TRAIN_STEPS)={total_steps}"
        )
    if name == "warmup_rsqrt" and warmup_steps == 0:
        raise ValueError("make_schedule.name='warmup_rsqrt' needs warmup_steps > 0")
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else None
    decay_steps = total_steps - warmup_steps
    if name == "constant":
        after = optax.constant_schedule(learning_rate)
    elif name == "warmup_rsqrt":

        def after(count):
            return learning_rate * (warmup_steps / (count + warmup_steps)) ** 0.5

    elif name == "linear":
        after = optax.linear_schedule(learning_rate, end_value, max(decay_steps, 1))
    else:
        after = optax.cosine_decay_schedule(
            learning_rate, max(decay_steps, 1), alpha=end_value / learning_rate
        )
    if warmup is None:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    schedule: optax.Schedule,
    name: str = "adamw",
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    adafactor_decay_rate: float = 0.8,
    adafactor_clipping_threshold: float | None = 1.0,
    adafactor_multiply_by_parameter_scale: bool = True,
) -> optax.GradientTransformation:
    """AdamW (torch/HF defaults: betas 0.9/0.999, eps 1e-8) or Adafactor (T5X defaults).

    `clip_norm` clips the global gradient norm before the optimizer (None: no clipping; T5X's
    Adafactor has none). Adafactor as `t5x.adafactor.Adafactor()`: second moments decayed with
    1 - (step + 1)^-0.8, factored over the two largest dims when the smaller is >= 128,
    epsilon1 1e-30 added to the squared gradient, each update's RMS clipped at 1.0, step size
    relative to the parameter's RMS (at least 1e-3), no momentum, no weight decay by default.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"make_optimizer.name={name!r} is not one of {OPTIMIZERS}")
    if name == "adamw":
        core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        core = optax.adafactor(
            schedule,
            decay_rate=adafactor_decay_rate,
            clipping_threshold=adafactor_clipping_threshold,
            multiply_by_parameter_scale=adafactor_multiply_by_parameter_scale,
            weight_decay_rate=weight_decay or None,
            min_dim_size_to_factor=128,
            eps=1e-30,
            factored=True,
        )
    if clip_norm is None:
        return core
    return optax.chain(optax.clip_by_global_norm(clip_norm), core)
