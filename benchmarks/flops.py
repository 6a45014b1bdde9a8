"""Model FLOPs of an encoder-decoder T5 step, for achieved FLOP/s and MFU.

Counted: every matmul (2 FLOPs per multiply-add) as our model computes it — the attention,
MLP and output projections, the attention scores `QK^T` and the weighted sum `AV` over the full
(unmasked) key length (the implementation computes masked positions too), the cross-attention
key/value projections of the encoder output (once per decoder layer, on input tokens) and the
LM head. Not counted: embedding lookups (gathers), norms, softmax, activations and the optimizer
(each O(tokens x width), a few percent at most; tests/test_flops.py checks the total against
XLA's own cost analysis). Training is forward + backward = 3x forward (the backward of a matmul
is two matmuls of the same size). A sbs step is one training pass of the label view plus one of
the rationale view, each with its own encoder pass (their inputs differ by the task prefix).

    python benchmarks/flops.py --config t5_1_1_small --batch 8 --input_len 256 \
        --label_len 8 --rationale_len 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one batch, split by where they are spent."""

    encoder_matmul: int  # Q, K, V, out projections and MLP of every encoder layer
    encoder_attention: int  # QK^T and AV in encoder self-attention
    decoder_matmul: int  # decoder projections + MLP, incl. cross-attention K/V of the input
    decoder_attention: int  # QK^T and AV in decoder self- and cross-attention
    lm_head: int  # final [embed, vocab] projection on every target position

    @property
    def total(self) -> int:
        return (self.encoder_matmul + self.encoder_attention + self.decoder_matmul
                + self.decoder_attention + self.lm_head)

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def _field(config: Any, name: str) -> int:
    return int(getattr(config, name))


def forward_flops(config: Any, batch: int, input_len: int, target_len: int) -> ForwardFlops:
    """Forward FLOPs of `T5(config)` on [batch, input_len] inputs and [batch, target_len] targets.

    `config` is a `sbs_jax.models.T5Config` (or anything with its field names).
    """
    d = _field(config, "emb_dim")
    inner = _field(config, "num_heads") * _field(config, "head_dim")
    mlp = _field(config, "mlp_dim")
    vocab = _field(config, "vocab_size")
    num_wi = len(config.mlp_activations)
    enc_layers = _field(config, "num_encoder_layers")
    dec_layers = _field(config, "num_decoder_layers")
    enc_tokens = batch * input_len
    dec_tokens = batch * target_len

    mlp_per_token = 2 * d * mlp * (num_wi + 1)
    self_proj_per_token = 2 * d * inner * 4  # Q, K, V and out
    enc_matmul = enc_layers * enc_tokens * (self_proj_per_token + mlp_per_token)
    # Scores [q, k] per head: q*k*head_dim MACs, the same again for AV; over heads -> inner.
    enc_attention = enc_layers * enc_tokens * 2 * (2 * input_len * inner)
    cross_proj_per_token = 2 * d * inner * 2  # cross Q and out on target tokens
    cross_kv = 2 * d * inner * 2 * enc_tokens  # cross K and V on the encoder output
    dec_matmul = dec_layers * (
        dec_tokens * (self_proj_per_token + cross_proj_per_token + mlp_per_token) + cross_kv)
    dec_attention = dec_layers * dec_tokens * 2 * (2 * (target_len + input_len) * inner)
    lm_head = dec_tokens * 2 * d * vocab
    return ForwardFlops(enc_matmul, enc_attention, dec_matmul, dec_attention, lm_head)


def train_flops(config: Any, batch: int, input_len: int, target_len: int) -> int:
    """Forward + backward FLOPs of one batch."""
    return TRAIN_MULTIPLIER * forward_flops(config, batch, input_len, target_len).total


def sbs_step_flops(config: Any, batch: int, input_len: int, label_len: int,
                   rationale_len: int) -> dict[str, int]:
    """FLOPs of one distilling step-by-step train step: label view + rationale view."""
    label = train_flops(config, batch, input_len, label_len)
    rationale = train_flops(config, batch, input_len, rationale_len)
    return {"label": label, "rationale": rationale, "total": label + rationale}


def greedy_decode_flops(config: Any, batch: int, input_len: int, new_tokens: int) -> int:
    """FLOPs of greedy KV-cache decoding: one encoder pass, the cross K/V once, then each step
    one target position against the cache (self-attention over the full cache length)."""
    fwd = forward_flops(config, batch, input_len, new_tokens)
    # With a cache of length new_tokens, step t attends to new_tokens keys (masked beyond t):
    # the per-token work equals the teacher-forced pass over new_tokens targets.
    return fwd.total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="t5_1_1_small", help="a sbs_jax.models config name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=256)
    parser.add_argument("--label_len", type=int, default=8)
    parser.add_argument("--rationale_len", type=int, default=64)
    args = parser.parse_args(argv)

    from sbs_jax.models import get_config

    config = get_config(args.config)
    result = {
        "config": args.config,
        "label_forward": forward_flops(config, args.batch, args.input_len,
                                       args.label_len).as_dict(),
        "rationale_forward": forward_flops(config, args.batch, args.input_len,
                                           args.rationale_len).as_dict(),
        "sbs_step": sbs_step_flops(config, args.batch, args.input_len, args.label_len,
                                   args.rationale_len),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
