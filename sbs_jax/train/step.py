"""The pure, sharded train step of distilling step-by-step (and the standard modes).

One jitted step does both views of the same examples: forward the label batch and the
rationale batch, `alpha * mean(label) + (1 - alpha) * mean(rationale)` with each mean over its
own real target tokens (`losses.sbs_loss`), gradients, optimizer update. Gradient accumulation
splits the batch into micro-batches, counts each task's target tokens over the whole batch first
and gives those counts to every micro-batch's `sbs_loss`, so the summed gradients equal the big
step's.

Randomness is `fold_in(PRNGKey(seed), step)`: a resumed run draws the same dropout masks as an
uninterrupted one. State buffers are donated; parameters, optimizer state and batches have
explicit shardings on the (data, fsdp, model) mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sbs_jax import models
from sbs_jax.train import losses
from sbs_jax.train.partitioning import Partitioner, TrainState

Batch = Mapping[str, Any]
VIEWS = ("label", "rationale")
BATCH_KEYS = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)
# Present in packed batches only (`PairedBatches(pack=True)`), as in T5X's packed features.
SEGMENT_KEYS = ("encoder_segment_ids", "decoder_segment_ids")


def _batch_keys(batch: Batch) -> tuple[str, ...]:
    return BATCH_KEYS + tuple(k for k in SEGMENT_KEYS if k in batch)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step computes besides the model: the objective and its numerics."""

    alpha: float = 0.5
    num_microbatches: int = 1
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    seed: int = 0


def check_batch_size(batch_size: int, mesh: Mesh, num_microbatches: int) -> None:
    """Raises a ValueError naming BATCH_SIZE when it cannot be split as configured.

    (Every process's share divides evenly too: processes own whole blocks of the data axes.)
    """
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for what, divisor in (
        (f"the data axes of MESH_SHAPE (data x fsdp = {data_shards})", data_shards),
        (f"num_microbatches ({num_microbatches})", num_microbatches),
        (f"num_microbatches x data shards ({num_microbatches * data_shards})",
         num_microbatches * data_shards),
    ):
        if batch_size <= 0 or batch_size % divisor:
            raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by {what}")


def global_batch(local: Batch, sharding: NamedSharding, global_rows: int) -> dict:
    """Global arrays of `global_rows` rows from this process's rows
    (`jax.make_array_from_process_local_data`; processes that share a batch block feed the
    same rows)."""
    out = {}
    for key in _batch_keys(local):
        rows = np.asarray(local[key])
        out[key] = jax.make_array_from_process_local_data(
            sharding, rows, (global_rows, *rows.shape[1:]))
    return out


def abstract_batch(sharding: NamedSharding, rows: int, input_length: int, target_length: int,
                   packed: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one view's global batch (int32 features, `packed` adds the segment ids), to
    lower a step for a given batch size and lengths without any data."""
    def spec(length):
        return jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding)

    out = {"encoder_input_tokens": spec(input_length), "decoder_input_tokens": spec(target_length),
           "decoder_target_tokens": spec(target_length),
           "decoder_loss_weights": spec(target_length)}
    if packed:
        out.update(encoder_segment_ids=spec(input_length), decoder_segment_ids=spec(target_length))
    return out


def _split_microbatches(batch: Batch, num_microbatches: int, sharding) -> dict:
    """[B, L] -> [M, B/M, L], row r in micro-batch r % M so each device's rows stay local."""

    def split(x):
        y = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        y = jnp.swapaxes(y, 0, 1)
        spec = PartitionSpec(None, *sharding.spec)
        return jax.lax.with_sharding_constraint(y, NamedSharding(sharding.mesh, spec))

    return {k: split(batch[k]) for k in _batch_keys(batch)}


def _logits(model: nn.Module, params: Any, batch: Batch, rng: jax.Array) -> jax.Array:
    return model.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        enable_dropout=True,
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        rngs={"dropout": rng},
    )


