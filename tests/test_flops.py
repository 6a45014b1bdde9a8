"""benchmarks/flops.py: the T5 FLOP count against a hand count and against XLA's cost analysis."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbs_jax import models
from sbs_jax.train import losses, optim, partitioning
from sbs_jax.train import step as step_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import flops  # benchmarks/ holds scripts, not a package
import peak

# Matmul-dominated but quick to compile: XLA's extra elementwise FLOPs stay within ~1-4%.
CONFIG = models.get_config("t5_1_1_tiny", vocab_size=256, emb_dim=128, num_heads=4, head_dim=32,
                           mlp_dim=512, num_encoder_layers=2, num_decoder_layers=2,
                           dropout_rate=0.0)
BATCH, INPUT_LEN, LABEL_LEN, RATIONALE_LEN = 4, 32, 8, 16


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def _batch(rng, target_len):
    enc = rng.integers(2, CONFIG.vocab_size, (BATCH, INPUT_LEN)).astype(np.int32)
    targets = rng.integers(2, CONFIG.vocab_size, (BATCH, target_len)).astype(np.int32)
    dec = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}


@pytest.fixture(scope="module")
def params():
    return models.init_params(CONFIG, jax.random.PRNGKey(0))


def test_hand_count_of_a_one_layer_model():
    # d=4, 2 heads x 2 = inner 4, mlp 8 (one ReLU input projection), vocab 16; 2 inputs, 1 target.
    config = models.get_config("t5_tiny", vocab_size=16, emb_dim=4, num_heads=2, head_dim=2,
                               mlp_dim=8, num_encoder_layers=1, num_decoder_layers=1)
    fwd = flops.forward_flops(config, batch=1, input_len=2, target_len=1)
    # encoder, per input token: Q,K,V,out 4 x 2*4*4 = 128; wi + wo 2 x 2*4*8 = 128
    assert fwd.encoder_matmul == 2 * (128 + 128)
    # scores and AV over 2 keys: 2 x 2*2*4 per token
    assert fwd.encoder_attention == 2 * 32
    # decoder token: self 128 + cross Q,out 64 + MLP 128; cross K,V on 2 inputs: 2 x 2*4*4 x 2
    assert fwd.decoder_matmul == 320 + 128
    # self-attention over 1 key + cross-attention over 2 keys: 2 x 2*(1+2)*4
    assert fwd.decoder_attention == 48
    assert fwd.lm_head == 2 * 4 * 16
    assert fwd.total == 1200
    assert flops.train_flops(config, 1, 2, 1) == 3600
    step = flops.sbs_step_flops(config, 1, 2, 1, 1)
    assert step == {"label": 3600, "rationale": 3600, "total": 7200}


def test_forward_matches_xla_cost_analysis(params):
    batch = _batch(np.random.default_rng(0), RATIONALE_LEN)
    model = models.T5(CONFIG)
    xla = _xla_flops(lambda p, e, d: model.apply({"params": p}, e, d), params,
                     batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    ours = flops.forward_flops(CONFIG, BATCH, INPUT_LEN, RATIONALE_LEN).total
    # XLA also counts norms, softmax and activations: a little more, never less.
    assert 0.98 * xla < ours <= xla, (ours, xla)


def test_sbs_train_step_matches_xla_cost_analysis(params):
    rng = np.random.default_rng(1)
    batches = {"label": _batch(rng, LABEL_LEN), "rationale": _batch(rng, RATIONALE_LEN)}
    mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
    part = partitioning.Partitioner(mesh, partitioning.logical_axis_rules(), CONFIG)
    schedule = optim.make_schedule("linear", 1e-3, total_steps=10)
    tx = optim.make_optimizer(schedule)
    state = step_lib.init_state(part, CONFIG, tx, seed=0, params=params)
    step = jax.jit(lambda s, b: step_lib.train_step(
        s, b, model=models.T5(CONFIG), tx=tx, schedule=schedule,
        options=step_lib.StepOptions(alpha=0.5), batch_sharding=part.batch_sharding))
    with part.context():
        xla = _xla_flops(step, state, batches)
    ours = flops.sbs_step_flops(CONFIG, BATCH, INPUT_LEN, LABEL_LEN, RATIONALE_LEN)["total"]
    # + AdamW and clipping (~20 FLOPs per parameter) and the elementwise work of both passes.
    assert 0.95 * xla < ours <= xla, (ours, xla)
    assert ours == 3 * (flops.forward_flops(CONFIG, BATCH, INPUT_LEN, LABEL_LEN).total
                        + flops.forward_flops(CONFIG, BATCH, INPUT_LEN, RATIONALE_LEN).total)


def test_loss_gradient_is_three_forwards(params):
    batch = _batch(np.random.default_rng(2), LABEL_LEN)
    model = models.T5(CONFIG)

    def loss(p, b):
        logits = model.apply({"params": p}, b["encoder_input_tokens"], b["decoder_input_tokens"])
        return losses.mean_loss(losses.token_loss_sums(logits, b))

    xla = _xla_flops(jax.grad(loss), params, {k: jnp.asarray(v) for k, v in batch.items()})
    ours = flops.train_flops(CONFIG, BATCH, INPUT_LEN, LABEL_LEN)
    assert 0.97 * xla < ours <= xla, (ours, xla)


@pytest.mark.parametrize("device_kind, expected", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12), ("cpu", None)])
def test_published_peak_picks_the_most_specific_device_kind(device_kind, expected):
    assert peak.published_peak(device_kind) == expected
