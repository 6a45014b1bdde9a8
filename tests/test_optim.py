"""Schedules and optimizers against PyTorch/HF's reference recipe and their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sbs_jax import optim


def test_linear_schedule_matches_hf_linear_with_warmup():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    for warmup in (0, 3):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=5e-5)
        hf = transformers.get_linear_schedule_with_warmup(opt, warmup, 20)
        ours = optim.make_schedule("linear", 5e-5, total_steps=20, warmup_steps=warmup)
        for step in range(22):
            np.testing.assert_allclose(float(ours(step)), hf.get_last_lr()[0], rtol=1e-5, atol=1e-12)
            opt.step()
            hf.step()


def test_other_schedules_follow_their_definitions():
    const = optim.make_schedule("constant", 0.1, total_steps=10)
    assert float(const(0)) == pytest.approx(0.1) and float(const(9)) == pytest.approx(0.1)
    rsqrt = optim.make_schedule("warmup_rsqrt", 1.0, total_steps=1000, warmup_steps=100)
    assert float(rsqrt(50)) == pytest.approx(0.5)
    assert float(rsqrt(100)) == pytest.approx(1.0)
    assert float(rsqrt(400)) == pytest.approx(math.sqrt(100 / 400))
    cos = optim.make_schedule("cosine", 2.0, total_steps=110, warmup_steps=10)
    assert float(cos(10)) == pytest.approx(2.0)
    assert float(cos(60)) == pytest.approx(1.0, rel=1e-5)
    assert float(cos(110)) == pytest.approx(0.0, abs=1e-6)


def test_adamw_with_clipping_matches_torch_adamw_without_weight_decay():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    target = rng.normal(size=(4, 3)).astype(np.float32) * 10  # large grads: clipping is active

    tw = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.AdamW([tw], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    tx = optim.make_optimizer(optim.make_schedule("linear", 1e-2, total_steps=5))
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: (5 - s) / 5)
    params = jnp.asarray(w0)
    state = tx.init(params)
    loss_fn = lambda p: jnp.sum((p - target) ** 2)
    for _ in range(5):
        topt.zero_grad()
        torch.sum((tw - torch.tensor(target)) ** 2).backward()
        torch.nn.utils.clip_grad_norm_([tw], 1.0)
        topt.step()
        tsched.step()
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adafactor_factors_large_matrices_and_descends():
    tx = optim.make_optimizer(optim.make_schedule("constant", 1e-2, 10), name="adafactor")
    params = {"w": jnp.ones((128, 256)), "b": jnp.ones((8,))}
    state = tx.init(params)
    leaves = jax.tree_util.tree_leaves(state)
    # A factored second moment keeps a row and a column vector instead of a 128x256 matrix.
    shapes = {tuple(x.shape) for x in leaves if hasattr(x, "shape")}
    assert (128,) in shapes and (256,) in shapes and (128, 256) not in shapes
    loss_fn = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
    before = loss_fn(params)
    for _ in range(3):
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss_fn(params) < before


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="make_schedule.name='cosinus'"):
        optim.make_schedule("cosinus", 1.0, 10)
    with pytest.raises(ValueError, match="make_optimizer.name='sgd'"):
        optim.make_optimizer(optim.make_schedule("constant", 1.0, 10), name="sgd")
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule("linear", 1.0, total_steps=5, warmup_steps=10)
