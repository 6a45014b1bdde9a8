"""Schedules and optimizers against PyTorch/HF's reference recipe and their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sbs_jax.train import optim


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


def test_rsqrt_decay_is_t5xs_default_schedule():
    # T5X: constant 1.0 * rsqrt_decay with warmup_steps 10k = 1 / sqrt(max(step, 10k)).
    t5x = optim.make_schedule("rsqrt_decay", 1.0, total_steps=4000, warmup_steps=10_000)
    for step, want in [(0, 0.01), (1, 0.01), (9_999, 0.01), (10_000, 0.01), (40_000, 0.005),
                       (250_000, 0.002)]:
        assert float(t5x(step)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="rsqrt_decay' needs warmup_steps > 0"):
        optim.make_schedule("rsqrt_decay", 1.0, total_steps=10)


def _t5x_adafactor_reference(params, grads_per_step, lr_fn):
    """Adafactor as T5X defines it (numpy, float64): relative step, factored second moments,
    update clipping, no momentum. Written from the paper / T5X's documented defaults."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    moments: dict = {}
    for step, grads in enumerate(grads_per_step):
        beta2 = 1.0 - (step + 1.0) ** -0.8
        for name, p in params.items():
            g = np.asarray(grads[name], np.float64)
            g2 = g * g + 1e-30
            dims = np.argsort(p.shape)
            factored = p.ndim >= 2 and p.shape[dims[-2]] >= 128
            if factored:
                col_axis, row_axis = dims[-1], dims[-2]  # reduce over these to get row / col
                row, col = moments.get(name, (0.0, 0.0))
                row = beta2 * row + (1 - beta2) * g2.mean(axis=col_axis)
                col = beta2 * col + (1 - beta2) * g2.mean(axis=row_axis)
                moments[name] = (row, col)
                v = (np.expand_dims(row / row.mean(), col_axis)
                     * np.expand_dims(col, row_axis))
            else:
                v = moments[name] = beta2 * moments.get(name, 0.0) + (1 - beta2) * g2
            update = g / np.sqrt(v)
            update /= max(1.0, np.sqrt(np.mean(update * update)) / 1.0)
            scale = max(np.sqrt(np.mean(p * p)), 1e-3)
            params[name] = p - lr_fn(step) * scale * update
    return params


def test_adafactor_gin_gives_t5xs_adafactor(tmp_path):
    from sbs_jax.runtime import gin_utils
    from sbs_jax.train import run_config

    gin_utils.parse_gin(["gin/sbs_base.gin", "gin/adafactor.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    cfg = run_config.from_gin()
    assert (cfg.optimizer, cfg.schedule, cfg.learning_rate, cfg.warmup_steps, cfg.clip_norm,
            cfg.weight_decay) == ("adafactor", "rsqrt_decay", 1.0, 10_000, None, 0.0)
    schedule = optim.make_schedule(cfg.schedule, cfg.learning_rate, cfg.train_steps,
                                   cfg.warmup_steps)
    tx = optim.make_optimizer(schedule, cfg.optimizer, cfg.weight_decay, cfg.clip_norm)
    rng = np.random.default_rng(0)
    # factored (256 x 128), unfactored matrix (8 x 300: second dim < 128), vector, tiny params
    # (RMS below 1e-3: the parameter-scale floor).
    params = {"w": rng.normal(size=(256, 128)), "m": rng.normal(size=(8, 300)) * 0.05,
              "b": rng.normal(size=(16,)), "s": np.full((4,), 1e-5)}
    grads = [{k: rng.normal(size=v.shape) * (10.0 if step == 1 else 1.0)
              for k, v in params.items()} for step in range(4)]
    want = _t5x_adafactor_reference(params, grads, lambda step: float(schedule(step)))
    ours = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(ours)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()},
                                state, ours)
        ours = optax.apply_updates(ours, updates)
    for name, start in params.items():
        # Compared as total updates (float32 rounding of the parameters themselves aside).
        np.testing.assert_allclose(np.asarray(ours[name], np.float64) - start,
                                   want[name] - start, rtol=1e-4,
                                   atol=1e-6 * np.abs(start).max(), err_msg=name)
    # The updates really moved every parameter (the comparison is not of unchanged values).
    assert all(np.abs(want[k] - params[k]).max() > 1e-8 for k in params)


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
