"""Packing (seqio/T5X `pack=True`): packed rows, the model's segment masks, the same objective
as unpacked batches, and a packed training run on the 8-device mesh."""

import functools

import jax
import numpy as np
import pytest

import tasks
from sbs_jax.data import packing, pipeline
from sbs_jax.data.packing import pack_rows, packed_encdec_batch
from sbs_jax.models import T5, get_config, init_params
from sbs_jax.train import loop, run_config
from sbs_jax.train import step as step_lib

VOCAB = 128
TINY = {"emb_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32, "num_encoder_layers": 2,
        "num_decoder_layers": 2, "dropout_rate": 0.0, "vocab_size": VOCAB}


def _examples(rng, count, max_input=20, max_target=9):
    """Token lists ending in EOS (1) like the tasks' examples; ids >= 2."""
    def one(length):
        return np.append(rng.integers(2, VOCAB, length - 1), 1).astype(np.int32)
    inputs = [one(int(n)) for n in rng.integers(2, max_input + 1, count)]
    targets = [one(int(n)) for n in rng.integers(2, max_target + 1, count)]
    return inputs, targets


def test_pack_rows_places_every_example_once_within_the_lengths():
    rng = np.random.default_rng(0)
    inputs, targets = _examples(rng, 50)
    inputs.append(np.zeros((0,), np.int32))  # the empty fill of a short last batch
    targets.append(np.zeros((0,), np.int32))
    rows = pack_rows(inputs, targets, 32, 16)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(50))
    for row in rows:
        assert sum(len(inputs[i]) for i in row) <= 32
        assert sum(len(targets[i]) for i in row) <= 16
    assert len(rows) < 50 * 0.75  # ~11 input tokens an example: several share a row
    assert rows == pack_rows(inputs, targets, 32, 16)


