"""The jitted sbs step: its objective is sbs_loss, mesh-independent losses, exact gradient
accumulation, batch checks."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest

from sbs_jax import models
from sbs_jax.train import losses, optim, partitioning
from sbs_jax.train import step as step_lib

# Heads, mlp and vocab divisible by 8 so the 1x1x8 mesh shards every model dimension; one layer
# per stack keeps compiles short.
CONFIG = models.get_config("t5_1_1_tiny", vocab_size=128, num_heads=8, head_dim=4,
                           num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1)
SCHEDULE = optim.make_schedule("linear", 1e-2, total_steps=10)
# Adam divides by sqrt(v) + eps: with the default eps 1e-8 a float-rounding difference in a
# near-zero gradient (another summation order on another mesh) moved one cross-attention
# parameter by 1.8% of an lr=1e-2 step. eps 1e-6 bounds that amplification (the same run:
# 3e-5), so parameters get 1% of a step.
TX = optim.make_optimizer(SCHEDULE, eps=1e-6)
PARAM_ATOL = 1e-4


def _view(rng, batch, in_len, tgt_len, min_tokens):
    enc = rng.integers(2, CONFIG.vocab_size, (batch, in_len)).astype(np.int32)
    lengths = rng.integers(min_tokens, tgt_len + 1, batch)
    weights = (np.arange(tgt_len)[None] < lengths[:, None]).astype(np.int32)
    targets = rng.integers(2, CONFIG.vocab_size, (batch, tgt_len)).astype(np.int32) * weights
    dec = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": targets, "decoder_loss_weights": weights}


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [{"label": _view(rng, 16, 12, 4, 1), "rationale": _view(rng, 16, 12, 20, 5)}
            for _ in range(3)]


def _train(mesh_shape, batches, num_microbatches=1, views=("label", "rationale"), config=CONFIG,
           tx=TX):
    mesh = partitioning.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    part = partitioning.Partitioner(mesh, partitioning.logical_axis_rules(), config)
    state = step_lib.init_state(part, config, tx, seed=0)
    options = step_lib.StepOptions(alpha=0.5, num_microbatches=num_microbatches, seed=3)
    step = step_lib.make_train_step(part, models.T5(config), tx, SCHEDULE, options)
    history = []
    for local in batches:
        gb = {v: step_lib.global_batch(local[v], part.batch_sharding, 16) for v in views}
        state, metrics = step(state, gb)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


@pytest.fixture(scope="module")
def single_device_run(batches):
    return _train((1, 1, 1), batches)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_meshes_match_one_device(mesh_shape, batches, single_device_run):
    ref_state, ref_history = single_device_run
    state, history = _train(mesh_shape, batches)
    for ours, ref in zip(history, ref_history):
        for key in ("loss", "label_loss", "rationale_loss", "grad_norm"):
            np.testing.assert_allclose(ours[key], ref[key], rtol=2e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=PARAM_ATOL)
    assert int(state.step) == len(batches)


def test_step_logs_both_losses_and_learns(single_device_run):
    _, history = single_device_run
    first = history[0]
    np.testing.assert_allclose(
        first["loss"], 0.5 * first["label_loss"] + 0.5 * first["rationale_loss"], rtol=1e-6)
    assert history[-1]["loss"] < history[0]["loss"]
    np.testing.assert_allclose([h["learning_rate"] for h in history], [1e-2, 9e-3, 8e-3],
                               rtol=1e-6)


def test_gradient_accumulation_equals_the_big_batch_step(batches):
    # Dropout masks are drawn per micro-batch, so compare without dropout; plain SGD makes the
    # parameter difference the gradient difference (Adam would magnify rounding in tiny ones).
    config = dataclasses.replace(CONFIG, dropout_rate=0.0)
    sgd = optax.sgd(0.5)
    big_state, big = _train((2, 1, 1), batches[:2], 1, config=config, tx=sgd)
    acc_state, acc = _train((2, 1, 1), batches[:2], 4, config=config, tx=sgd)
    for ours, ref in zip(acc, big):
        for key in ("loss", "label_loss", "rationale_loss", "grad_norm",
                    "label_tokens", "rationale_tokens"):
            np.testing.assert_allclose(ours[key], ref[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(acc_state.params), jax.tree.leaves(big_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_step_objective_is_sbs_loss_with_its_options(batches):
    # Two micro-batches: the loop path; one micro-batch calls the same objective without it.
    config = dataclasses.replace(CONFIG, dropout_rate=0.0)
    model, params = models.T5(config), models.init_params(config, jax.random.PRNGKey(1))
    options = step_lib.StepOptions(alpha=0.3, num_microbatches=2,
                                   label_smoothing=0.1, z_loss=1e-3)
    mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
    step = jax.jit(functools.partial(step_lib.loss_and_grads, model, options=options,
                                     batch_sharding=partitioning.batch_sharding(mesh)))
    _, metrics = step(params, batches[0], jax.random.PRNGKey(0))
    logits = {view: model.apply({"params": params}, batch["encoder_input_tokens"],
                                batch["decoder_input_tokens"])
              for view, batch in batches[0].items()}
    total, parts = losses.sbs_loss(logits["label"], batches[0]["label"], logits["rationale"],
                                   batches[0]["rationale"], 0.3, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
    assert set(parts) == {"label_loss", "rationale_loss", "label_z_loss", "rationale_z_loss"}
    for key, value in parts.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)


def test_batch_not_divisible_by_data_axes_names_batch_size():
    mesh = partitioning.make_mesh((4, 2, 1))
    with pytest.raises(ValueError, match=r"BATCH_SIZE=12 .*data x fsdp = 8"):
        step_lib.check_batch_size(12, mesh, num_microbatches=1)
    with pytest.raises(ValueError, match=r"BATCH_SIZE=16 .*num_microbatches x data shards"):
        step_lib.check_batch_size(16, mesh, num_microbatches=4)
    step_lib.check_batch_size(32, mesh, num_microbatches=4)
