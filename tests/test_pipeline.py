"""Paired input pipeline on the synthetic tasks: pairing, determinism, resume, sharding,
fractions, buckets."""

import json
import os

import numpy as np
import pytest

import tasks
from sbs_jax.data import packing, pipeline, records, synthetic
from sbs_jax.data.pipeline import PairedBatches, select_fraction
from sbs_jax.data.records import Record

LENGTHS = {"inputs": 64, "targets": 16, "rationale_targets": 128}
KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
        "decoder_loss_weights")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder holding the synthetic dataset and its default vocabulary from the start,
    so every test reads the same files whichever runs first (the cqa tasks read it too)."""
    path = str(tmp_path_factory.mktemp("pipeline_data"))
    synthetic.ensure_dataset(path, vocabulary_path=os.path.join(path, "spiece.model"))
    tasks.set_data_dir(path)
    tasks.set_vocabulary_path(None)
    yield path
    tasks.set_data_dir(None)


@pytest.fixture(scope="module")
def paired(data_dir):
    """Both synthetic train views, read once for the whole module."""
    return pipeline.PairedExamples.load("synthetic_label_mixture", "synthetic_rationale_mixture",
                                        "train", LENGTHS)


def _paired(examples, **kwargs):
    options = {"seed": 0, "shuffle": True, "repeat": True}
    options.update(kwargs)
    batch_size = options.pop("batch_size", 16)
    return PairedBatches("synthetic_label_mixture", "synthetic_rationale_mixture", "train",
                         batch_size, LENGTHS, examples=examples, **options)


def _take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def _same(a, b):
    for view in ("label", "rationale"):
        for key in KEYS:
            np.testing.assert_array_equal(a[view][key], b[view][key])
    np.testing.assert_array_equal(a["ids"], b["ids"])


def test_both_views_hold_the_same_examples_row_by_row(paired):
    batch = next(_paired(paired))
    vocab = tasks.get_vocabulary(for_synthetic=True)
    assert len(batch["ids"]) == 16
    for row in range(16):
        label_input = vocab.decode(batch["label"]["encoder_input_tokens"][row].tolist())
        rationale_input = vocab.decode(batch["rationale"]["encoder_input_tokens"][row].tolist())
        problem = label_input.removeprefix("predict: ")
        assert rationale_input == "explain: " + problem
        rationale, label = synthetic.solve(problem)
        assert vocab.decode(batch["label"]["decoder_target_tokens"][row].tolist()) == label
        assert vocab.decode(batch["rationale"]["decoder_target_tokens"][row].tolist()) == rationale


def test_batches_follow_seqio_encdec_feature_conventions(paired):
    view = next(_paired(paired))["label"]
    targets = view["decoder_target_tokens"]
    np.testing.assert_array_equal(view["decoder_input_tokens"][:, 0], 0)
    np.testing.assert_array_equal(view["decoder_input_tokens"][:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(view["decoder_loss_weights"], (targets != 0).astype(np.int32))
    assert all(v.dtype == np.int32 for v in view.values())
    lengths = (targets != 0).sum(axis=1)
    assert (targets[np.arange(16), lengths - 1] == 1).all()


def test_deterministic_and_resumable_at_any_step(paired):
    first = _paired(paired)
    _take(first, 5)
    saved = json.dumps(first.state())
    expected = _take(first, 3)
    resumed = _paired(paired)
    resumed.restore(json.loads(saved))
    for a, b in zip(expected, _take(resumed, 3)):
        _same(a, b)
    _same(next(_paired(paired)), next(_paired(paired)))
    other_seed = next(_paired(paired, seed=1))
    assert list(other_seed["ids"]) != list(next(_paired(paired))["ids"])


def test_restore_refuses_a_state_from_other_data(paired):
    state = _paired(paired).state()
    with pytest.raises(ValueError, match="seed"):
        _paired(paired, seed=3).restore(state)
    with pytest.raises(ValueError, match="num_examples"):
        _paired(paired, data_fraction=0.5).restore(state)


def test_host_shards_split_the_same_global_batch(paired):
    whole = next(_paired(paired))
    shards = [next(_paired(paired, shard_id=k, num_shards=2)) for k in range(2)]
    for view in ("label", "rationale"):
        for key in KEYS:
            assert shards[0][view][key].shape == shards[1][view][key].shape
            np.testing.assert_array_equal(
                np.concatenate([s[view][key] for s in shards]), whole[view][key])
    with pytest.raises(ValueError, match="not divisible"):
        _paired(paired, batch_size=15, num_shards=2)


def test_an_epoch_visits_every_example_once(paired):
    iterator = _paired(paired, batch_size=40)
    epoch_ids = np.concatenate([b["ids"] for b in _take(iterator, iterator.steps_per_epoch)])
    assert sorted(epoch_ids) == sorted(iterator.ids)
    finite = _paired(paired, batch_size=300, shuffle=False, repeat=False)
    batches = list(finite)
    assert len(batches) == 7
    last = batches[-1]
    real = last["ids"] != ""
    assert real.sum() == 2000 - 6 * 300
    assert last["label"]["decoder_loss_weights"][~real].sum() == 0
    assert list(np.concatenate([b["ids"][b["ids"] != ""] for b in batches])) == finite.ids


def test_fractions_are_nested_and_shared_by_both_views(paired):
    ids = [f"x{i}" for i in range(1000)]
    subsets = [set(select_fraction(ids, f, seed=7)) for f in (0.125, 0.25, 0.5, 1.0)]
    assert [len(s) for s in subsets] == [125, 250, 500, 1000]
    assert subsets[0] <= subsets[1] <= subsets[2] <= subsets[3]
    assert set(select_fraction(ids, 0.25, seed=8)) != subsets[1]
    small = _paired(paired, data_fraction=0.125, batch_size=50)
    assert small.ids == select_fraction(list(paired.label), 0.125)
    seen = set()
    for batch in _take(small, 5):
        seen |= set(batch["ids"])
    assert seen == set(small.ids)


def test_per_seed_subsets_follow_the_seed_and_nested_ones_are_shared(paired):
    fractions = (0.125, 0.25, 0.5, 1.0)

    def subsets(data_subset, seed):
        return [set(_paired(paired, data_fraction=f, seed=seed,
                            fraction_seed=pipeline.fraction_seed(data_subset, seed)).ids)
                for f in fractions]

    per_seed = [subsets("per_seed", seed) for seed in range(4)]
    nested = [subsets("nested", seed) for seed in range(4)]
    for chains in (per_seed, nested):
        for chain in chains:  # within a seed, 12.5% <= 25% <= 50% <= 100%
            assert chain[0] < chain[1] < chain[2] < chain[3] == set(paired.label)
    for index in range(3):  # every seed draws its own subset of each fraction below 100%
        assert len({frozenset(chain[index]) for chain in per_seed}) == 4
        assert len({frozenset(chain[index]) for chain in nested}) == 1
    assert per_seed[0] == nested[0]  # seed 0: the same subsets either way
    with pytest.raises(ValueError, match="DATA_SUBSET='random'"):
        pipeline.fraction_seed("random", 0)


def test_the_run_config_picks_the_subset(paired, tmp_path):
    from sbs_jax.train import run_config, run_setup

    def run_ids(data_subset):
        cfg = run_config.RunConfig(
            model_dir=str(tmp_path / data_subset), mixture_or_task_name="synthetic_label_mixture",
            rationale_mixture_name="synthetic_rationale_mixture", model_name="t5_1_1_tiny",
            batch_size=8, task_feature_lengths=LENGTHS, data_fraction=0.25, random_seed=3,
            data_subset=data_subset)
        return run_setup.build(cfg, from_checkpoint=False)[0].batches.ids

    ids = list(paired.label)
    assert run_ids("per_seed") == select_fraction(ids, 0.25, seed=3)
    assert run_ids("nested") == select_fraction(ids, 0.25, seed=0)
    with pytest.raises(ValueError, match="DATA_SUBSET='per_run' must be one of"):
        run_config.RunConfig(model_dir="/m", mixture_or_task_name="t", data_subset="per_run")


def test_lengths_use_the_smallest_bucket_and_caps_trim_with_eos(data_dir):
    capped = PairedBatches("synthetic_label_gt", None, "train", 8,
                           {"inputs": 64, "targets": 4}, length_buckets=(8, 16, 32))
    batch = next(capped)
    assert set(batch) == {"label", "ids"}
    targets = batch["label"]["decoder_target_tokens"]
    assert targets.shape == (8, 4) and (targets[:, -1] == 1).all()
    assert batch["label"]["encoder_input_tokens"].shape[1] == 32
    assert packing.bucket_length(9, (8, 16), 64) == 16
    assert packing.bucket_length(100, (8, 16), 64) == 64


def test_fixed_batch_shapes_give_one_shape_per_view(paired, tmp_path):
    from sbs_jax.train import run_config, run_setup

    cfg = run_config.RunConfig(
        model_dir=str(tmp_path), mixture_or_task_name="synthetic_label_mixture",
        rationale_mixture_name="synthetic_rationale_mixture", model_name="t5_1_1_tiny",
        batch_size=8, task_feature_lengths=LENGTHS, fixed_batch_shapes=True)
    batches = run_setup.build(cfg, from_checkpoint=False)[0].batches
    steps = _take(batches, 40)
    for view, target_cap in (("label", "targets"), ("rationale", "rationale_targets")):
        shapes = {(b[view]["encoder_input_tokens"].shape, b[view]["decoder_target_tokens"].shape)
                  for b in steps}
        assert shapes == {((8, LENGTHS["inputs"]), (8, LENGTHS[target_cap]))}, view
    bucketed = next(_paired(paired, batch_size=8))  # the default: the smallest bucket that fits
    assert bucketed["label"]["encoder_input_tokens"].shape[1] < LENGTHS["inputs"]
    with pytest.raises(ValueError, match="pack and RunConfig.fixed_batch_shapes"):
        run_config.RunConfig(model_dir="/m", mixture_or_task_name="t", pack=True,
                             fixed_batch_shapes=True)


def test_tasks_with_different_ids_are_refused(data_dir):
    records.write_split([Record(id="synthetic-train-000000", input="q", label="a",
                                source="cqa/train")], os.path.join(data_dir, "cqa"), "train")
    records.write_info(os.path.join(data_dir, "cqa"), "cqa")
    with pytest.raises(ValueError, match="different example ids: 0 only in the label task.*"
                                         "1999 only in the rationale"):
        PairedBatches("cqa_label_gt", "synthetic_rationale", "train", 8, LENGTHS)


def test_eval_set_scores_with_the_task_metric(data_dir):
    evaluation = pipeline.eval_set("synthetic_label_mixture", "test")
    assert evaluation.task_name == "synthetic_label_gt"
    assert len(evaluation.ids) == synthetic.DEFAULT_SIZES["test"]
    rows, tokens = next(evaluation.batches(32))
    assert tokens.shape[0] == 32 and list(rows) == list(range(32))
    predictions = list(evaluation.targets)
    predictions[0] = "0"
    assert evaluation.score(predictions) == {"accuracy": 100.0 * 499 / 500}
