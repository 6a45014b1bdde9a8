"""Device mesh, T5X logical-axis rules and shardings of parameter / batch pytrees.

Pure helpers: the trainer builds a mesh from MESH_SHAPE, turns the model's logical axis names
into `NamedSharding`s with `params_shardings`, and places batches with `batch_sharding`.
`Partitioner` gathers them for one model: the shardings of its params, optimizer state and
`TrainState`, and the mesh context the step is traced in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sbs_jax.models import T5Config, abstract_params

MESH_AXES = ("data", "fsdp", "model")


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all); one -1 takes what remains."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in mesh_shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"MESH_SHAPE={tuple(mesh_shape)} must have {len(MESH_AXES)} entries "
                         f"{MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"MESH_SHAPE={tuple(mesh_shape)}: use positive sizes and at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"MESH_SHAPE={tuple(mesh_shape)} does not divide the "
                             f"{len(devices)} available devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"MESH_SHAPE={tuple(mesh_shape)} needs {int(np.prod(shape))} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def logical_axis_rules(fsdp: bool = True) -> tuple[tuple[str, Any], ...]:
    """T5X's standard rules: data parallel over (data, fsdp), tensor parallel over model.

    With fsdp=True, parameters' embed dimension is also sharded over the fsdp axis (ZeRO-3
    style); with fsdp=False they are replicated over it.
    """
    return (
        ("batch", ("data", "fsdp")),
        ("vocab", "model"),
        ("embed", "fsdp" if fsdp else None),
        ("mlp", "model"),
        ("heads", "model"),
        ("joined_kv", "model"),
        ("kv", None),
        ("length", None),
        ("relpos_buckets", None),
        ("layers", None),
    )


def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> contextlib.ExitStack:
    """The mesh and logical axis rules made current, for tracing: the model's activation
    constraints resolve only under both."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def unbox(tree: Any) -> Any:
    """Drops logical-partitioning boxes, leaving the plain arrays (or shapes)."""
    return nn.meta.unbox(tree)


def params_shardings(abstract_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedSharding per leaf of a (boxed, e.g. `abstract_params`) parameter tree."""
    specs = nn.get_partition_spec(abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [batch, length] arrays: batch split over (data, fsdp), length whole."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the data-iterator state lives beside it)."""

    step: jax.Array
    params: Any
    opt_state: Any


class Partitioner:
    """The mesh, logical axis rules and shardings of a model's params and optimizer state."""

    def __init__(self, mesh: Mesh, rules: tuple, config: T5Config):
        self.mesh = mesh
        self.rules = rules
        self.config = config
        boxed = abstract_params(config)
        self.params_shardings = params_shardings(boxed, mesh, rules)
        self.abstract_params = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            unbox(boxed),
            self.params_shardings,
        )
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = batch_sharding(mesh)

    @property
    def num_data_shards(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def opt_state_shardings(self, tx: optax.GradientTransformation) -> Any:
        """Moments shaped like a parameter share its sharding; the rest (counts, factored
        Adafactor rows/columns) is replicated."""
        abstract_opt = jax.eval_shape(tx.init, self.abstract_params)

        def pick(leaf, param):
            if getattr(leaf, "shape", None) == param.shape:
                return param.sharding
            return self.replicated

        return optax.tree_map_params(
            tx,
            pick,
            abstract_opt,
            self.abstract_params,
            transform_non_params=lambda _: self.replicated,
        )

    def abstract_opt_state(self, tx: optax.GradientTransformation) -> Any:
        """Shapes, dtypes and shardings of the optimizer state, allocating nothing (the
        restore target when resuming)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(tx.init, self.abstract_params), self.opt_state_shardings(tx))

    def state_shardings(self, tx: optax.GradientTransformation) -> TrainState:
        return TrainState(
            step=self.replicated,
            params=self.params_shardings,
            opt_state=self.opt_state_shardings(tx),
        )

    def abstract_state(self, tx: optax.GradientTransformation) -> TrainState:
        """The train state as shapes with shardings: what `jit_train_step(...).lower` takes to
        compile (or account the memory of) a step without allocating a parameter."""
        return TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
            params=self.abstract_params, opt_state=self.abstract_opt_state(tx))

    def context(self) -> contextlib.ExitStack:
        """Mesh + logical rules, active while tracing so activation constraints resolve."""
        return mesh_context(self.mesh, self.rules)
