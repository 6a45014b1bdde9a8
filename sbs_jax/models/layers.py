"""The building blocks of the T5 network (t5.py assembles them): projections, norms, embeddings,
relative position biases, attention with its decoding cache, and the feed-forward block.

T5X's plain style: every projection is one `lax.dot_general` in the compute dtype
(`T5Config.dtype`) that returns that dtype, so activations are bf16 under bf16 compute; float32
only for the attention softmax, the RMSNorm statistics and the logits. Every parameter and
activation carries T5X logical axis names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sbs_jax.models.config import ACTIVATIONS, T5Config

Array = jax.Array
DType = Any
NEG_INF = -1e10


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bucketing of (key - query) offsets, in float32 exactly as HF/Mesh TF compute it."""
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(np.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    if_large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(distance < max_exact, distance, if_large)


def _dtype(name: str) -> DType:
    return jnp.dtype(name)


def _param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
           axes: tuple[str, ...]) -> Array:
    cfg = module.config
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        _dtype(cfg.param_dtype))


def dot(x: Array, kernel: Array, kernel_axis: int = 0, out_dtype: DType | None = None) -> Array:
    """x [..., in] times a 2-D kernel, contracting x's last axis with the kernel's
    `kernel_axis`: one `lax.dot_general` with the kernel cast to x's dtype.

    The result is in x's dtype (XLA accumulates a bf16 dot in float32 and rounds once);
    `out_dtype=float32` asks for the float32 accumulator itself (the logits).
    """
    dims = (((x.ndim - 1,), (kernel_axis,)), ((), ()))
    return jax.lax.dot_general(x, kernel.astype(x.dtype), dims, preferred_element_type=out_dtype)


def _mix32(x: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: a bijection on uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keep_mask(seed: Array, shape: tuple[int, ...], keep_prob: float) -> Array:
    """Bernoulli(keep_prob) bits for every element of `shape`, from two uint32 seed words.

    Each element's bits are a hash of its (leading index, last index) and the seed: elementwise
    integer math on iotas, which XLA fuses into the select that consumes the mask and partitions
    like any iota, so the mask of an element does not depend on the mesh; one threefry draw per
    call (the seed) instead of threefry bits for every element.
    """
    lead = jnp.zeros(shape, jnp.uint32)
    for dim, size in enumerate(shape[:-1]):
        lead = lead * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, dim)
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    bits = _mix32(_mix32(lead ^ seed[0]) ^ (col * np.uint32(0x9E3779B1) + seed[1]))
    threshold = min(int(keep_prob * 2.0 ** 32), 2 ** 32 - 1)
    return bits < np.uint32(threshold)


class Dropout(nn.Module):
    """Inverted dropout (as `nn.Dropout`) with masks from `keep_mask`, seeded by the 'dropout'
    rng stream, so a step's masks follow from (seed, step)."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
        keep = keep_mask(seed, x.shape, keep_prob)
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


class Dense(nn.Module):
    """Bias-free projection with a named [in, out] kernel (HF nn.Linear weight transposed), in
    the compute dtype; `out_dtype="float32"` returns the float32 accumulator (the logits)."""

    config: T5Config
    features: int
    kernel_axes: tuple[str, str]
    stddev_scale: float = 1.0
    out_dtype: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.variance_scaling(self.stddev_scale ** 2, "fan_in", "normal")
        kernel = _param(self, "kernel", init, (x.shape[-1], self.features), self.kernel_axes)
        return dot(x.astype(_dtype(self.config.dtype)), kernel, out_dtype=self.out_dtype)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = _dtype(self.config.dtype)
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.config.layer_norm_epsilon)).astype(dtype)
        return y * scale.astype(dtype)


class Embed(nn.Module):
    """Token embedding shared by encoder, decoder and (v1.0) the output projection."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.emb_dim), _dtype(cfg.param_dtype))

    def __call__(self, tokens: Array) -> Array:
        # Look up in a table whole along embed (one fsdp all-gather of it, as for every kernel):
        # from the [vocab/model, embed/fsdp] table XLA's SPMD gather instead all-gathers the
        # looked-up activations (and their cotangents) over the global batch.
        # Rows are cast after the lookup, so the gradient is scattered into the table's dtype.
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(_dtype(self.config.dtype))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: Array) -> Array:
        """float32 logits of x against every embedding row."""
        x = x.astype(_dtype(self.config.dtype))
        return dot(x, self.embedding, kernel_axis=1, out_dtype=jnp.float32)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for each relative-position bucket: [heads, buckets]."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: np.ndarray) -> Array:
        """float32 bias [1, heads, q, k] for integer positions (query positions may be traced)."""
        cfg = self.config
        table = _param(self, "rel_embedding",
                       nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                       (cfg.num_heads, cfg.relative_attention_num_buckets),
                       ("heads", "relpos_buckets"))
        if isinstance(query_positions, np.ndarray):
            rel = key_positions[None, :] - query_positions[:, None]
            buckets = relative_position_bucket(rel, self.bidirectional,
                                               cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance)
        else:  # decoding: a traced query position; causal buckets depend on distance only
            lookup = relative_position_bucket(-np.arange(len(key_positions)), False,
                                              cfg.relative_attention_num_buckets,
                                              cfg.relative_attention_max_distance)
            distance = jnp.clip(query_positions[:, None] - key_positions[None, :], 0, None)
            buckets = jnp.asarray(lookup, jnp.int32)[distance]
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=1)
        return bias[None]


