"""The building blocks of the T5 network (t5.py assembles them): projections, norms, embeddings,
relative position biases, attention with its decoding cache, and the feed-forward block.

Every parameter and activation carries T5X logical axis names; `matmul` is the projection every
block uses, with a backward pass written for XLA:CPU. With `rows_kernel` a decoding step's
projections and cross-attention run as cpu_kernels' custom calls instead (bf16 on AVX-512 BF16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sbs_jax.models import cpu_kernels
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


def dot_general(a: Array, b: Array, dimension_numbers: Any,
                out_dtype: DType | None = None) -> Array:
    """`lax.dot_general` accumulated and returned in float32, then cast to `out_dtype`
    (default `a`'s dtype).

    For float32 operands this is the plain dot. For bfloat16 it rounds like a bfloat16 dot on
    TPU/GPU (which accumulate in float32 too), and on XLA:CPU it is what reaches the AMX bf16
    kernels: a bf16 dot that returns bf16 runs at the fp32 rate, one that returns f32 5-6x faster
    (2048^3: 243 vs 1,449 GFLOP/s on this project's 2-core Xeon).
    """
    out = jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32)
    return out.astype(out_dtype or a.dtype)


def matmul(x: Array, kernel: Array, out_dtype: DType | None = None) -> Array:
    """`x @ kernel` over the last axis of x, computed in x's dtype and returned in `out_dtype`
    (default x's), with a backward pass written for XLA:CPU.

    Same values as `jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=float32)` cast
    to `out_dtype`, both ways. JAX's own transpose rule asks for the kernel gradient as a
    transposed dot whose cotangent XLA:CPU then materialises transposed ([features, tokens]), in
    a loop fusion that recomputes the producing elementwise chain (GELU derivative, dropout
    mask) with a power-of-two read stride: 5x slower than the dots themselves. Here the kernel
    gradient is one dot contracting the leading (batch, length) axes of x and the cotangent as
    stored, which needs no transposed cotangent. Kept unflattened on purpose: with two
    contracting axes XLA:CPU copies x to [in, tokens] and runs a plain bf16 dot on its library
    kernels, where a flattened [tokens, in] contraction was upcast to float32 for Eigen (1.4-2x
    slower). The float32 accumulator is left in the kernel's own dtype: float32 parameters under
    bf16 compute get an unrounded gradient and no cast pass. A float32 `out_dtype` under bf16
    compute hands the accumulator itself to what follows (the GELU, the loss), which XLA:CPU
    computes 2x faster in float32 than in bf16, and saves a rounding.
    """
    return _matmul(x, kernel, jnp.dtype(out_dtype or x.dtype).name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: Array, kernel: Array, out_dtype: str) -> Array:
    return dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())), out_dtype)


def _matmul_fwd(x: Array, kernel: Array, out_dtype: str) -> tuple[Array, tuple[Array, Array]]:
    return _matmul(x, kernel, out_dtype), (x, kernel)


def _matmul_bwd(out_dtype: str, residuals: tuple[Array, Array],
                grad: Array) -> tuple[Array, Array]:
    del out_dtype
    x, kernel = residuals
    grad = grad.astype(x.dtype)  # the dots run in the compute dtype (bf16: the fast kernels)
    grad_x = dot_general(grad, kernel.astype(grad.dtype), (((grad.ndim - 1,), (1,)), ((), ())))
    lead = tuple(range(x.ndim - 1))
    grad_kernel = dot_general(x, grad, ((lead, lead), ((), ())), kernel.dtype)
    return grad_x, grad_kernel


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


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
    like any iota, so the mask of an element does not depend on the mesh. `jax.random.bernoulli`
    (threefry) costs 5 passes over a uint32 array on XLA:CPU, 16% of the bf16 sbs step.
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
    rng stream, so a step's masks still follow from (seed, step) as before."""

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
    """Bias-free projection with a named [in, out] kernel (HF nn.Linear weight transposed).

    `rows_kernel` (decoding steps on an AVX-512 BF16 CPU, see cpu_kernels.py) keeps the kernel
    packed in the "cache" collection, laid out once when the cache is made, and multiplies the
    step's few rows with it.
    """

    config: T5Config
    features: int
    kernel_axes: tuple[str, str]
    stddev_scale: float = 1.0
    out_dtype: str | None = None  # default: the compute dtype
    rows_kernel: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.variance_scaling(self.stddev_scale ** 2, "fan_in", "normal")
        kernel = _param(self, "kernel", init, (x.shape[-1], self.features), self.kernel_axes)
        dtype = _dtype(self.config.dtype)
        if self.rows_kernel:
            return packed_matmul(self, x, kernel).astype(self.out_dtype or dtype)
        return matmul(x.astype(dtype), kernel, self.out_dtype)


def packed_matmul(module: nn.Module, x: Array, kernel: Array) -> Array:
    """float32 `x @ kernel` by the rows kernel, from `module`'s cached packed copy of `kernel`."""
    packed = module.variable("cache", "packed_kernel",
                             lambda: cpu_kernels.pack_rows_kernel(kernel))
    return cpu_kernels.rows_matmul(x, packed.value, kernel.shape[-1])


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.config.layer_norm_epsilon)
        # Scaled in float32: the scale's gradient then sums its token products in float32.
        return (y * scale.astype(jnp.float32)).astype(_dtype(self.config.dtype))


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
        # from the [vocab/model, embed/fsdp] table XLA's SPMD gather instead all-gathered the
        # looked-up activations (and their cotangents) over the global batch.
        # The rows are cast after the lookup: no cast of the whole table each step, and the
        # gradient is scattered into a float32 table (no bf16 sums of a token's cotangents).
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(_dtype(self.config.dtype))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: Array) -> Array:
        return matmul(x.astype(_dtype(self.config.dtype)), self.embedding.T, jnp.float32)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for each relative-position bucket: [heads, buckets]."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: np.ndarray) -> Array:
        """Bias [1, heads, q, k] for integer positions (query positions may be traced)."""
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
    """Multi-head attention; `bias` [.., heads|1, q, k] carries masks and position biases."""

    config: T5Config
    deterministic: bool
    decode: bool = False
    cross: bool = False
    max_decode_length: int = 0
    rows_kernel: bool = False  # decoding: project the step's rows with cpu_kernels

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array,
                 position: Array | None = None) -> Array:
        cfg = self.config
        inner = cfg.num_heads * cfg.head_dim
        heads_shape = (cfg.num_heads, cfg.head_dim)
        axes = ("batch", "length", "heads", "kv")
        step_rows = self.decode and self.rows_kernel
        # Cross-attention keys/values are projected once, from every encoder position: XLA's dot.
        kv_rows = step_rows and not self.cross

        def project(name, x, scale=1.0, rows_kernel=step_rows):
            y = Dense(cfg, inner, ("embed", "joined_kv"), scale, rows_kernel=rows_kernel,
                      name=name)(x)
            y = y.reshape(y.shape[:-1] + heads_shape)
            return nn.with_logical_constraint(y, axes)

        query = project("query", inputs_q, cfg.head_dim ** -0.5)
        key = project("key", inputs_kv, rows_kernel=kv_rows)
        value = project("value", inputs_kv, rows_kernel=kv_rows)

        # Attention runs head-major [batch, heads, length, head_dim]: XLA:CPU's fused
        # scores-softmax-values kernel is 2.3x faster than on [batch, length, heads, head_dim]
        # operands, and the decoding cache keeps this layout, which the per-step dots read in
        # place (a length-major cache was transposed in full at every step).
        query, key, value = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
        if step_rows and self.cross and cfg.head_dim <= cpu_kernels.MAX_HEAD_DIM:
            out = cross_attention_step(self, query, key, value, bias)
        else:
            out = self._attend(query, key, value, bias, position)
        out = out.astype(query.dtype).transpose(0, 2, 1, 3)
        out = nn.with_logical_constraint(out, axes)
        out = out.reshape(out.shape[:-2] + (inner,))
        out = Dense(cfg, cfg.emb_dim, ("joined_kv", "embed"), rows_kernel=step_rows,
                    name="out")(out)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _attend(self, query: Array, key: Array, value: Array, bias: Array,
                position: Array | None) -> Array:
        """float32 attention output [batch, heads, q, head_dim], through the decoding caches."""
        cfg = self.config
        if self.decode and jax.default_backend() == "cpu":
            # A decoding step's attention is a batch of matrix-vector products: XLA:CPU runs
            # them 2.4x faster in float32 than in bf16, so the caches keep float32 there.
            query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
        if self.decode and self.cross:
            # Encoder keys/values never change while decoding: project them once.
            is_init = self.has_variable("cache", "cross_key")
            cached_key = self.variable("cache", "cross_key", lambda: key)
            cached_value = self.variable("cache", "cross_value", lambda: value)
            if is_init:
                key, value = cached_key.value, cached_value.value
        elif self.decode:
            is_init = self.has_variable("cache", "cached_key")
            shape = key.shape[:2] + (self.max_decode_length,) + key.shape[3:]
            cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
            if is_init:
                start = (0, 0, position, 0)
                cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
                cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value,
                                                                  start)
                key, value = cached_key.value, cached_value.value

        # Both dots accumulate in float32 (see `dot_general`); the scores stay float32.
        logits = jnp.einsum("bhqd,bhkd->bhqk", query, key,
                            preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
        weights = Dropout(cfg.dropout_rate, deterministic=self.deterministic)(weights)
        return jnp.einsum("bhqk,bhkd->bhqd", weights, value, preferred_element_type=jnp.float32)


def cross_attention_step(module: nn.Module, query: Array, key: Array, value: Array,
                         bias: Array) -> Array:
    """A decoding step's cross-attention [batch, heads, 1, head_dim] by the cpu_kernels dots.

    The encoder keys/values are cached once, bf16 and laid out for the kernels (half the bytes
    of XLA:CPU's float32 caches, which each step reads whole); the softmax stays in XLA.
    """
    if query.shape[2] != 1:
        raise ValueError(f"cross_attention_step: one query per step, got {query.shape[2]}")
    length, head_dim = key.shape[2], key.shape[3]
    keys = module.variable("cache", "cross_key", lambda: cpu_kernels.pack_keys(key))
    values = module.variable("cache", "cross_value", lambda: cpu_kernels.pack_values(value))
    logits = cpu_kernels.attention_scores(query[:, :, 0], keys.value, length)[:, :, None] + bias
    weights = jax.nn.softmax(logits, axis=-1)[:, :, 0]
    return cpu_kernels.weighted_values(weights, values.value, head_dim)[:, :, None]


class MLP(nn.Module):
    """Feed-forward: product of the activated input projections (one for ReLU, two if gated)."""

    config: T5Config
    deterministic: bool
    rows_kernel: bool = False  # decoding steps: project with cpu_kernels

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        acts = cfg.mlp_activations
        hidden = None
        for i, act in enumerate(acts):
            # Activations and their product in float32 (the dots' accumulators), cast once.
            name = "wi" if len(acts) == 1 else f"wi_{i}"
            h = Dense(cfg, cfg.mlp_dim, ("embed", "mlp"), out_dtype="float32",
                      rows_kernel=self.rows_kernel, name=name)(x)
            h = ACTIVATIONS[act](h)
            hidden = h if hidden is None else hidden * h
        hidden = hidden.astype(_dtype(cfg.dtype))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = Dropout(cfg.dropout_rate, deterministic=self.deterministic)(hidden)
        out = Dense(cfg, cfg.emb_dim, ("mlp", "embed"), rows_kernel=self.rows_kernel,
                    name="wo")(hidden)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))
