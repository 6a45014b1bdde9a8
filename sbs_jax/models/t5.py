"""T5 encoder-decoder in Flax linen (v1.0, 1.1 and Flan-T5), with T5X logical axis names.

Numerically the same network as HF `T5ForConditionalGeneration`: pre-norm RMS layer norms,
relative position buckets shared by all layers of a stack, no 1/sqrt(d) attention scaling
(folded into the query initialisation, as in T5X), ReLU or gated-GELU feed-forward, and tied
(v1.0, logits scaled by emb_dim**-0.5) or separate output projection.

Every parameter and the main activations carry logical axis names (batch, length, embed, mlp,
heads, kv, joined_kv, vocab, relpos_buckets, layers) that `sbs_jax.partitioning` maps to mesh
axes. Decoding uses T5X-style `encode` / `decode` methods with a flax "cache" collection holding
the self-attention keys/values, the (computed once) cross-attention keys/values and, for an
untied head, a vocab-major copy of the output kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sbs_jax.models.config import (  # noqa: F401  (re-exported: the model's public names)
    ACTIVATIONS,
    REMAT_POLICIES,
    T5Config,
    config_names,
    get_config,
)

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


@jax.custom_vjp
def matmul(x: Array, kernel: Array) -> Array:
    """`x @ kernel` over the last axis of x, with a backward pass written for XLA:CPU.

    Same values as `jnp.dot` both ways. JAX's own transpose rule asks for the kernel gradient as
    a transposed dot whose cotangent XLA:CPU then materialises transposed ([features, tokens]),
    in a loop fusion that recomputes the producing elementwise chain (GELU derivative, dropout
    mask) with a power-of-two read stride: 5x slower than the dots themselves. Here the kernel
    gradient contracts the token axis of both operands as stored, which needs no transpose.
    """
    return jnp.dot(x, kernel)


def _matmul_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    grad_x = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
    flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    grad_kernel = jax.lax.dot_general(flat_x, flat_grad, (((0,), (0,)), ((), ())))
    return grad_x, grad_kernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Module):
    """Bias-free projection with a named [in, out] kernel (HF nn.Linear weight transposed)."""

    config: T5Config
    features: int
    kernel_axes: tuple[str, str]
    stddev_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.variance_scaling(self.stddev_scale ** 2, "fan_in", "normal")
        kernel = _param(self, "kernel", init, (x.shape[-1], self.features), self.kernel_axes)
        dtype = _dtype(self.config.dtype)
        return matmul(x.astype(dtype), kernel.astype(dtype))


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.config.layer_norm_epsilon)
        dtype = _dtype(self.config.dtype)
        return y.astype(dtype) * scale.astype(dtype)


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
        table = nn.with_logical_constraint(self.embedding.astype(_dtype(self.config.dtype)),
                                           ("vocab", None))
        x = jnp.take(table, tokens, axis=0)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: Array) -> Array:
        dtype = _dtype(self.config.dtype)
        return matmul(x.astype(dtype), self.embedding.astype(dtype).T)


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

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array,
                 position: Array | None = None) -> Array:
        cfg = self.config
        inner = cfg.num_heads * cfg.head_dim
        heads_shape = (cfg.num_heads, cfg.head_dim)
        axes = ("batch", "length", "heads", "kv")

        def project(name, x, scale=1.0):
            y = Dense(cfg, inner, ("embed", "joined_kv"), scale, name=name)(x)
            y = y.reshape(y.shape[:-1] + heads_shape)
            return nn.with_logical_constraint(y, axes)

        query = project("query", inputs_q, cfg.head_dim ** -0.5)
        key = project("key", inputs_kv)
        value = project("value", inputs_kv)

        # Attention runs head-major [batch, heads, length, head_dim]: XLA:CPU's fused
        # scores-softmax-values kernel is 2.3x faster than on [batch, length, heads, head_dim]
        # operands, and the decoding cache keeps this layout, which the per-step dots read in
        # place (a length-major cache was transposed in full at every step).
        query, key, value = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
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

        logits = jnp.einsum("bhqd,bhkd->bhqk", query, key).astype(jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
        weights = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(weights)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, value).transpose(0, 2, 1, 3)
        out = nn.with_logical_constraint(out, axes)
        out = out.reshape(out.shape[:-2] + (inner,))
        out = Dense(cfg, cfg.emb_dim, ("joined_kv", "embed"), name="out")(out)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


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
        hidden = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(hidden)
        out = Dense(cfg, cfg.emb_dim, ("mlp", "embed"), name="wo")(hidden)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
    config: T5Config
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> tuple[Array, None]:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h = RMSNorm(cfg, name="pre_attention_layer_norm")(x)
        x = x + drop(Attention(cfg, self.deterministic, name="attention")(h, h, bias))
        h = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
        x = x + drop(MLP(cfg, self.deterministic, name="mlp")(h))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
    config: T5Config
    deterministic: bool
    decode: bool = False
    max_decode_length: int = 0

    @nn.compact
    def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
                 position: Array | None) -> tuple[Array, None]:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h = RMSNorm(cfg, name="pre_self_attention_layer_norm")(x)
        attn = Attention(cfg, self.deterministic, self.decode, False, self.max_decode_length,
                         name="self_attention")
        x = x + drop(attn(h, h, self_bias, position))
        h = RMSNorm(cfg, name="pre_cross_attention_layer_norm")(x)
        attn = Attention(cfg, self.deterministic, self.decode, True,
                         name="encoder_decoder_attention")
        x = x + drop(attn(h, encoded, cross_bias))
        h = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
        x = x + drop(MLP(cfg, self.deterministic, name="mlp")(h))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


def _stack(config: T5Config, layer_cls: type, num_layers: int, num_args: int,
           **layer_kwargs: Any) -> Callable[..., Array]:
    """Unrolled or scanned layers, optionally rematerialised; returns x -> x."""
    policy = REMAT_POLICIES[config.remat_policy]
    if config.remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not config.scan_layers)
    if config.scan_layers:
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * num_args,
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(config, name="layers", **layer_kwargs)
        return lambda x, *args: scanned(x, *args)[0]
    layers = [layer_cls(config, name=f"layers_{i}", **layer_kwargs) for i in range(num_layers)]

    def run(x, *args):
        for layer in layers:
            x = layer(x, *args)[0]
        return x
    return run


def _key_mask_bias(tokens: Array) -> Array:
    """Additive bias [batch, 1, 1, keys]: 0 for real tokens, NEG_INF for padding (id 0)."""
    return jnp.where(tokens > 0, 0.0, NEG_INF).astype(jnp.float32)[:, None, None, :]


class Encoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        cfg = self.config
        deterministic = not enable_dropout
        length = encoder_input_tokens.shape[1]
        positions = np.arange(length)
        bias = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(
            positions, positions) + _key_mask_bias(encoder_input_tokens)
        drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        x = drop(self.shared_embedding(encoder_input_tokens))
        x = _stack(cfg, EncoderLayer, cfg.num_encoder_layers, 1,
                   deterministic=deterministic)(x, bias)
        x = RMSNorm(cfg, name="encoder_norm")(x)
        return drop(x)


class Decoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 enable_dropout: bool = False, decode: bool = False,
                 max_decode_length: int | None = None) -> Array:
        cfg = self.config
        deterministic = not enable_dropout
        length = decoder_input_tokens.shape[1]
        relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
        position = None
        if decode:
            if max_decode_length is None:
                raise ValueError("Decoder: decode=True needs max_decode_length")
            is_init = self.has_variable("cache", "position")
            pos_var = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            position = pos_var.value
            if is_init:  # one step: the query at `position` sees keys 0..position
                pos_var.value = position + length
                keys = np.arange(max_decode_length)
                self_bias = relpos(position[None], keys) + jnp.where(
                    keys[None, :] <= position, 0.0, NEG_INF)[None, None]
        if not decode or not is_init:
            positions = np.arange(length)
            self_bias = relpos(positions, positions) + np.where(
                positions[None, :] <= positions[:, None], 0.0, NEG_INF)[None, None]
        cross_bias = _key_mask_bias(encoder_input_tokens)

        drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        y = drop(self.shared_embedding(decoder_input_tokens))
        y = _stack(cfg, DecoderLayer, cfg.num_decoder_layers, 4, deterministic=deterministic,
                   decode=decode, max_decode_length=max_decode_length or 0)(
            y, encoded, self_bias.astype(jnp.float32), cross_bias, position)
        y = drop(RMSNorm(cfg, name="decoder_norm")(y))
        if cfg.logits_via_embedding:
            logits = self.shared_embedding.attend(y * (cfg.emb_dim ** -0.5))
        elif decode:
            logits = self._decode_step_logits(y)
        else:
            logits = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="logits_dense")(y)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def _decode_step_logits(self, y: Array) -> Array:
        """The output projection of one decoding step, from a [vocab, embed] copy of its kernel.

        Cached once per decode (like the cross-attention keys/values): for a handful of rows
        XLA:CPU's dot over the vocab-major copy runs 2x faster than over the [embed, vocab]
        kernel, and this projection is a quarter of a decoding step.
        """
        dtype = _dtype(self.config.dtype)
        kernel = nn.meta.unbox(self.variables["params"]["logits_dense"]["kernel"])
        kernel_t = self.variable("cache", "logits_kernel_t", lambda: kernel.T.astype(dtype))
        return jax.lax.dot_general(y.astype(dtype), kernel_t.value,
                                   (((y.ndim - 1,), (1,)), ((), ())))


class T5(nn.Module):
    """Encoder-decoder T5. `__call__` gives logits [batch, target_len, vocab] (compute dtype)."""

    config: T5Config

    def setup(self):
        self.token_embedder = Embed(self.config)
        self.encoder = Encoder(self.config, self.token_embedder)
        self.decoder = Decoder(self.config, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        return self.encoder(encoder_input_tokens, enable_dropout)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               enable_dropout: bool = False, decode: bool = False,
               max_decode_length: int | None = None) -> Array:
        """Teacher-forced logits, or (decode=True, mutable "cache") one step with the KV cache.

        The first decode=True call with no cache creates it (sized max_decode_length) and fills
        the cross-attention keys/values from `encoded`; its output is not a decoding step.
        """
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout,
                            decode, max_decode_length)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 enable_dropout: bool = False) -> Array:
        encoded = self.encode(encoder_input_tokens, enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout)


def _dummy_inputs(batch: int = 1, length: int = 1) -> tuple[Array, Array]:
    tokens = jnp.ones((batch, length), jnp.int32)
    return tokens, tokens


def init_params(config: T5Config, rng: Array) -> dict:
    """Random parameters as plain arrays (logical-axis boxes removed)."""
    variables = T5(config).init(rng, *_dummy_inputs())
    return nn.meta.unbox(variables["params"])


def abstract_params(config: T5Config) -> dict:
    """Shapes/dtypes of the parameters, still boxed with their logical axis names.

    Feed this to `sbs_jax.partitioning.params_shardings`.
    """
    variables = jax.eval_shape(lambda: T5(config).init(jax.random.PRNGKey(0), *_dummy_inputs()))
    return variables["params"]


def _layer_keys(stack: dict) -> list[str]:
    keys = [k for k in stack if k.startswith("layers_")]
    return sorted(keys, key=lambda k: int(k.split("_")[1]))


def stack_layers(params: dict) -> dict:
    """Unrolled params (layers_0, layers_1, ...) -> scanned params (layers, leading axis)."""
    out = dict(params)
    for stack_name in ("encoder", "decoder"):
        stack = dict(params[stack_name])
        keys = _layer_keys(stack)
        layers = [stack.pop(k) for k in keys]
        stack["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
        out[stack_name] = stack
    return out


def unstack_layers(params: dict) -> dict:
    """Scanned params (layers, leading axis) -> unrolled params (layers_0, layers_1, ...)."""
    out = dict(params)
    for stack_name in ("encoder", "decoder"):
        stack = dict(params[stack_name])
        layers = stack.pop("layers")
        num = jax.tree_util.tree_leaves(layers)[0].shape[0]
        for i in range(num):
            stack[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], layers)
        out[stack_name] = stack
    return out
