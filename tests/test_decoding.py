"""KV-cache decoding: greedy and beam search equal HF `generate`; sampling; compile caching."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from hf_t5_fixtures import make_hf_dir
from transformers import GenerationConfig

from sbs_jax.infer import decoding
from sbs_jax.models import T5, load_hf

VOCAB = 512
MAX_LEN = 12


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def model(request, tmp_path_factory):
    """HF reference + our import of it; the EOS row is biased so some sequences end early."""
    path = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_dir(request.param, path, VOCAB, eos_bias=3.2)
    config, params = load_hf(path)
    rng = np.random.default_rng(0)
    enc = rng.integers(2, VOCAB, (8, 20)).astype(np.int32)
    enc[1, 10:] = 0
    enc[2, 5:] = 0
    return hf_model, config, params, enc


def hf_generate(hf_model, enc, **kwargs) -> np.ndarray:
    config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                              max_new_tokens=MAX_LEN, do_sample=False, **kwargs)
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                                attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                                generation_config=config).numpy()[:, 1:]
    out = np.pad(out, ((0, 0), (0, MAX_LEN - out.shape[1])))
    # HF beam search pads with EOS when pad_token_id is 0 (falsy); our contract is 0 after EOS.
    after_eos = np.cumsum(np.cumsum(out == 1, axis=1), axis=1) > 1
    return np.where(after_eos, 0, out)


def ends(tokens: np.ndarray) -> set:
    """Where each row's EOS is (-1: ran to the length limit)."""
    return {int(np.argmax(r == 1)) if (r == 1).any() else -1 for r in tokens}


def test_greedy_equals_hf(model):
    hf_model, config, params, enc = model
    expected = hf_generate(hf_model, enc)
    got = np.asarray(decoding.generate(config, params, enc, MAX_LEN))
    assert got.dtype == np.int32 and got.shape == (8, MAX_LEN)
    np.testing.assert_array_equal(got, expected)
    # Same tokens from the KV cache as from full teacher-forced forward passes.
    dec = np.concatenate([np.zeros((8, 1), np.int32), got[:, :-1]], axis=1)
    logits = np.asarray(T5(config).apply({"params": params}, enc, dec))
    first_eos = np.where((got == 1).any(1), np.argmax(got == 1, axis=1), MAX_LEN - 1)
    for row in range(8):
        upto = first_eos[row] + 1
        np.testing.assert_array_equal(np.argmax(logits[row, :upto], -1), got[row, :upto])


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, True), (0.6, False),
                                                           (2.0, "never")])
def test_beam_search_equals_hf(model, length_penalty, early_stopping):
    hf_model, config, params, enc = model
    expected = hf_generate(hf_model, enc, num_beams=4, length_penalty=length_penalty,
                           early_stopping=early_stopping)
    got = np.asarray(decoding.generate(config, params, enc, MAX_LEN, method="beam",
                                       num_beams=4, length_penalty=length_penalty,
                                       early_stopping=early_stopping))
    np.testing.assert_array_equal(got, expected)


def test_fixture_exercises_eos_and_length_limit(model):
    hf_model, _, _, enc = model
    outcomes = ends(hf_generate(hf_model, enc)) | ends(hf_generate(hf_model, enc, num_beams=4))
    assert -1 in outcomes and len(outcomes) >= 2


def test_scanned_layers_decode_the_same(model):
    _, config, params, enc = model
    from sbs_jax.models import stack_layers

    scanned = dataclasses.replace(config, scan_layers=True)
    for method in ("greedy", "beam"):
        np.testing.assert_array_equal(
            np.asarray(decoding.generate(scanned, stack_layers(params), enc, MAX_LEN,
                                         method=method)),
            np.asarray(decoding.generate(config, params, enc, MAX_LEN, method=method)))


