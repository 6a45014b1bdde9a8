"""HF T5 parity and checkpoint interop: import, export, round trips, clear errors."""

import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from hf_t5_fixtures import hf_logits_and_loss, hub_config, make_hf_dir, padded_batch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch
from transformers import AutoTokenizer, T5ForConditionalGeneration
from transformers import T5Config as HFConfig
from transformers.models.t5.modeling_t5 import T5Attention

from sbs_jax.models import T5, get_config, init_params
from sbs_jax.models.hf import CheckpointError, load_hf, save_hf
from sbs_jax.models.layers import relative_position_bucket
from sbs_jax.train import losses

VOCAB = 512


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def hf_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_hf_dir(request.param, path, VOCAB)


def our_logits(config, params, enc, dec):
    return np.asarray(T5(config).apply({"params": params}, enc, dec))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(bidirectional):
    rel = np.arange(-600, 600)
    for buckets, distance in ((32, 128), (16, 64)):
        ours = relative_position_bucket(rel, bidirectional, buckets, distance)
        theirs = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional,
                                                       buckets, distance).numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_import_matches_hf_logits_and_loss(hf_checkpoint):
    style, path, hf_model = hf_checkpoint
    config, params = load_hf(path)
    assert config.logits_via_embedding == (style == "v1_0")
    assert config.mlp_activations == (("relu",) if style == "v1_0" else ("gelu", "linear"))
    enc, dec, targets = padded_batch(VOCAB)
    ref_logits, ref_loss = hf_logits_and_loss(hf_model, enc, dec, targets)
    logits = our_logits(config, params, enc, dec)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    batch = {"decoder_target_tokens": targets, "decoder_loss_weights": targets > 0}
    loss = float(losses.mean_loss(losses.token_loss_sums(logits, batch)))
    assert abs(loss - ref_loss) < 1e-5
    # Scanned layers load from the same checkpoint to the same numbers.
    scan_config, scan_params = load_hf(path, scan_layers=True)
    np.testing.assert_allclose(our_logits(scan_config, scan_params, enc, dec), ref_logits,
                               atol=1e-4, rtol=0)


def test_pytorch_bin_imports_like_safetensors(hf_checkpoint, tmp_path):
    _, path, _ = hf_checkpoint
    state = {k: torch.from_numpy(v.copy()) for k, v in load_file(path / "model.safetensors").items()}
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    _, from_bin = load_hf(tmp_path)
    _, from_safetensors = load_hf(path)
    for a, b in zip(jax.tree_util.tree_leaves(from_bin), jax.tree_util.tree_leaves(from_safetensors)):
        np.testing.assert_array_equal(a, b)


class NotATensor:
    """Any class: unpickling it would run arbitrary code paths."""


