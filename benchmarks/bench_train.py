"""Training throughput of the full distilling step-by-step step, vs peers measured in this run.

    python benchmarks/bench_train.py [--model t5_1_1_small --batch_size 8 --steps 3]

Measures real target+input tokens per second of one optimizer step on a label batch and a
rationale batch of the same examples (AdamW, clip 1.0, alpha 0.5) for:
  - ours on 1 CPU device, and on all 8 (virtual) CPU devices with an FSDP mesh (1, 8, 1);
  - the HF PyTorch reference recipe (T5ForConditionalGeneration, two forward passes, torch
    AdamW, clip_grad_norm_) with the same architecture, batch and shapes.
Prints one JSON object with the numbers and the ratios. On a shared CPU the absolute numbers
move with the machine's load; the ratios, measured back to back, are what to compare.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from sbs_jax import models
from sbs_jax.train import optim, partitioning
from sbs_jax.train import step as step_lib


def make_batches(batch: int, input_len: int, label_len: int, rationale_len: int, vocab: int,
                 seed: int = 0) -> dict:
    """A label and a rationale view of the same random inputs, every position a real token."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab, (batch, input_len)).astype(np.int32)

    def view(prefix_token: int, target_len: int) -> dict:
        enc = inputs.copy()
        enc[:, 0] = prefix_token
        targets = rng.integers(2, vocab, (batch, target_len)).astype(np.int32)
        dec = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
        return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                "decoder_target_tokens": targets,
                "decoder_loss_weights": np.ones_like(targets)}

    return {"label": view(3, label_len), "rationale": view(4, rationale_len)}


def tokens_per_step(batches: dict) -> int:
    return int(sum(v["encoder_input_tokens"].size + v["decoder_target_tokens"].size
                   for v in batches.values()))


def time_steps(step, steps: int, warmup: int) -> float:
    """Median seconds per step after `warmup` untimed steps (compilation included there)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_jax(config: models.T5Config, batches: dict, num_devices: int, steps: int,
              warmup: int) -> float:
    # FSDP over all devices: 8 virtual CPU devices share one host's memory, and 8 replicas of
    # params + AdamW state would not fit beside the other processes of a shared machine.
    mesh = partitioning.make_mesh((1, num_devices, 1), jax.devices()[:num_devices])
    part = partitioning.Partitioner(mesh, partitioning.logical_axis_rules(fsdp=True), config)
    schedule = optim.make_schedule("linear", 5e-5, total_steps=10_000)
    tx = optim.make_optimizer(schedule)
    holder = {"state": step_lib.init_state(part, config, tx, seed=0)}
    step_fn = step_lib.make_train_step(part, models.T5(config), tx, schedule,
                                       step_lib.StepOptions(alpha=0.5))
    rows = batches["label"]["encoder_input_tokens"].shape[0]
    global_batches = {v: step_lib.global_batch(b, part.batch_sharding, rows)
                      for v, b in batches.items()}

    def step():
        holder["state"], metrics = step_fn(holder["state"], global_batches)
        jax.block_until_ready(metrics["loss"])

    return time_steps(step, steps, warmup)


def bench_torch(config: models.T5Config, batches: dict, steps: int, warmup: int) -> float:
    import torch
    import transformers

    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
        d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        feed_forward_proj="gated-gelu" if len(config.mlp_activations) == 2 else "relu",
        dropout_rate=config.dropout_rate, tie_word_embeddings=config.logits_via_embedding,
        decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    tensors = {v: {k: torch.tensor(x, dtype=torch.long) for k, x in b.items()}
               for v, b in batches.items()}

    def loss_of(view):
        b = tensors[view]
        labels = b["decoder_target_tokens"].masked_fill(b["decoder_loss_weights"] == 0, -100)
        return model(input_ids=b["encoder_input_tokens"],
                     attention_mask=(b["encoder_input_tokens"] != 0).long(),
                     labels=labels).loss

    def step():
        opt.zero_grad()
        loss = 0.5 * loss_of("label") + 0.5 * loss_of("rationale")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return time_steps(step, steps, warmup)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5_1_1_small")
    parser.add_argument("--batch_size", type=int, default=8, help="global, divisible by 8")
    parser.add_argument("--input_len", type=int, default=64)
    parser.add_argument("--label_len", type=int, default=8)
    parser.add_argument("--rationale_len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args(argv)
    config = models.get_config(args.model, dropout_rate=0.1)
    batches = make_batches(args.batch_size, args.input_len, args.label_len,
                           args.rationale_len, config.vocab_size)
    tokens = tokens_per_step(batches)
    seconds = {"jax_1_device": bench_jax(config, batches, 1, args.steps, args.warmup),
               f"jax_{jax.device_count()}_devices": bench_jax(
                   config, batches, jax.device_count(), args.steps, args.warmup)}
    if not args.skip_torch:
        seconds["torch_reference"] = bench_torch(config, batches, args.steps, args.warmup)
    result = {
        "benchmark": "sbs_train_step_tokens_per_s",
        "model": args.model, "config": dataclasses.asdict(config),
        "batch_size": args.batch_size, "shapes": {k: args.__dict__[k] for k in
                                                  ("input_len", "label_len", "rationale_len")},
        "tokens_per_step": tokens, "cpu_cores": os.cpu_count(),
        "seconds_per_step": seconds,
        "tokens_per_s": {k: tokens / v for k, v in seconds.items()},
    }
    multi = f"jax_{jax.device_count()}_devices"
    result["ratio_multi_vs_1_device"] = seconds["jax_1_device"] / seconds[multi]
    if "torch_reference" in seconds:
        result["ratio_jax_1_device_vs_torch"] = seconds["torch_reference"] / seconds["jax_1_device"]
        result["ratio_jax_multi_vs_torch"] = seconds["torch_reference"] / seconds[multi]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from sbs_jax.runtime import malloc

    malloc.ensure_preloaded()  # the allocator the jobs run on (sbs_jax/runtime/malloc.py)
    main()