def loss_and_grads(
    model: nn.Module, params: Any, batches: Mapping[str, Batch], rng: jax.Array,
    options: StepOptions, batch_sharding: NamedSharding, params_shardings: Any = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of `losses.sbs_loss` over all micro-batches, and its logged parts.

    Each micro-batch's loss divides its token sums by the whole batch's token counts, so the
    micro-batch losses and gradients add up to those of the large batch.
    """
    views = [v for v in VIEWS if batches.get(v) is not None]
    totals = {v: jnp.sum(batches[v]["decoder_loss_weights"].astype(jnp.float32)) for v in views}
    micro = {v: _split_microbatches(batches[v], options.num_microbatches, batch_sharding)
             for v in views}

    def objective(p, mb_index):
        batch, logits = {}, {}
        for i, view in enumerate(views):
            batch[view] = {k: v[mb_index] for k, v in micro[view].items()}
            key = jax.random.fold_in(jax.random.fold_in(rng, i), mb_index)
            logits[view] = _logits(model, p, batch[view], key)
        total, parts = losses.sbs_loss(
            logits["label"], batch["label"], logits.get("rationale"), batch.get("rationale"),
            options.alpha, options.label_smoothing, options.z_loss,
            loss_normalizing_factors=totals)
        return total, {"loss": total, **parts}

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def sharded(tree):
        if params_shardings is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, params_shardings)

    def body(carry, mb_index):
        # With fsdp, XLA would hoist the (loop-invariant) all-gathers of the parameters out of
        # the loop, so every gathered kernel would stay live for the whole loop. The carried
        # parameters stay at their shardings, and the barrier ties them to the loop index
        # (an identity), so each micro-batch gathers the kernels it uses and frees them.
        grads, metrics, loop_params = carry
        loop_params, _ = jax.lax.optimization_barrier((loop_params, mb_index))
        (_, mb_metrics), mb_grads = grad_fn(sharded(loop_params), mb_index)
        grads = sharded(jax.tree.map(jnp.add, grads, mb_grads))
        metrics = jax.tree.map(jnp.add, metrics, mb_metrics)
        return (grads, metrics, loop_params), None

    if options.num_microbatches == 1:  # no loop: keeps the common step's program simple
        (_, metrics), grads = grad_fn(params, 0)
    else:
        _, metric_shapes = jax.eval_shape(objective, params, 0)
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        zero_grads = sharded(jax.tree.map(jnp.zeros_like, params))
        (grads, metrics, _), _ = jax.lax.scan(
            body, (zero_grads, zero_metrics, sharded(params)),
            jnp.arange(options.num_microbatches)
        )
    metrics.update({f"{view}_tokens": totals[view] for view in views})
    return grads, metrics


def train_step(
    state: TrainState, batches: Mapping[str, Batch], *, model: nn.Module,
    tx: optax.GradientTransformation, schedule: optax.Schedule, options: StepOptions,
    batch_sharding: NamedSharding, params_shardings: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the paired batches (pure; jit it with `make_train_step`)."""
    rng = jax.random.fold_in(jax.random.PRNGKey(options.seed), state.step)
    grads, metrics = loss_and_grads(model, state.params, batches, rng, options, batch_sharding,
                                    params_shardings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    # A finite loss with a non-finite update (e.g. an overflowing learning rate) still ruins the
    # parameters, so the loop checks this too before it saves them.
    metrics["update_norm"] = optax.global_norm(updates)
    metrics["learning_rate"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(
    partitioner: Partitioner, model: nn.Module, tx: optax.GradientTransformation,
    schedule: optax.Schedule, options: StepOptions,
) -> Any:
    """`train_step` jitted with explicit shardings, the incoming state's buffers donated.
    Call or `.lower(...)` it inside `partitioner.context()` (`make_train_step` does that)."""
    step = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, options=options,
        batch_sharding=partitioner.batch_sharding,
        params_shardings=partitioner.params_shardings,
    )
    return jax.jit(
        step,
        in_shardings=(partitioner.state_shardings(tx), partitioner.batch_sharding),
        out_shardings=(partitioner.state_shardings(tx), partitioner.replicated),
        donate_argnums=(0,),
    )


def make_train_step(
    partitioner: Partitioner, model: nn.Module, tx: optax.GradientTransformation,
    schedule: optax.Schedule, options: StepOptions,
) -> Callable[[TrainState, Mapping[str, Batch]], tuple[TrainState, dict]]:
    """The jitted step (`jit_train_step`) run under the partitioner's mesh and rules."""
    jitted = jit_train_step(partitioner, model, tx, schedule, options)

    def run(state, batches):
        with partitioner.context():
            return jitted(state, batches)

    return run


def init_state(
    partitioner: Partitioner, config: models.T5Config, tx: optax.GradientTransformation,
    seed: int, params: Any | None = None,
) -> TrainState:
    """A fresh state on the mesh: random params from `seed`, or the given (host) params."""
    shardings = partitioner.state_shardings(tx)

    def make(rng, given):
        p = given if given is not None else models.init_params(config, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    with partitioner.context():
        if params is None:
            return jax.jit(lambda r: make(r, None), out_shardings=shardings)(
                jax.random.PRNGKey(seed)
            )
        params = jax.device_put(params, partitioner.params_shardings)
        return jax.jit(lambda p: make(None, p), out_shardings=shardings)(params)
