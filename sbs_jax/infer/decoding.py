"""Jit-compiled autoregressive decoding with a KV cache: greedy, beam search and sampling.

`generate` encodes once, fills the cache (cross-attention keys/values are projected a single
time), then runs a `lax.while_loop` of one-token decoder steps that stops when every sequence
(or, for beam search, every batch item by HF's stopping rules) is finished. Beam search follows
HF `generate` exactly (2 x num_beams candidates per step, finished score = sum of log-probs /
generated_length ** length_penalty with EOS counted, HF's early-stopping heuristic), so both give
the same tokens. Each (config, method, options, mesh) compiles once; jax caches per input shape.

Given a mesh and logical axis rules (the training run's), decoding runs on that mesh as training
does: params sharded by their logical axes, the batch over the data axes, the model's activation
and cache constraints resolved by the rules.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sbs_jax.data.vocab import EOS_ID
from sbs_jax.models.t5 import T5, T5Config, abstract_params
from sbs_jax.train import partitioning

METHODS = ("greedy", "beam", "sample")
_NEG = -1.0e9


def _init_cache(model: T5, params: Any, encoded: jax.Array, tokens: jax.Array,
                max_len: int) -> Any:
    start = jnp.zeros((tokens.shape[0], 1), jnp.int32)
    _, variables = model.apply({"params": params}, encoded, tokens, start, decode=True,
                               max_decode_length=max_len, mutable=["cache"], method=T5.decode)
    return variables["cache"]


def _step(model: T5, params: Any, cache: Any, encoded: jax.Array, tokens: jax.Array,
          last: jax.Array, max_len: int) -> tuple[jax.Array, Any]:
    """Float32 next-token logits [batch, vocab] for input tokens `last` [batch]; new cache."""
    logits, variables = model.apply({"params": params, "cache": cache}, encoded, tokens,
                                    last[:, None], decode=True, max_decode_length=max_len,
                                    mutable=["cache"], method=T5.decode)
    return logits[:, 0].astype(jnp.float32), variables["cache"]


def _sampling_filter(logits: jax.Array, temperature: jax.Array, top_k: int) -> jax.Array:
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


def _token_by_token(config: T5Config, max_len: int, sample: bool, top_k: int,
                    eos_id: int) -> Callable:
    """Greedy (argmax) or sampled decoding; sequences are 0 after their EOS."""
    model = T5(config)

    def run(params, tokens, temperature, rng):
        batch = tokens.shape[0]
        encoded = model.apply({"params": params}, tokens, method=T5.encode)
        cache = _init_cache(model, params, encoded, tokens, max_len)
        out = jnp.zeros((batch, max_len), jnp.int32)
        done = jnp.zeros((batch,), bool)

        def cond(state):
            t, _, _, done, _ = state
            return (t < max_len) & ~jnp.all(done)

        def body(state):
            t, out, cache, done, rng = state
            last = jnp.where(t > 0, out[:, jnp.maximum(t - 1, 0)], 0)
            logits, cache = _step(model, params, cache, encoded, tokens, last, max_len)
            if sample:
                rng, key = jax.random.split(rng)
                token = jax.random.categorical(key, _sampling_filter(logits, temperature, top_k))
            else:
                token = jnp.argmax(logits, axis=-1)
            token = jnp.where(done, 0, token).astype(jnp.int32)
            out = out.at[:, t].set(token)
            return t + 1, out, cache, done | (token == eos_id), rng

        state = (jnp.int32(0), out, cache, done, rng)
        return jax.lax.while_loop(cond, body, state)[1]

    return run


def _gather_beams(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [batch, beams, ...] -> x[b, indices[b, k], ...] for indices [batch, k]."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def _reorder_cache(cache: Any, flat_indices: jax.Array, batch_axis: int) -> Any:
    """Reorders the self-attention keys/values along the batch*beams axis."""

    def reorder(path, x):
        name = path[-1].key
        if name in ("cached_key", "cached_value"):
            return jnp.take(x, flat_indices, axis=batch_axis)
        return x
    return jax.tree_util.tree_map_with_path(reorder, cache)


def _beam_search(config: T5Config, max_len: int, num_beams: int, length_penalty: float,
                 early_stopping: bool | str, eos_id: int) -> Callable:
    """HF's vectorised beam search (transformers >= 4.50) over a fixed-shape KV cache."""
    model = T5(config)
    keep = 2 * num_beams
    top_mask = jnp.arange(keep) < num_beams
    batch_axis = 1 if config.scan_layers else 0

    def run(params, tokens, temperature, rng):
        del temperature, rng
        batch = tokens.shape[0]
        tokens = jnp.repeat(tokens, num_beams, axis=0)
        encoded = model.apply({"params": params}, tokens[::num_beams], method=T5.encode)
        encoded = jnp.repeat(encoded, num_beams, axis=0)
        cache = _init_cache(model, params, encoded, tokens, max_len)
        offsets = (jnp.arange(batch) * num_beams)[:, None]

        state = {
            "t": jnp.int32(0), "cache": cache,
            "running": jnp.zeros((batch, num_beams, max_len), jnp.int32),
            "running_scores": jnp.zeros((batch, num_beams)).at[:, 1:].set(_NEG),
            "finished": jnp.zeros((batch, num_beams, max_len), jnp.int32),
            "finished_scores": jnp.full((batch, num_beams), _NEG),
            "is_finished": jnp.zeros((batch, num_beams), bool),
            "improvable": jnp.ones((batch, 1), bool),
            "hits": jnp.zeros((batch, keep), bool),
        }

        def cond(s):
            open_beam = ~(jnp.all(s["is_finished"]) & (early_stopping is True))
            return ((s["t"] < max_len) & jnp.any(s["improvable"]) & open_beam
                    & ~jnp.all(s["hits"]))

        def body(s):
            t = s["t"]
            last = jnp.where(t > 0, s["running"][:, :, jnp.maximum(t - 1, 0)], 0).reshape(-1)
            logits, cache = _step(model, params, s["cache"], encoded, tokens, last, max_len)
            vocab = logits.shape[-1]
            log_probs = jax.nn.log_softmax(logits).reshape(batch, num_beams, vocab)
            log_probs = (log_probs + s["running_scores"][:, :, None]).reshape(batch, -1)

            topk_scores, topk_indices = jax.lax.top_k(log_probs, keep)
            source_beam = topk_indices // vocab
            topk_seqs = _gather_beams(s["running"], source_beam)
            topk_seqs = topk_seqs.at[:, :, t].set((topk_indices % vocab).astype(jnp.int32))
            hits = (topk_seqs[:, :, t] == eos_id) | (t + 1 >= max_len)

            # The best num_beams candidates that did not just finish keep running.
            next_idx = jax.lax.top_k(topk_scores + hits * _NEG, num_beams)[1]
            running = _gather_beams(topk_seqs, next_idx)
            running_scores = _gather_beams(topk_scores + hits * _NEG, next_idx)
            flat_source = (_gather_beams(source_beam, next_idx) + offsets).reshape(-1)
            cache = _reorder_cache(cache, flat_source, batch_axis)

            # Candidates among the top num_beams that just finished join the finished set.
            scores = topk_scores / ((t + 1).astype(jnp.float32) ** length_penalty)
            full = jnp.all(s["is_finished"], axis=-1, keepdims=True) & (early_stopping is True)
            scores = scores + full * _NEG + (~s["improvable"]) * _NEG
            just_finished = hits & top_mask[None, :]
            scores = scores + (~just_finished) * _NEG
            merged_scores = jnp.concatenate([s["finished_scores"], scores], axis=1)
            best = jax.lax.top_k(merged_scores, num_beams)[1]
            finished = _gather_beams(jnp.concatenate([s["finished"], topk_seqs], 1), best)
            finished_scores = _gather_beams(merged_scores, best)
            is_finished = _gather_beams(
                jnp.concatenate([s["is_finished"], just_finished], axis=1), best)

            # HF's heuristic: can a running beam still beat the worst finished one?
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = jnp.float32(max_len)
            else:
                best_len = (t + 1).astype(jnp.float32)
            best_running = running_scores[:, :1] / best_len ** length_penalty
            worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
            improvable = s["improvable"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
            return {"t": t + 1, "cache": cache, "running": running,
                    "running_scores": running_scores, "finished": finished,
                    "finished_scores": finished_scores, "is_finished": is_finished,
                    "improvable": improvable, "hits": hits}

        final = jax.lax.while_loop(cond, body, state)
        return final["finished"][:, 0]

    return run


@functools.lru_cache(maxsize=64)
def _compiled(config: T5Config, method: str, max_len: int, num_beams: int,
              length_penalty: float, early_stopping: bool | str, top_k: int,
              eos_id: int, mesh: Mesh | None = None, axis_rules: tuple | None = None
              ) -> Callable:
    """`jitted_decoder` for normalised options (each a hashable cache key)."""
    if method == "beam":
        fn = _beam_search(config, max_len, num_beams, length_penalty, early_stopping, eos_id)
    else:
        fn = _token_by_token(config, max_len, method == "sample", top_k, eos_id)
    if mesh is None:
        return jax.jit(fn)
    params = partitioning.params_shardings(abstract_params(config), mesh, axis_rules)
    batch = partitioning.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(params, batch, replicated, replicated), out_shardings=batch)


