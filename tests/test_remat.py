"""Remat policies: what each layer keeps for the backward pass, measured; same gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbs_jax.models import T5, get_config, init_params, stack_layers
from sbs_jax.models.config import REMAT_POLICIES

VOCAB = 128
_rng = np.random.default_rng(0)
ENC = _rng.integers(2, VOCAB, (4, 32)).astype(np.int32)
DEC = _rng.integers(2, VOCAB, (4, 16)).astype(np.int32)
UNSCANNED = get_config("t5_1_1_tiny", vocab_size=VOCAB, num_encoder_layers=1,
                       num_decoder_layers=1)


@pytest.fixture(scope="module")
def params():
    return init_params(UNSCANNED, jax.random.PRNGKey(0))


def _backward(config):
    """p -> the vjp function of a training forward (dropout on): its leaves are the residuals
    kept for the backward pass."""
    def loss(p):
        logits = T5(config).apply({"params": p}, ENC, DEC, enable_dropout=True,
                                  rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
    return lambda p: jax.vjp(loss, p)[1]


def _config(policy, scan_layers=False):
    return dataclasses.replace(UNSCANNED, remat_policy=policy, scan_layers=scan_layers)


def residuals_and_grads(config, params):
    """(bytes of the residuals by memory kind, gradients), compiled and run."""
    @jax.jit
    def run(p):
        backward = _backward(config)(p)
        return backward, backward(jnp.ones((), jnp.float32))[0]

    backward, grads = run(params)
    kept: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(backward):
        kind = leaf.sharding.memory_kind
        kept[kind] = kept.get(kind, 0) + leaf.nbytes
    return kept, grads


def _assert_same(grads, reference, what):
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=what)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_each_policy_keeps_less_than_the_one_before(params, scan_layers):
    if scan_layers:
        params = stack_layers(params)
    kept = {}
    for policy in ("none", "dots", "minimal", "full"):
        shapes = jax.eval_shape(_backward(_config(policy, scan_layers)), params)
        kept[policy] = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
    # none keeps every activation; dots the projections' and attention's dot outputs; minimal
    # the projections' only; full only each layer's inputs.
    assert kept["none"] > kept["dots"] > kept["minimal"] > kept["full"], kept


def test_policies_give_the_same_gradients_and_offload_keeps_the_dots_on_the_host(params):
    kept, grads = {}, {}
    for policy in REMAT_POLICIES:
        kept[policy], grads[policy] = residuals_and_grads(_config(policy), params)
        _assert_same(grads[policy], grads["none"], policy)
    assert all(set(k) == {"device"} for p, k in kept.items() if p != "offload"), kept
    minimal = kept["minimal"]["device"]
    assert kept["offload"]["device"] + kept["offload"]["pinned_host"] == minimal
    assert kept["full"]["device"] <= kept["offload"]["device"] < minimal, kept
    # Scanned layers offload too, to the gradients of the scanned layers without remat (the
    # scan draws other dropout masks than the unrolled layers).
    stacked = stack_layers(params)
    scanned_kept, scanned_grads = residuals_and_grads(_config("offload", True), stacked)
    assert scanned_kept["pinned_host"] > 0
    _assert_same(scanned_grads, residuals_and_grads(_config("none", True), stacked)[1],
                 "offload, scanned")
