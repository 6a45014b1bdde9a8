"""T5 encoder-decoder in Flax linen (v1.0, 1.1 and Flan-T5), with T5X logical axis names.
The blocks it is made of (attention, feed-forward, norms, `matmul`) are in layers.py.

Numerically the same network as HF `T5ForConditionalGeneration`: pre-norm RMS layer norms,
relative position buckets shared by all layers of a stack, no 1/sqrt(d) attention scaling
(folded into the query initialisation, as in T5X), ReLU or gated-GELU feed-forward, and tied
(v1.0, logits scaled by emb_dim**-0.5) or separate output projection.

Every parameter and the main activations carry logical axis names (batch, length, embed, mlp,
heads, kv, joined_kv, vocab, relpos_buckets, layers) that `sbs_jax.train.partitioning` maps to mesh
axes. Decoding uses T5X-style `encode` / `decode` methods with a flax "cache" collection holding
the self-attention keys/values and the (computed once) cross-attention keys/values.
"""

from __future__ import annotations

import dataclasses
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
from sbs_jax.models.layers import (
    MLP,
    NEG_INF,
    Attention,
    Dense,
    Dropout,
    Embed,
    RelativePositionBias,
    RMSNorm,
)

Array = jax.Array


class EncoderLayer(nn.Module):
    config: T5Config
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> tuple[Array, None]:
        cfg = self.config
        drop = Dropout(cfg.dropout_rate, deterministic=self.deterministic)
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
        drop = Dropout(cfg.dropout_rate, deterministic=self.deterministic)
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


def _segment_bias(query_segments: Array | None, key_segments: Array | None) -> Array | float:
    """Additive bias [batch, 1, queries, keys] that keeps packed examples apart: NEG_INF where
    query and key belong to different segments (0 when the batch is not packed).

    Relative position biases need no per-example positions: within a segment the offset
    key - query is the same as in the example alone.
    """
    if query_segments is None or key_segments is None:
        return 0.0
    same = query_segments[:, :, None] == key_segments[:, None, :]
    return jnp.where(same, 0.0, NEG_INF).astype(jnp.float32)[:, None]


class Encoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoder_input_tokens: Array, enable_dropout: bool = False,
                 encoder_segment_ids: Array | None = None) -> Array:
        cfg = self.config
        deterministic = not enable_dropout
        length = encoder_input_tokens.shape[1]
        positions = np.arange(length)
        bias = (RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(
            positions, positions) + _key_mask_bias(encoder_input_tokens)
            + _segment_bias(encoder_segment_ids, encoder_segment_ids))
        drop = Dropout(cfg.dropout_rate, deterministic=deterministic)
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
                 max_decode_length: int | None = None,
                 encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None) -> Array:
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
            self_bias = self_bias + _segment_bias(decoder_segment_ids, decoder_segment_ids)
        cross_bias = (_key_mask_bias(encoder_input_tokens)
                      + _segment_bias(decoder_segment_ids, encoder_segment_ids))

        drop = Dropout(cfg.dropout_rate, deterministic=deterministic)
        y = drop(self.shared_embedding(decoder_input_tokens))
        y = _stack(cfg, DecoderLayer, cfg.num_decoder_layers, 4, deterministic=deterministic,
                   decode=decode, max_decode_length=max_decode_length or 0)(
            y, encoded, self_bias.astype(jnp.float32), cross_bias, position)
        y = drop(RMSNorm(cfg, name="decoder_norm")(y))
        if cfg.logits_via_embedding:
            logits = self.shared_embedding.attend(y * (cfg.emb_dim ** -0.5))
        else:
            logits = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), out_dtype="float32",
                           name="logits_dense")(y)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class T5(nn.Module):
    """Encoder-decoder T5. `__call__` gives float32 logits [batch, target_len, vocab]."""

    config: T5Config

    def setup(self):
        self.token_embedder = Embed(self.config)
        self.encoder = Encoder(self.config, self.token_embedder)
        self.decoder = Decoder(self.config, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False,
               encoder_segment_ids: Array | None = None) -> Array:
        return self.encoder(encoder_input_tokens, enable_dropout, encoder_segment_ids)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               enable_dropout: bool = False, decode: bool = False,
               max_decode_length: int | None = None, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None) -> Array:
        """Teacher-forced logits, or (decode=True, mutable "cache") one step with the KV cache.

        The first decode=True call with no cache creates it (sized max_decode_length) and fills
        the cross-attention keys/values from `encoded`; its output is not a decoding step.
        Segment ids (T5X's packed features; teacher forcing only) keep packed examples apart.
        """
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout,
                            decode, max_decode_length, encoder_segment_ids, decoder_segment_ids)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 enable_dropout: bool = False, encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None) -> Array:
        """Logits of a batch, packed when segment ids are given (both or neither)."""
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("T5: pass both encoder_segment_ids and decoder_segment_ids "
                             "(a packed batch) or neither")
        encoded = self.encode(encoder_input_tokens, enable_dropout, encoder_segment_ids)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout,
                           encoder_segment_ids=encoder_segment_ids,
                           decoder_segment_ids=decoder_segment_ids)


def _dummy_inputs(batch: int = 1, length: int = 1) -> tuple[Array, Array]:
    tokens = jnp.ones((batch, length), jnp.int32)
    return tokens, tokens


def init_params(config: T5Config, rng: Array) -> dict:
    """Random parameters as plain arrays (logical-axis boxes removed)."""
    variables = T5(config).init(rng, *_dummy_inputs())
    return nn.meta.unbox(variables["params"])


def abstract_params(config: T5Config) -> dict:
    """Shapes/dtypes of the parameters, still boxed with their logical axis names.

    Feed this to `sbs_jax.train.partitioning.params_shardings`.
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


def config_from_params(params: dict, base: T5Config) -> T5Config:
    """`base` with every size taken from the parameter shapes (unrolled or scanned)."""
    scanned = "layers" in params["encoder"]

    def layer(stack: str) -> dict:
        return params[stack]["layers"] if scanned else params[stack]["layers_0"]

    def num_layers(stack: str) -> int:
        if scanned:
            return int(layer(stack)["pre_mlp_layer_norm"]["scale"].shape[0])
        return sum(1 for k in params[stack] if k.startswith("layers_"))

    vocab, emb = params["token_embedder"]["embedding"].shape
    heads, buckets = params["encoder"]["relpos_bias"]["rel_embedding"].shape
    mlp = layer("encoder")["mlp"]
    gated = "wi_0" in mlp
    joined = layer("encoder")["attention"]["query"]["kernel"].shape[-1]
    activations = base.mlp_activations
    if gated != (len(activations) == 2):
        activations = ("gelu", "linear") if gated else ("relu",)
    return dataclasses.replace(
        base, vocab_size=int(vocab), emb_dim=int(emb), num_heads=int(heads),
        head_dim=int(joined) // int(heads),
        mlp_dim=int((mlp["wi_0"] if gated else mlp["wi"])["kernel"].shape[-1]),
        num_encoder_layers=num_layers("encoder"), num_decoder_layers=num_layers("decoder"),
        mlp_activations=activations, relative_attention_num_buckets=int(buckets),
        logits_via_embedding="logits_dense" not in params["decoder"], scan_layers=scanned)
