"""The CPU backend's training model: the same outputs and gradients as T5, every projection
through `cpu.training.matmul`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbs_jax.models import T5, cpu, get_config, init_params, stack_layers
from sbs_jax.models.cpu.training import CpuTrainingT5

VOCAB = 128
_rng = np.random.default_rng(0)
ENC = _rng.integers(2, VOCAB, (2, 12)).astype(np.int32)
DEC = _rng.integers(2, VOCAB, (2, 6)).astype(np.int32)
CONFIG = get_config("t5_1_1_tiny", vocab_size=VOCAB, num_encoder_layers=1, num_decoder_layers=1)


def _loss(model):
    def loss(p):
        logits = model.apply({"params": p}, ENC, DEC, enable_dropout=True,
                             rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
    return loss


def test_training_model_on_the_cpu_backend():
    assert type(cpu.training_model(CONFIG)) is CpuTrainingT5


@pytest.mark.parametrize("scan_layers", [False, True])
def test_same_loss_and_gradients_as_t5(scan_layers):
    config = dataclasses.replace(CONFIG, scan_layers=scan_layers,
                                 remat_policy="full" if scan_layers else "none")
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    if scan_layers:
        params = stack_layers(params)
    ours = _loss(cpu.training_model(config))
    # Every Dense runs as the custom-VJP matmul: 7 an encoder layer, 11 a decoder layer, logits.
    jaxpr = str(jax.make_jaxpr(ours)(params))
    assert jaxpr.count("custom_vjp_call") == 7 + 11 + 1 and "custom_vjp_call" not in str(
        jax.make_jaxpr(_loss(T5(config)))(params))
    value, grads = jax.jit(jax.value_and_grad(ours))(params)
    want_value, want = jax.jit(jax.value_and_grad(_loss(T5(config))))(params)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_float32_kernel_gradients():
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    grads = jax.grad(_loss(cpu.training_model(config)))(params)
    want = jax.grad(_loss(T5(config)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(np.abs(b).max()))