def jitted_decoder(config: T5Config, max_decode_len: int, method: str = "greedy",
                   num_beams: int = 4, length_penalty: float = 1.0,
                   early_stopping: bool | str = True, top_k: int = 0, eos_id: int = EOS_ID,
                   mesh: Mesh | None = None,
                   axis_rules: Sequence[tuple[str, Any]] | None = None) -> Callable:
    """The jitted decoder `generate` runs for these options (the same object, cached):
    `fn(params, encoder_input_tokens int32 [batch, length], temperature f32 [], rng key)` ->
    tokens int32 [batch, max_decode_len].

    For compile-only analysis (`fn.lower(...).compile()`) and compile-cache checks. It compiles
    once per input shape. With a mesh, its in/out shardings are the training run's; call it
    inside `partitioning.mesh_context(mesh, axis_rules)`. Options another method ignores do
    not make another decoder.
    """
    if method not in METHODS:
        raise ValueError(f"decoding: unknown method {method!r}; use one of {METHODS}")
    if max_decode_len < 1:
        raise ValueError(f"decoding: max_decode_len must be >= 1, got {max_decode_len}")
    if (mesh is None) != (axis_rules is None):
        raise ValueError("decoding: pass both mesh and axis_rules, or neither")
    beam, sample = method == "beam", method == "sample"
    if beam and num_beams < 1:
        raise ValueError(f"decoding: num_beams must be >= 1, got {num_beams}")
    rules = None if axis_rules is None else tuple(tuple(rule) for rule in axis_rules)
    return _compiled(config, method, int(max_decode_len), int(num_beams) if beam else 0,
                     float(length_penalty) if beam else 0.0, early_stopping if beam else False,
                     int(top_k) if sample else 0, int(eos_id), mesh, rules)