def test_packed_features_number_segments_and_shift_within_them():
    inputs = [np.array([5, 6, 1]), np.array([7, 1]), np.array([8, 9, 10, 1])]
    targets = [np.array([3, 1]), np.array([4, 4, 1]), np.array([2, 1])]
    batch = packed_encdec_batch(inputs, targets, [[0, 1], [2]], 6, 6)
    np.testing.assert_array_equal(batch["encoder_input_tokens"],
                                  [[5, 6, 1, 7, 1, 0], [8, 9, 10, 1, 0, 0]])
    np.testing.assert_array_equal(batch["encoder_segment_ids"],
                                  [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_target_tokens"],
                                  [[3, 1, 4, 4, 1, 0], [2, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_input_tokens"],
                                  [[0, 3, 0, 4, 4, 0], [0, 2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_segment_ids"],
                                  [[1, 1, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                  batch["decoder_target_tokens"] != 0)


@pytest.fixture(scope="module")
def tiny():
    config = get_config("t5_1_1_tiny", **TINY)
    return config, init_params(config, jax.random.PRNGKey(0))


@functools.cache
def _apply(config):
    def forward(params, batch):
        return T5(config).apply({"params": params}, batch["encoder_input_tokens"],
                                batch["decoder_input_tokens"],
                                encoder_segment_ids=batch.get("encoder_segment_ids"),
                                decoder_segment_ids=batch.get("decoder_segment_ids"))
    return jax.jit(forward)


def test_packed_logits_equal_each_example_alone(tiny):
    config, params = tiny
    inputs, targets = _examples(np.random.default_rng(1), 7)
    rows = pack_rows(inputs, targets, 40, 20)
    assert any(len(row) > 1 for row in rows)
    packed = np.asarray(_apply(config)(params, packed_encdec_batch(inputs, targets, rows, 40, 20)))
    alone = np.asarray(_apply(config)(params, packing.encdec_batch(inputs, targets, 40, 20)))
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(targets[i])
            np.testing.assert_allclose(packed[r, at:at + n], alone[i, :n], rtol=2e-5, atol=2e-5)
            at += n


def test_the_model_needs_both_segment_ids(tiny):
    config, params = tiny
    tokens = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="both encoder_segment_ids and decoder_segment_ids"):
        T5(config).apply({"params": params}, tokens, tokens, encoder_segment_ids=tokens)


def test_packed_step_has_the_unpacked_objective_and_gradients(tiny):
    config, params = tiny
    rng = np.random.default_rng(2)
    views = {"label": _examples(rng, 16, max_target=4), "rationale": _examples(rng, 16)}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "model"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    options = step_lib.StepOptions(alpha=0.3)

    def run(make):
        batches = {v: {k: jax.numpy.asarray(x) for k, x in make(*views[v]).items()}
                   for v in views}
        return jax.jit(functools.partial(step_lib.loss_and_grads, T5(config), options=options,
                                         batch_sharding=sharding))(
            params, batches, jax.random.PRNGKey(0))

    plain_grads, plain = run(lambda x, y: packing.encdec_batch(x, y, 24, 12))
    packed_grads, packed = run(
        lambda x, y: packed_encdec_batch(x, y, pack_rows(x, y, 24, 12), 24, 12))
    for key in ("loss", "label_tokens", "rationale_tokens"):
        np.testing.assert_allclose(packed[key], plain[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture()
def data_dir(tmp_path_factory, monkeypatch):
    path = str(tmp_path_factory.getbasetemp() / "packing_data")
    monkeypatch.setenv("SBS_DATA_DIR", path)
    tasks.set_data_dir(path)
    tasks.set_vocabulary_path(None)
    yield path
    tasks.set_data_dir(None)


def _paired(pack, **kwargs):
    lengths = {"inputs": 64, "targets": 16, "rationale_targets": 128}
    return pipeline.PairedBatches("synthetic_label_mixture", "synthetic_rationale_mixture",
                                  "train", 32, lengths, pack=pack, **kwargs)


def _examples_of(batch):
    """Sorted (input tokens, target tokens) of every example in a batch, packed or not."""
    found = []
    for r in range(len(batch["encoder_input_tokens"])):
        enc, dec = batch["encoder_input_tokens"][r], batch["decoder_target_tokens"][r]
        if "encoder_segment_ids" in batch:
            enc_seg, dec_seg = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
            for s in range(1, int(enc_seg.max()) + 1):
                found.append((tuple(enc[enc_seg == s]), tuple(dec[dec_seg == s])))
        elif enc.any():
            found.append((tuple(enc[enc > 0]), tuple(dec[dec > 0])))
    return sorted(found)


def test_packed_batches_train_the_same_examples_in_fewer_rows(data_dir):
    plain, packed = _paired(False), _paired(True)
    hosts = [_paired(True, shard_id=s, num_shards=2) for s in range(2)]
    for _ in range(3):
        a, b = next(plain), next(packed)
        assert sorted(b["ids"]) == sorted(a["ids"])
        for view in ("label", "rationale"):
            rows = len(b[view]["encoder_input_tokens"])
            assert rows % 4 == 0 and rows < 32  # multiple of batch_size / 8, fewer rows
            assert _examples_of(b[view]) == _examples_of(a[view])
        halves = [next(h) for h in hosts]
        assert sorted(np.concatenate([h["ids"] for h in halves])) == sorted(a["ids"])
        np.testing.assert_array_equal(
            np.concatenate([h["rationale"]["encoder_input_tokens"] for h in halves]),
            b["rationale"]["encoder_input_tokens"])


def test_a_packed_run_trains_like_an_unpacked_one_on_the_8_device_mesh(tmp_path, data_dir):
    def run(pack):
        cfg = run_config.RunConfig(
            model_dir=str(tmp_path / f"pack_{pack}"), mixture_or_task_name="synthetic_label_gt",
            rationale_mixture_name="synthetic_rationale", model_name="t5_1_1_tiny",
            model_overrides={k: v for k, v in TINY.items() if k != "vocab_size"},
            train_steps=3, batch_size=32, task_feature_lengths={"inputs": 32, "targets": 64},
            learning_rate=1e-3, schedule="constant", checkpoint_period=3, eval_period=0,
            log_period=1, async_checkpointing=False, pack=pack)
        return loop.train(cfg)

    packed, plain = run(True), run(False)
    assert packed["step"] == plain["step"] == 3
    for key in ("loss", "label_loss", "rationale_loss"):
        np.testing.assert_allclose(packed["final_train_metrics"][key],
                                   plain["final_train_metrics"][key], rtol=1e-4)
