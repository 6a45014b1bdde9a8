"""sbs_loss and the token losses against independent numpy / PyTorch computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from sbs_jax.train import losses


def _batch(rng, batch, length, vocab, lengths):
    targets = rng.integers(1, vocab, size=(batch, length))
    weights = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    targets = targets * weights
    return {"decoder_target_tokens": targets, "decoder_loss_weights": weights}


def _np_token_mean_ce(logits, batch):
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tgt = np.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    w = batch["decoder_loss_weights"]
    return -(tgt * w).sum() / w.sum()


def test_sbs_loss_is_alpha_mix_of_each_tasks_own_token_mean():
    rng = np.random.default_rng(0)
    vocab = 32
    label = _batch(rng, 4, 3, vocab, [1, 2, 3, 1])
    rationale = _batch(rng, 4, 20, vocab, [20, 5, 17, 9])
    label_logits = rng.normal(size=(4, 3, vocab)).astype(np.float32)
    rationale_logits = rng.normal(size=(4, 20, vocab)).astype(np.float32)
    total, parts = losses.sbs_loss(label_logits, label, rationale_logits, rationale, alpha=0.3)
    want_label = _np_token_mean_ce(label_logits, label)
    want_rat = _np_token_mean_ce(rationale_logits, rationale)
    np.testing.assert_allclose(parts["label_loss"], want_label, rtol=1e-5)
    np.testing.assert_allclose(parts["rationale_loss"], want_rat, rtol=1e-5)
    np.testing.assert_allclose(total, 0.3 * want_label + 0.7 * want_rat, rtol=1e-5)
    # A summed (T5X-style) loss over both batches would weight rationales by their token count.
    summed = (want_label * 7 + want_rat * 51) / 58
    assert abs(float(total) - summed) > 1e-3


def test_standard_mode_is_label_loss_only():
    rng = np.random.default_rng(1)
    label = _batch(rng, 2, 4, 16, [4, 2])
    logits = rng.normal(size=(2, 4, 16)).astype(np.float32)
    total, parts = losses.sbs_loss(logits, label, None, None, alpha=0.5)
    np.testing.assert_allclose(total, _np_token_mean_ce(logits, label), rtol=1e-5)
    assert set(parts) == {"label_loss"}


def test_cross_entropy_matches_pytorch_with_padding_ignored():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    batch = _batch(rng, 3, 6, 50, [6, 3, 1])
    logits = rng.normal(size=(3, 6, 50)).astype(np.float32)
    ours = losses.mean_loss(losses.token_loss_sums(logits, batch))
    targets = torch.tensor(batch["decoder_target_tokens"]).masked_fill(
        torch.tensor(batch["decoder_loss_weights"]) == 0, -100
    )
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 50), targets.reshape(-1), ignore_index=-100
    )
    np.testing.assert_allclose(ours, ref.item(), rtol=1e-5)


def test_z_loss_adds_squared_log_normaliser():
    rng = np.random.default_rng(3)
    batch = _batch(rng, 2, 5, 20, [5, 3])
    logits = rng.normal(size=(2, 5, 20)).astype(np.float32) + 3.0
    plain = losses.token_loss_sums(logits, batch)
    with_z = losses.token_loss_sums(logits, batch, z_loss=1e-2)
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    want_z = 1e-2 * (log_z**2 * batch["decoder_loss_weights"]).sum()
    np.testing.assert_allclose(with_z.z_loss, want_z, rtol=1e-5)
    np.testing.assert_allclose(with_z.loss - plain.loss, want_z, rtol=1e-4)
    _, parts = losses.sbs_loss(logits, batch, None, None, alpha=0.5, z_loss=1e-2)
    np.testing.assert_allclose(parts["label_z_loss"], want_z / 8, rtol=1e-5)


def test_label_smoothing_is_zero_at_the_smoothed_target_and_positive_elsewhere():
    vocab, eps = 10, 0.1
    targets = np.array([[3, 7]])
    batch = {"decoder_target_tokens": targets, "decoder_loss_weights": np.ones((1, 2))}
    smoothed = np.full((1, 2, vocab), eps / (vocab - 1))
    smoothed[0, 0, 3] = smoothed[0, 1, 7] = 1 - eps
    at_target = losses.token_loss_sums(jnp.log(smoothed), batch, label_smoothing=eps)
    assert abs(float(at_target.loss)) < 1e-5
    one_hot = np.log(np.clip(smoothed * 0 + np.eye(vocab)[targets], 1e-9, 1))
    away = losses.token_loss_sums(one_hot, batch, label_smoothing=eps)
    assert float(away.loss) > 0.5


def test_micro_batches_with_the_whole_batch_counts_add_up_to_the_big_batch_loss():
    rng = np.random.default_rng(4)
    label, rationale = _batch(rng, 4, 7, 30, [7, 1, 4, 2]), _batch(rng, 4, 9, 30, [9, 3, 5, 1])
    logits = {"label": rng.normal(size=(4, 7, 30)).astype(np.float32),
              "rationale": rng.normal(size=(4, 9, 30)).astype(np.float32)}
    options = {"alpha": 0.3, "label_smoothing": 0.1, "z_loss": 1e-3}
    big_total, big_parts = losses.sbs_loss(logits["label"], label, logits["rationale"],
                                           rationale, **options)
    assert set(big_parts) == {"label_loss", "rationale_loss", "label_z_loss", "rationale_z_loss"}
    counts = {"label": label["decoder_loss_weights"].sum(),
              "rationale": rationale["decoder_loss_weights"].sum()}
    total, parts = 0.0, dict.fromkeys(big_parts, 0.0)
    # 8 + 6 label and 12 + 6 rationale tokens: a mean of micro-batch means would differ
    for rows in (slice(0, 2), slice(2, 4)):
        half = {k: v[rows] for k, v in label.items()}
        half_rationale = {k: v[rows] for k, v in rationale.items()}
        mb_total, mb_parts = losses.sbs_loss(
            logits["label"][rows], half, logits["rationale"][rows], half_rationale, **options,
            loss_normalizing_factors=counts)
        total += mb_total
        parts = {k: parts[k] + mb_parts[k] for k in parts}
    np.testing.assert_allclose(total, big_total, rtol=1e-6)
    for key in big_parts:
        np.testing.assert_allclose(parts[key], big_parts[key], rtol=1e-6, err_msg=key)


def test_empty_batch_gives_zero_not_nan():
    batch = {"decoder_target_tokens": np.zeros((2, 3), int), "decoder_loss_weights": np.zeros((2, 3))}
    assert float(losses.mean_loss(losses.token_loss_sums(np.zeros((2, 3, 8)), batch))) == 0.0