def generate(config: T5Config, params: Any, encoder_input_tokens: Any, max_decode_len: int,
             method: str = "greedy", num_beams: int = 4, length_penalty: float = 1.0,
             early_stopping: bool | str = True, temperature: float = 1.0, top_k: int = 0,
             rng: jax.Array | None = None, eos_id: int = EOS_ID, mesh: Mesh | None = None,
             axis_rules: Sequence[tuple[str, Any]] | None = None) -> jax.Array:
    """Decoded tokens int32 [batch, max_decode_len], 0 after each sequence's EOS.

    greedy: argmax each step. beam: HF-equivalent beam search, best hypothesis returned.
    sample: temperature / top-k sampling from `rng` (required). The decoder starts from id 0.
    `mesh` + `axis_rules` (e.g. `partitioning.logical_axis_rules(fsdp)`): decode on that mesh,
    params sharded by their logical axes and the batch (divisible by the data shards) over
    (data, fsdp); the tokens come back with the batch sharding.
    """
    fn = jitted_decoder(config, max_decode_len, method, num_beams, length_penalty,
                        early_stopping, top_k, eos_id, mesh, axis_rules)
    tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"generate: encoder_input_tokens must be [batch, length], got shape "
                         f"{tuple(tokens.shape)}")
    if method == "sample":
        if rng is None:
            raise ValueError("generate: method='sample' needs an rng key")
        if temperature <= 0:
            raise ValueError(f"generate: temperature must be > 0, got {temperature}")
    else:
        rng = jax.random.PRNGKey(0)
    context = contextlib.nullcontext() if mesh is None else partitioning.mesh_context(mesh,
                                                                                    axis_rules)
    with context:
        return fn(params, tokens, jnp.float32(temperature), rng)
