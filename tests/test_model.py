"""The Flax T5: configs, logical axis names, masking, scan / remat / dtype options."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sbs_jax.models import T5, abstract_params, get_config, init_params, stack_layers
from sbs_jax.models.layers import Dropout, dot, keep_mask
from sbs_jax.models.t5 import unstack_layers

VOCAB = 512
ENC = np.array([[5, 6, 7, 8, 1, 0, 0], [9, 3, 1, 0, 0, 0, 0]], np.int32)
DEC = np.array([[0, 4, 5, 6], [0, 7, 1, 0]], np.int32)


@pytest.fixture(scope="module", params=["t5_tiny", "t5_1_1_tiny"])
def model_and_params(request):
    config = get_config(request.param, vocab_size=VOCAB)
    return config, init_params(config, jax.random.PRNGKey(0))


@functools.cache
def _forward(config, enable_dropout):
    def forward(params, enc, dec, rng):
        rngs = {"dropout": rng} if enable_dropout else {}
        return T5(config).apply({"params": params}, enc, dec, enable_dropout=enable_dropout,
                                rngs=rngs)
    return jax.jit(forward)


def logits_of(config, params, enc=ENC, dec=DEC, enable_dropout=False, rng=None):
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return np.asarray(_forward(config, enable_dropout)(params, enc, dec, rng))


def test_published_sizes_and_overrides():
    small = get_config("t5_1_1_small")
    assert (small.emb_dim, small.num_heads, small.num_encoder_layers, small.mlp_dim) == (
        512, 6, 8, 1024)
    assert small.mlp_activations == ("gelu", "linear") and not small.logits_via_embedding
    base = get_config("t5_base")
    assert (base.emb_dim, base.mlp_dim, base.mlp_activations) == (768, 3072, ("relu",))
    assert base.logits_via_embedding and base.vocab_size == 32128
    assert get_config("flan_t5_xxl") == get_config("t5_1_1_xxl")
    assert get_config("t5_tiny", vocab_size=VOCAB).vocab_size == VOCAB
    # dtypes and activations are canonicalised, so equal configs hash alike (jit caches).
    bf16 = get_config("t5_tiny", dtype=jnp.bfloat16, mlp_activations=["relu"])
    assert bf16 == get_config("t5_tiny", dtype="bfloat16") and bf16.dtype == "bfloat16"
    assert hash(bf16) == hash(get_config("t5_tiny", dtype="bfloat16"))
    with pytest.raises(ValueError, match="t5_1_1_huge"):
        get_config("t5_1_1_huge")
    with pytest.raises(ValueError, match="emb_size"):
        get_config("t5_small", emb_size=3)
    with pytest.raises(ValueError, match="swish2"):
        get_config("t5_small", mlp_activations=("swish2",))


def test_every_param_has_logical_axes():
    abstract = abstract_params(get_config("t5_1_1_tiny", vocab_size=VOCAB))
    leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 10
    known = {"batch", "length", "embed", "mlp", "heads", "kv", "joined_kv", "vocab",
             "relpos_buckets", "layers"}
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= known
    flat = {"/".join(k.key for k in path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(
                abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
    assert flat["token_embedder/embedding"].names == ("vocab", "embed")
    assert flat["decoder/logits_dense/kernel"].names == ("embed", "vocab")
    assert flat["encoder/layers_0/mlp/wi_0/kernel"].names == ("embed", "mlp")
    assert flat["encoder/relpos_bias/rel_embedding"].names == ("heads", "relpos_buckets")


def test_padding_and_causality(model_and_params):
    config, params = model_and_params
    base = logits_of(config, params)
    assert base.shape == (2, 4, VOCAB) and np.isfinite(base).all()
    # More encoder padding changes nothing: padded keys are masked.
    more_pad = np.pad(ENC, ((0, 0), (0, 3)))
    np.testing.assert_allclose(logits_of(config, params, enc=more_pad), base, atol=1e-5)
    # A later decoder token never changes earlier positions (causal).
    changed = DEC.copy()
    changed[:, 3] = 11
    np.testing.assert_allclose(logits_of(config, params, dec=changed)[:, :3], base[:, :3],
                               atol=1e-5)
    assert not np.allclose(logits_of(config, params, dec=changed)[:, 3], base[:, 3])
    # A real encoder token does change the output.
    other = ENC.copy()
    other[0, 0] = 42
    assert not np.allclose(logits_of(config, params, enc=other)[0], base[0])


def test_dropout_needs_rng_and_varies(model_and_params):
    config, params = model_and_params
    base = logits_of(config, params)
    one = logits_of(config, params, enable_dropout=True, rng=jax.random.PRNGKey(1))
    two = logits_of(config, params, enable_dropout=True, rng=jax.random.PRNGKey(2))
    assert not np.allclose(one, base) and not np.allclose(one, two)
    np.testing.assert_array_equal(logits_of(config, params), base)


def test_scan_and_remat_give_identical_outputs_and_grads(model_and_params):
    config, params = model_and_params
    base = logits_of(config, params)

    def grads(cfg, p):
        loss = lambda q: jnp.sum(T5(cfg).apply({"params": q}, ENC, DEC) ** 2)
        return jax.jit(jax.grad(loss))(p)

    base_grads = grads(config, params)
    scanned_cfg = dataclasses.replace(config, scan_layers=True, remat_policy="full")
    scanned = stack_layers(params)
    np.testing.assert_allclose(logits_of(scanned_cfg, scanned), base, atol=1e-5)
    for remat in ("full", "minimal"):
        cfg = dataclasses.replace(config, remat_policy=remat)
        np.testing.assert_allclose(logits_of(cfg, params), base, atol=1e-6)
    back = unstack_layers(grads(scanned_cfg, scanned))
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(base_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * (1 + np.abs(b).max()))


def test_bf16_compute_with_fp32_params(model_and_params):
    config, params = model_and_params
    cfg = dataclasses.replace(config, dtype="bfloat16")
    out = _forward(cfg, False)(params, ENC, DEC, jax.random.PRNGKey(0))
    assert out.dtype == jnp.float32  # the output projection hands over its fp32 accumulator
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    base = logits_of(config, params)
    assert np.abs(np.asarray(out, np.float32) - base).max() < 0.1 * np.abs(base).max()


def test_bf16_dot_accumulates_in_fp32_and_keeps_the_dtype():
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    x = jax.random.normal(keys[0], (16, 512)).astype(jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (512, 64))  # float32 params, bf16 compute
    exact = np.asarray(x, np.float64) @ np.asarray(kernel.astype(jnp.bfloat16), np.float64)
    got = jax.jit(dot)(x, kernel)
    assert got.dtype == jnp.bfloat16
    # One bf16 rounding of an fp32 sum: within bf16's half-ulp (2^-9) of the exact value.
    np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2 ** -8, atol=1e-2)
    grads = jax.grad(lambda a, b: jnp.sum(dot(a, b).astype(jnp.float32)), (0, 1))(x, kernel)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32]
    logits = dot(x, kernel.T, kernel_axis=1, out_dtype=jnp.float32)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits, np.float64), exact, rtol=1e-5, atol=1e-4)


def _dots(jaxpr) -> list:
    """Every dot_general equation of a jaxpr, sub-jaxprs (pjit, remat, scan) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _dots(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _dots(sub)
    return found


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bf16_compute_runs_every_dot_in_bf16(scan_layers):
    """Under bf16 compute every dot of the forward takes bf16 operands and returns bf16 (the
    MLP's too), except the attention scores (float32 for the softmax) and the logits; in the
    backward only those dots' transposes see a float32 operand (their cotangent)."""
    cfg = get_config("t5_1_1_tiny", vocab_size=VOCAB, dtype="bfloat16", scan_layers=scan_layers)
    params = init_params(cfg, jax.random.PRNGKey(0))

    def loss(p):
        return jnp.sum(T5(cfg).apply({"params": p}, ENC, DEC) ** 2)

    forward = _dots(jax.make_jaxpr(loss)(params).jaxpr)
    assert all(v.aval.dtype == jnp.bfloat16 for eqn in forward for v in eqn.invars)
    f32_out = [eqn.outvars[0].aval for eqn in forward if eqn.outvars[0].aval.dtype != jnp.bfloat16]
    # scan traces one layer per stack: encoder, decoder self- and cross-attention
    attention = 3 if scan_layers else cfg.num_encoder_layers + 2 * cfg.num_decoder_layers
    assert sorted(a.ndim for a in f32_out) == [3] + [4] * attention  # logits, scores
    backward = _dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    mixed = [eqn for eqn in backward if any(v.aval.dtype == jnp.float32 for v in eqn.invars)]
    assert len(backward) == 3 * len(forward) and len(mixed) == 2 * len(f32_out)


def test_keep_mask_is_bernoulli_per_element_and_follows_the_seed():
    shape = (4, 6, 128, 128)
    mask = np.asarray(keep_mask(jnp.array([1, 2], jnp.uint32), shape, 0.9))
    again = np.asarray(keep_mask(jnp.array([1, 2], jnp.uint32), shape, 0.9))
    other = np.asarray(keep_mask(jnp.array([1, 3], jnp.uint32), shape, 0.9))
    np.testing.assert_array_equal(mask, again)
    n = mask.size
    assert abs(mask.mean() - 0.9) < 4 * (0.09 / n) ** 0.5
    # Independent of another seed's mask, of neighbouring columns, and of the next row.
    assert abs((mask == other).mean() - 0.82) < 4 * (0.15 / n) ** 0.5
    rows = mask.reshape(-1, shape[-1]).astype(np.float64)
    assert abs(np.corrcoef(rows[:, :-1].ravel(), rows[:, 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(rows[:-1].ravel(), rows[1:].ravel())[0, 1]) < 0.01
    assert np.asarray(keep_mask(jnp.array([5, 6], jnp.uint32), shape, 1.0)).all()


def test_keep_mask_does_not_depend_on_the_mesh():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    shape, seed = (8, 4, 16, 32), jnp.array([7, 9], jnp.uint32)
    whole = np.asarray(jax.jit(lambda s: keep_mask(s, shape, 0.5))(seed))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("a", "b", "c"))
    sharded = jax.jit(lambda s: keep_mask(s, shape, 0.5),
                      out_shardings=NamedSharding(mesh, PartitionSpec("a", "b", None, "c")))
    np.testing.assert_array_equal(np.asarray(sharded(seed)), whole)


def test_dropout_scales_kept_values_and_is_identity_when_off():
    x = jnp.ones((64, 256), jnp.float32)
    on = Dropout(0.25, deterministic=False).apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_allclose(np.unique(np.asarray(on)), [0.0, 1.0 / 0.75], rtol=1e-6)
    assert abs(float(jnp.mean(on)) - 1.0) < 0.05
    np.testing.assert_array_equal(Dropout(0.25, deterministic=True).apply({}, x), x)
