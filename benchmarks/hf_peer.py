"""HF PyTorch T5 running the reference recipe: the peer that benchmarks/bench_sbs_step.py beats.

Train step: the paper's code in HF PyTorch — two forward passes (label, rationale) of
`T5ForConditionalGeneration`, `alpha * label_loss + (1 - alpha) * rationale_loss`, backward, clip
1.0, AdamW + linear decay; dropout on. On CUDA: bf16 autocast and fused AdamW (fp32 weights); on a
CPU: fp32, or CPU bf16 autocast (oneDNN). Decoding: HF `generate`, greedy, EOS off (exactly the
requested number of new tokens), on CUDA with bf16 weights.

As a script it runs a set of batch sizes in its own process, so a JAX process (whose allocator
takes 75% of a GPU) and this one never hold the card at once; per batch: median seconds of a
train step and of a decode, the first call's seconds, and the peak memory
(`torch.cuda.max_memory_allocated`), or the out-of-memory error. Imports only numpy, torch,
transformers and our model config (no TensorFlow, SeqIO or gin). Prints JSON.

    python benchmarks/hf_peer.py --config t5_1_1_large --batches 8 32 64 [--decode_batches 8 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import results


def random_view(rng: np.random.Generator, vocab: int, batch: int, input_len: int,
                target_len: int) -> dict[str, np.ndarray]:
    """One view's batch of random tokens, every target real (no padding)."""
    enc = rng.integers(2, vocab, (batch, input_len)).astype(np.int32)
    targets = rng.integers(2, vocab, (batch, target_len)).astype(np.int32)
    dec = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}


def random_views(vocab: int, batch: int, input_len: int, label_len: int, rationale_len: int,
                 seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {"label": random_view(rng, vocab, batch, input_len, label_len),
            "rationale": random_view(rng, vocab, batch, input_len, rationale_len)}


def hf_model(config: Any, params: Any | None = None) -> Any:
    """`T5ForConditionalGeneration` of our config: our `params` through the hub-style export,
    or a random initialisation."""
    from transformers import T5Config as HFConfig
    from transformers import T5ForConditionalGeneration

    from sbs_jax.models.hf import config_to_hf

    if params is not None:
        from sbs_jax.models import save_hf

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(config, params, tmp)
            return T5ForConditionalGeneration.from_pretrained(tmp)
    hub = config_to_hf(config)
    return T5ForConditionalGeneration(HFConfig(**{k: v for k, v in hub.items()
                                                  if k not in ("architectures", "model_type")}))


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def train_fn(model: Any, batches: dict, alpha: float, bf16: bool,
             device: str = "cpu") -> Callable[[], None]:
    """One reference-recipe step per call (waits for the device)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0,
                            fused=device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / 10_000))
    tensors = {v: (torch.tensor(b["encoder_input_tokens"], dtype=torch.long, device=device),
                   torch.tensor(b["decoder_target_tokens"], dtype=torch.long, device=device))
               for v, b in batches.items()}

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            label = model(input_ids=tensors["label"][0], labels=tensors["label"][1]).loss
            rationale = model(input_ids=tensors["rationale"][0],
                              labels=tensors["rationale"][1]).loss
        (alpha * label + (1 - alpha) * rationale).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
    return run


def decode_fn(model: Any, enc: np.ndarray, decode_len: int, bf16: bool, outputs: dict,
              name: str, device: str = "cpu") -> Callable[[], None]:
    """HF `generate`, greedy, EOS off (exactly `decode_len` new tokens) into outputs[name]. On a
    CPU `bf16` is autocast; on CUDA the model is expected in bf16 already."""
    import torch
    from transformers import GenerationConfig

    model.eval()
    gen = GenerationConfig(decoder_start_token_id=0, eos_token_id=None, pad_token_id=0,
                           max_new_tokens=decode_len, do_sample=False)
    tokens = torch.tensor(enc, dtype=torch.long, device=device)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                             enabled=bf16 and device == "cpu"):
            out = model.generate(input_ids=tokens, generation_config=gen)
        _sync(device)
        outputs[name] = out.cpu().numpy()[:, 1:]
    return run


def timed(fn: Callable[[], None], rounds: int) -> dict[str, float]:
    """First call's seconds (warm-up, compilation) and the median of `rounds` further calls."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "seconds": statistics.median(times)}


def _out_of_memory(device: str, run: Callable[[], dict]) -> dict:
    """`run()`, or {"oom": message} when the device runs out of memory."""
    import torch

    try:
        return run()
    except torch.cuda.OutOfMemoryError as exc:
        if device == "cuda":
            torch.cuda.empty_cache()
        return {"oom": str(exc).splitlines()[0]}


def sweep(config: Any, batches: list[int], decode_batches: list[int], input_len: int,
          label_len: int, rationale_len: int, decode_len: int, alpha: float,
          rounds: int) -> dict[str, Any]:
    """The peer's train steps and decodes per batch size, with peak memory on CUDA."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" or config.dtype == "bfloat16"
    torch.manual_seed(0)
    model = hf_model(config).to(device)
    rows: dict[str, dict] = {"train": {}, "decode": {}}

    def measured(fn_factory):
        def run():
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            out = timed(fn_factory(), rounds)
            if device == "cuda":
                out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
            return out
        return run

    for batch in sorted(batches):
        views = random_views(config.vocab_size, batch, input_len, label_len, rationale_len)
        rows["train"][batch] = _out_of_memory(device, measured(
            lambda views=views: train_fn(model, views, alpha, bf16, device)))
        if "oom" in rows["train"][batch]:
            break  # a larger batch needs more
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        model = model.to(torch.bfloat16)  # bf16 weights for generate
    outputs: dict = {}
    for batch in sorted(decode_batches):
        enc = random_views(config.vocab_size, batch, input_len, label_len,
                           rationale_len)["rationale"]["encoder_input_tokens"]
        rows["decode"][batch] = _out_of_memory(device, measured(
            lambda enc=enc: decode_fn(model, enc, decode_len, bf16, outputs, "hf", device)))
    return {"device": device, "device_name": (torch.cuda.get_device_name() if device == "cuda"
                                              else "cpu"),
            "torch_version": torch.__version__, "bf16": bf16, **rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="t5_1_1_large")
    parser.add_argument("--dtype", default="bfloat16", help="on a CPU: bf16 autocast or fp32")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--decode_batches", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--input_len", type=int, default=256)
    parser.add_argument("--label_len", type=int, default=8)
    parser.add_argument("--rationale_len", type=int, default=128)
    parser.add_argument("--decode_len", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json_out")
    args = parser.parse_args(argv)

    from sbs_jax.models.config import get_config

    config = get_config(args.config, dtype=args.dtype)
    result = sweep(config, args.batches, args.decode_batches, args.input_len, args.label_len,
                   args.rationale_len, args.decode_len, args.alpha, args.rounds)
    return results.emit(result, args.json_out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process leaves the GPU to torch
    main()
    sys.exit(0)
