"""Our Flax T5 vs HF PyTorch T5 on the same CPU in the same run: train step and greedy decoding.

Both models have the same config and the same weights (ours imported from the HF model), so the
greedy outputs are identical and both decode the same number of tokens. The train step is
forward + backward + AdamW on a batch of `--batch` inputs of `--input_len` tokens and targets of
`--target_len` tokens, with dropout on in both. Rounds alternate between the two frameworks so
that load from other processes hits both alike; the median round is reported. Prints JSON.
Targets: train-step ratio >= 1 and decoding ratio > 1 (ours / HF tokens per second).

    python benchmarks/bench_model.py [--config t5_small] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _hf_model(config):
    import torch
    from transformers import T5Config as HFConfig
    from transformers import T5ForConditionalGeneration

    from sbs_jax.models.hf import config_to_hf

    hub = config_to_hf(config)
    kwargs = {k: v for k, v in hub.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    return T5ForConditionalGeneration(HFConfig(**kwargs))


def _timed(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="t5_small", help="a sbs_jax.models config name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=256)
    parser.add_argument("--target_len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch

    from sbs_jax.infer import decoding
    from sbs_jax.models import T5, get_config, load_hf
    from sbs_jax.train import losses

    config = get_config(args.config)
    hf_model = _hf_model(config)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        _, params = load_hf(tmp)
    # Keep HF's weights identical to ours (save_pretrained may drop tied copies).
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    enc = rng.integers(2, config.vocab_size, (args.batch, args.input_len)).astype(np.int32)
    targets = rng.integers(2, config.vocab_size, (args.batch, args.target_len)).astype(np.int32)
    dec = np.concatenate([np.zeros((args.batch, 1), np.int32), targets[:, :-1]], axis=1)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
             "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}

    # --- ours: jitted train step
    model = T5(config)
    optimizer = optax.adamw(1e-4, weight_decay=0.0)

    def train_step(params, opt_state, batch, key):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch["encoder_input_tokens"],
                                 batch["decoder_input_tokens"], enable_dropout=True,
                                 rngs={"dropout": key})
            return losses.mean_loss(losses.token_loss_sums(logits, batch))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    train_params = jax.tree_util.tree_map(jnp.copy, params)
    opt_state = optimizer.init(train_params)
    state = {"params": train_params, "opt": opt_state, "key": jax.random.PRNGKey(0)}

    def ours_train():
        state["key"], key = jax.random.split(state["key"])
        state["params"], state["opt"], loss = step(state["params"], state["opt"], batch, key)
        loss.block_until_ready()

    # --- HF: same step in PyTorch
    hf_train_model = _hf_model(config).train()
    hf_train_model.load_state_dict(hf_model.state_dict())
    torch_opt = torch.optim.AdamW(hf_train_model.parameters(), lr=1e-4, weight_decay=0.0)
    t_enc, t_targets = torch.tensor(enc, dtype=torch.long), torch.tensor(targets, dtype=torch.long)

    def hf_train():
        loss = hf_train_model(input_ids=t_enc, labels=t_targets).loss
        loss.backward()
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)

    # --- decoding (greedy, same weights -> same tokens)
    hf_model.eval()
    from transformers import GenerationConfig

    gen_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                                  max_new_tokens=args.target_len, do_sample=False)
    outputs = {}

    def ours_decode():
        outputs["ours"] = np.asarray(decoding.generate(config, params, enc, args.target_len))

    def hf_decode():
        with torch.no_grad():
            outputs["hf"] = hf_model.generate(input_ids=t_enc, generation_config=gen_config
                                              ).numpy()[:, 1:]

    for fn in (ours_train, hf_train, ours_decode, hf_decode):  # warm-up / compile
        fn()
    timings = {name: [] for name in ("ours_train", "hf_train", "ours_decode", "hf_decode")}
    for _ in range(args.rounds):
        for name, fn in (("ours_train", ours_train), ("hf_train", hf_train),
                         ("ours_decode", ours_decode), ("hf_decode", hf_decode)):
            timings[name] += _timed(fn, 1)

    hf_tokens = outputs["hf"]
    hf_tokens = np.pad(hf_tokens, ((0, 0), (0, args.target_len - hf_tokens.shape[1])))
    decoded = int(sum(np.argmax(r == 1) + 1 if (r == 1).any() else len(r)
                      for r in outputs["ours"]))
    train_tokens = args.batch * (args.input_len + args.target_len)
    median = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "config": args.config, "batch": args.batch, "input_len": args.input_len,
        "target_len": args.target_len, "rounds": args.rounds,
        "device": str(jax.devices()[0].platform), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "train_step_s": {"ours": median["ours_train"], "hf": median["hf_train"]},
        "train_tokens_per_s": {"ours": train_tokens / median["ours_train"],
                               "hf": train_tokens / median["hf_train"]},
        "train_ratio_ours_over_hf": median["hf_train"] / median["ours_train"],
        "decode_s": {"ours": median["ours_decode"], "hf": median["hf_decode"]},
        "decoded_tokens": decoded,
        "decode_tokens_per_s": {"ours": decoded / median["ours_decode"],
                                "hf": decoded / median["hf_decode"]},
        "decode_ratio_ours_over_hf": median["hf_decode"] / median["ours_decode"],
        "same_greedy_tokens": bool(np.array_equal(np.where(
            np.cumsum(np.cumsum(hf_tokens == 1, 1), 1) > 1, 0, hf_tokens), outputs["ours"])),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sbs_jax.runtime import malloc

    malloc.ensure_preloaded()  # the allocator the jobs run on (sbs_jax/runtime/malloc.py)
    main()