def _sample(model, seed: int) -> np.ndarray:
    _, config, params, enc = model
    return np.asarray(decoding.generate(config, params, enc, MAX_LEN, method="sample",
                                        temperature=2.0, rng=jax.random.PRNGKey(seed)))


def test_top_1_sampling_is_greedy(model):
    _, config, params, enc = model
    greedy = np.asarray(decoding.generate(config, params, enc, MAX_LEN))
    top1 = decoding.generate(config, params, enc, MAX_LEN, method="sample", top_k=1,
                             rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(top1), greedy)


def test_sampling_with_the_same_key_repeats_itself(model):
    np.testing.assert_array_equal(_sample(model, 1), _sample(model, 1))


def test_sampling_with_another_key_draws_other_tokens(model):
    assert not np.array_equal(_sample(model, 1), _sample(model, 2))


def test_sampled_rows_hold_only_padding_after_eos(model):
    rows = np.concatenate([_sample(model, 1), _sample(model, 2)])
    for row in rows:
        if (row == 1).any():
            assert not row[np.argmax(row == 1) + 1:].any()


def test_sampling_without_a_key_is_refused(model):
    _, config, params, enc = model
    with pytest.raises(ValueError, match="rng"):
        decoding.generate(config, params, enc, MAX_LEN, method="sample")


def test_an_unknown_method_is_refused(model):
    _, config, params, enc = model
    with pytest.raises(ValueError, match="nucleus"):
        decoding.generate(config, params, enc, MAX_LEN, method="nucleus")


def test_compiled_once_per_shape(model):
    _, config, params, enc = model
    decoding.generate(config, params, enc, MAX_LEN)
    fn = decoding.jitted_decoder(config, MAX_LEN)
    assert decoding.jitted_decoder(config, MAX_LEN, num_beams=7, top_k=3) is fn  # ignored
    compiled = fn._cache_size()
    decoding.generate(config, params, enc[::-1].copy(), MAX_LEN)
    assert fn._cache_size() == compiled
    decoding.generate(config, params, enc[:2], MAX_LEN)
    assert fn._cache_size() == compiled + 1


def test_decoding_on_the_training_mesh(model):
    """Params sharded as in training (fsdp + model axes), the batch over the data axes: the same
    tokens as on one device."""
    from sbs_jax.models import abstract_params
    from sbs_jax.train import partitioning

    _, config, params, enc = model
    mesh = partitioning.make_mesh((2, 2, 2))
    rules = partitioning.logical_axis_rules(fsdp=True)
    want_params = partitioning.params_shardings(abstract_params(config), mesh, rules)
    placed = jax.device_put(params, want_params)
    for method in ("greedy", "beam"):
        got = decoding.generate(config, placed, enc, MAX_LEN, method=method, mesh=mesh,
                                axis_rules=rules)
        assert got.sharding.is_equivalent_to(partitioning.batch_sharding(mesh), 2)
        np.testing.assert_array_equal(
            np.asarray(got), np.asarray(decoding.generate(config, params, enc, MAX_LEN,
                                                          method=method)))
    fn = decoding.jitted_decoder(config, MAX_LEN, mesh=mesh, axis_rules=rules)
    with partitioning.mesh_context(mesh, rules):
        compiled = fn.lower(placed, enc, np.float32(1.0), jax.random.PRNGKey(0)).compile()
    params_in, tokens_in = compiled.input_shardings[0][:2]
    assert tokens_in.spec == partitioning.batch_sharding(mesh).spec
    leaves = jax.tree_util.tree_leaves(params_in)
    for got, want, leaf in zip(leaves, jax.tree_util.tree_leaves(want_params),
                               jax.tree_util.tree_leaves(params)):
        assert got.is_equivalent_to(want, leaf.ndim)
    assert sum(not s.is_fully_replicated for s in leaves) > len(leaves) // 2
    with pytest.raises(ValueError, match="axis_rules"):
        decoding.generate(config, params, enc, MAX_LEN, mesh=mesh)