class Attention(nn.Module):
    """Multi-head attention; `bias` [.., heads|1, q, k] carries masks and position biases.

    With `decode` the keys/values live in the "cache" collection ([batch, length, heads, kv]):
    self-attention appends each step's at `position`, cross-attention projects the encoder's
    once.
    """

    config: T5Config
    deterministic: bool
    decode: bool = False
    cross: bool = False
    max_decode_length: int = 0

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array,
                 position: Array | None = None) -> Array:
        cfg = self.config
        inner = cfg.num_heads * cfg.head_dim
        axes = ("batch", "length", "heads", "kv")

        def project(name, x, scale=1.0):
            y = Dense(cfg, inner, ("embed", "joined_kv"), scale, name=name)(x)
            y = y.reshape(y.shape[:-1] + (cfg.num_heads, cfg.head_dim))
            return nn.with_logical_constraint(y, axes)

        query = project("query", inputs_q, cfg.head_dim ** -0.5)
        if self.decode and self.cross and self.has_variable("cache", "cross_key"):
            key = self.get_variable("cache", "cross_key")
            value = self.get_variable("cache", "cross_value")
        else:
            key = project("key", inputs_kv)
            value = project("value", inputs_kv)
            if self.decode:
                key, value = self._cache(key, value, position, axes)

        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits + bias, axis=-1).astype(query.dtype)
        weights = Dropout(cfg.dropout_rate, deterministic=self.deterministic)(weights)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        out = nn.with_logical_constraint(out, axes)
        out = Dense(cfg, cfg.emb_dim, ("joined_kv", "embed"), name="out")(
            out.reshape(out.shape[:-2] + (inner,)))
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _cache(self, key: Array, value: Array, position: Array | None,
               axes: tuple[str, ...]) -> tuple[Array, Array]:
        """The keys/values to attend to while decoding, kept in the "cache" collection.

        Cross-attention: the encoder's, projected by the call that creates the cache. Self-
        attention: a [batch, max_decode_length, heads, kv] buffer; the creating call only
        allocates it, each later call writes its keys/values at `position` and reads it whole.
        """
        if self.cross:
            self.put_variable("cache", "cross_key", key)
            self.put_variable("cache", "cross_value", value)
            return key, value
        is_init = self.has_variable("cache", "cached_key")
        shape = (key.shape[0], self.max_decode_length) + key.shape[2:]
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        if not is_init:
            return key, value
        start = (0, position, 0, 0)
        for cached, new in ((cached_key, key), (cached_value, value)):
            updated = jax.lax.dynamic_update_slice(cached.value, new, start)
            cached.value = nn.with_logical_constraint(updated, axes)
        return cached_key.value, cached_value.value


class MLP(nn.Module):
    """Feed-forward: product of the activated input projections (one for ReLU, two if gated)."""

    config: T5Config
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        acts = cfg.mlp_activations
        hidden = None
        for i, act in enumerate(acts):
            name = "wi" if len(acts) == 1 else f"wi_{i}"
            h = ACTIVATIONS[act](Dense(cfg, cfg.mlp_dim, ("embed", "mlp"), name=name)(x))
            hidden = h if hidden is None else hidden * h
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = Dropout(cfg.dropout_rate, deterministic=self.deterministic)(hidden)
        out = Dense(cfg, cfg.emb_dim, ("mlp", "embed"), name="wo")(hidden)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))