def test_pytorch_bin_with_arbitrary_objects_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    torch.save({"shared.weight": torch.zeros(2, 2), "payload": NotATensor()},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf(tmp_path)


@pytest.mark.parametrize("name", ["t5_tiny", "t5_1_1_tiny"])
def test_export_loads_in_hf_with_identical_logits(name, tmp_path):
    config = get_config(name, vocab_size=VOCAB, scan_layers=name == "t5_1_1_tiny")
    params = init_params(config, jax.random.PRNGKey(3))
    save_hf(config, params, tmp_path)
    hub = json.loads((tmp_path / "config.json").read_text())
    assert hub["tie_word_embeddings"] == (name == "t5_tiny")
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) == (name != "t5_tiny")
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}

    hf_model = T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    enc, dec, targets = padded_batch(VOCAB, enc_len=40, dec_len=20)
    ref_logits, _ = hf_logits_and_loss(hf_model, enc, dec, targets)
    np.testing.assert_allclose(our_logits(config, params, enc, dec), ref_logits, atol=1e-4,
                               rtol=0)
    back_config, back_params = load_hf(tmp_path, scan_layers=config.scan_layers)
    assert back_config == config
    for a, b in zip(jax.tree_util.tree_leaves(back_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_export_with_vocabulary_gives_working_tokenizer(tmp_path, tiny_vocab_path):
    import sentencepiece as spm

    config = get_config("t5_1_1_tiny", vocab_size=VOCAB)
    save_hf(config, init_params(config, jax.random.PRNGKey(0)), tmp_path, vocab=tiny_vocab_path)
    assert (tmp_path / "spiece.model").read_bytes() == pathlib.Path(tiny_vocab_path).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    text = "Tom has 6 cards."
    expected = spm.SentencePieceProcessor(model_file=tiny_vocab_path).encode(text) + [1]
    assert tokenizer(text).input_ids == expected


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_clear_errors_name_the_problem(tmp_path):
    make_hf_dir("v1_1", tmp_path, VOCAB)
    _edit_config(tmp_path, model_type="bart", architectures=["BartForConditionalGeneration"])
    with pytest.raises(CheckpointError, match="bart"):
        load_hf(tmp_path)
    _edit_config(tmp_path, model_type="t5", architectures=["T5ForConditionalGeneration"],
                 d_ff=128)
    with pytest.raises(CheckpointError, match=r"encoder\.block\.0\.layer\.1\.DenseReluDense"
                                              r"\.wi_0\.weight.*\(64, 32\).*\(128, 32\)"):
        load_hf(tmp_path)
    _edit_config(tmp_path, d_ff=64, feed_forward_proj="gated-mish")
    with pytest.raises(CheckpointError, match="gated-mish"):
        load_hf(tmp_path)
    _edit_config(tmp_path, feed_forward_proj="gated-gelu")
    state = load_file(tmp_path / "model.safetensors")
    q = state.pop("decoder.block.1.layer.1.EncDecAttention.q.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention\.q"):
        load_hf(tmp_path)
    state["decoder.block.1.layer.1.EncDecAttention.q.weight"] = q
    state["decoder.block.2.layer.0.SelfAttention.q.weight"] = q
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected.*decoder\.block\.2"):
        load_hf(tmp_path)
    del state["decoder.block.2.layer.0.SelfAttention.q.weight"], state["lm_head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "missing")


def test_convert_cli_round_trip(hf_checkpoint, tmp_path, capsys):
    from sbs_jax.cli import convert as convert_cli
    from sbs_jax.train import checkpoints, run_config, run_files

    style, path, hf_model = hf_checkpoint
    run = tmp_path / "run"
    assert convert_cli.main(["--to=ours", f"--hf_dir={path}", f"--model_dir={run}"]) == 0
    config, params = load_hf(path)
    stored = checkpoints.load_params(str(run))
    for a, b in zip(jax.tree_util.tree_leaves(stored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    # A trainer's run records only run_config.json: sizes then come from the parameters.
    (run / run_files.MODEL_CONFIG_FILE).unlink()
    name = "t5_tiny" if style == "v1_0" else "t5_1_1_tiny"
    (run / run_config.CONFIG_FILE).write_text(json.dumps({"model_name": name,
                                                           "model_overrides": {}}))
    out = tmp_path / "hf"
    capsys.readouterr()
    assert convert_cli.main(["--to=hf", f"--model_dir={run}", f"--hf_dir={out}"]) == 0
    assert re.match(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d wrote {re.escape(str(out))}: T5Config\(",
                    capsys.readouterr().out)  # the local time first, as on every CLI's lines
    back_config, _ = load_hf(out)
    assert back_config == config
    enc, dec, targets = padded_batch(VOCAB, enc_len=30, dec_len=10)
    exported = T5ForConditionalGeneration.from_pretrained(str(out)).eval()
    np.testing.assert_allclose(hf_logits_and_loss(exported, enc, dec, targets)[0],
                               hf_logits_and_loss(hf_model, enc, dec, targets)[0], atol=1e-5)
    # Refuses to overwrite a run; says what is missing when the architecture is unknown.
    assert convert_cli.main(["--to=ours", f"--hf_dir={path}", f"--model_dir={run}"]) == 2
    (run / run_config.CONFIG_FILE).unlink()
    assert convert_cli.main(["--to=hf", f"--model_dir={run}", f"--hf_dir={tmp_path / 'hf2'}"]) == 2
    assert "--model_name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["--help"])
    assert exit_info.value.code == 0


def test_convert_names_a_bad_config_or_damaged_weights(hf_checkpoint, tmp_path, capsys):
    from sbs_jax.cli import convert as convert_cli

    _, path, _ = hf_checkpoint
    for name, damage in (("config.json", lambda b: b[: len(b) // 2]),
                         ("model.safetensors", lambda b: b[: len(b) - 100]),
                         ("model.safetensors", lambda b: b"\xff" * 8 + b[8:])):
        broken = tmp_path / f"broken_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(path, broken)
        (broken / name).write_bytes(damage((broken / name).read_bytes()))
        assert convert_cli.main(["--to=ours", f"--hf_dir={broken}",
                                 f"--model_dir={broken}_run"]) == 2
        err = capsys.readouterr().err
        assert f"sbs-convert: error: {broken / name}: " in err and "Traceback" not in err


def test_transformers5_saved_unscaled_tied_model(tmp_path):
    """transformers 5 writes tie_word_embeddings=true, scale_decoder_outputs=false, no lm_head."""
    kwargs = {k: v for k, v in hub_config("v1_1", VOCAB).items()
              if k not in ("architectures", "model_type")}
    torch.manual_seed(1)
    T5ForConditionalGeneration(HFConfig(**kwargs)).save_pretrained(str(tmp_path))
    hub = json.loads((tmp_path / "config.json").read_text())
    assert hub["scale_decoder_outputs"] is False and hub["tie_word_embeddings"] is True
    config, params = load_hf(tmp_path)
    assert not config.logits_via_embedding
    hf_model = T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    enc, dec, targets = padded_batch(VOCAB, enc_len=30, dec_len=10)
    np.testing.assert_allclose(our_logits(config, params, enc, dec),
                               hf_logits_and_loss(hf_model, enc, dec, targets)[0], atol=1e-4)


def test_sharded_bf16_safetensors(hf_checkpoint, tmp_path):
    """Large hub checkpoints come as several bf16 files listed in an index."""
    _, path, _ = hf_checkpoint
    state = {k: torch.from_numpy(v.copy()).to(torch.bfloat16)
             for k, v in load_file(path / "model.safetensors").items()}
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_torch({k: state[k].contiguous() for k in part}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _, params = load_hf(tmp_path)
    _, reference = load_hf(path)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b, dtype=jax.numpy.bfloat16).astype(np.float32))
