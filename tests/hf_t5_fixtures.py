"""Tiny random HF PyTorch T5 models (the numerical reference) written as hub-style directories.

v1_0: ReLU, tied embedding, logits scaled by d_model**-0.5; config.json without
`tie_word_embeddings` (as the original t5-* checkpoints). v1_1: gated-GELU with a separate
`lm_head.weight` and `"tie_word_embeddings": false` (as T5 1.1 / Flan-T5 checkpoints).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import T5Config as HFConfig
from transformers import T5ForConditionalGeneration

D_MODEL = 32


def hub_config(style: str, vocab_size: int) -> dict:
    config = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": vocab_size, "d_model": D_MODEL, "d_kv": 8, "d_ff": 64, "num_layers": 2,
        "num_decoder_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
        "feed_forward_proj": "relu" if style == "v1_0" else "gated-gelu",
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
    if style == "v1_1":
        config["tie_word_embeddings"] = False
    return config


def make_hf_dir(style: str, path: pathlib.Path, vocab_size: int = 512, seed: int = 0,
                eos_bias: float = 0.0, weights: str = "safetensors") -> T5ForConditionalGeneration:
    """Writes a random tiny checkpoint to `path`; returns HF's model loaded from it (eval mode).

    eos_bias > 0 moves the EOS output row towards the mean decoder state, so that decoding
    tests see sequences that end early as well as ones that run to the length limit.
    """
    config = hub_config(style, vocab_size)
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = T5ForConditionalGeneration(HFConfig(**kwargs)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not k.endswith("embed_tokens.weight") and k != "lm_head.weight"}
    if style == "v1_1":
        state["lm_head.weight"] = torch.randn(vocab_size, D_MODEL) * D_MODEL ** -0.5
    if eos_bias:
        out_name = "lm_head.weight" if style == "v1_1" else "shared.weight"
        model.load_state_dict({**model.state_dict(), **state}, strict=False)
        if style == "v1_1":
            model.lm_head.weight = torch.nn.Parameter(state["lm_head.weight"].clone())
        enc = torch.tensor(np.random.default_rng(seed).integers(2, vocab_size, (8, 20)))
        with torch.no_grad():
            out = model(input_ids=enc, decoder_input_ids=torch.zeros((8, 12), dtype=torch.long),
                        output_hidden_states=True)
        mean_state = out.decoder_hidden_states[-1].reshape(-1, D_MODEL).mean(0)
        scale = 1.0 if style == "v1_1" else D_MODEL ** 0.5
        state[out_name] = state[out_name].clone()
        state[out_name][1] += eos_bias * scale * mean_state / mean_state.norm() ** 2
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    if weights == "safetensors":
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, str(path / "pytorch_model.bin"))
    return T5ForConditionalGeneration.from_pretrained(str(path)).eval()


def padded_batch(vocab_size: int, batch: int = 4, enc_len: int = 150, dec_len: int = 140,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encoder inputs, decoder inputs (start 0) and targets, with padding in every part."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab_size, (batch, enc_len)).astype(np.int32)
    enc[1, 100:] = 0
    enc[2, 5:] = 0
    targets = rng.integers(2, vocab_size, (batch, dec_len)).astype(np.int32)
    targets[1, 60:] = 0
    targets[3, 3:] = 0
    dec = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return enc, dec, targets


def hf_logits_and_loss(model, enc, dec, targets) -> tuple[np.ndarray, float]:
    labels = np.where(targets > 0, targets, -100)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc, dtype=torch.long),
                    attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                    decoder_input_ids=torch.tensor(dec, dtype=torch.long),
                    labels=torch.tensor(labels, dtype=torch.long))
    return out.logits.numpy(), float(out.loss)
