"""The CPU backend's training model (`models.cpu.training_model`) vs plain `T5`: the sbs train
step of the quickstart's model in one process, alternating rounds, medians.

Both run `trainer.make_train_step` (both views, AdamW) from the same params on the same batch;
the losses they reach are compared. Defaults are gin/quickstart.gin's model and batch (d_model
64, 2+2 layers, batch 32) with inputs of 32 and targets of 8 (label) and 48 (rationale).
Prints a markdown table, then JSON.

    python benchmarks/bench_cpu_training.py [--steps 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def _batch(rng: np.random.Generator, vocab: int, batch: int, input_len: int,
           target_len: int) -> dict[str, np.ndarray]:
    targets = rng.integers(2, vocab, (batch, target_len)).astype(np.int32)
    return {"encoder_input_tokens": rng.integers(2, vocab, (batch, input_len)).astype(np.int32),
            "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input_len", type=int, default=32)
    parser.add_argument("--label_len", type=int, default=8)
    parser.add_argument("--rationale_len", type=int, default=48)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=50, help="timed steps a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import jax

    from sbs_jax import models, optim, partitioning, trainer
    from sbs_jax.models import cpu

    config = models.get_config("t5_1_1_tiny", vocab_size=640, emb_dim=64, num_heads=4,
                               head_dim=16, mlp_dim=256, dropout_rate=0.0, dtype=args.dtype)
    rng = np.random.default_rng(0)
    batches = {"label": _batch(rng, 640, args.batch, args.input_len, args.label_len),
               "rationale": _batch(rng, 640, args.batch, args.input_len, args.rationale_len)}
    part = trainer.Partitioner(partitioning.make_mesh((1, 1, 1), jax.devices()[:1]),
                               partitioning.logical_axis_rules(), config)
    schedule = optim.make_schedule("linear", 1e-3, total_steps=10_000)
    tx = optim.make_optimizer(schedule)
    placed = {v: trainer.global_batch(b, part.batch_sharding, args.batch)
              for v, b in batches.items()}
    runs = {}
    for name, model in (("T5", models.T5(config)), ("cpu.training_model",
                                                   cpu.training_model(config))):
        step = trainer.make_train_step(part, model, tx, schedule, trainer.StepOptions())
        state = trainer.init_state(part, config, tx, seed=0)
        start = time.perf_counter()
        state, metrics = step(state, placed)
        metrics["loss"].block_until_ready()
        runs[name] = {"step": step, "state": state, "compile_s": time.perf_counter() - start,
                      "seconds": []}
    for r in range(args.rounds):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            run = runs[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                run["state"], metrics = run["step"](run["state"], placed)
            metrics["loss"].block_until_ready()
            run["seconds"].append((time.perf_counter() - start) / args.steps)
            run["loss"] = float(metrics["loss"])
    rows = {name: {"ms_per_step": 1000 * statistics.median(run["seconds"]),
                   "compile_s": run["compile_s"], "loss": run["loss"]}
            for name, run in runs.items()}
    base = rows["T5"]["ms_per_step"]
    print("| model | ms a step | speed vs T5 | compile s | loss after the steps |\n"
          "|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['ms_per_step']:.1f} | {base / row['ms_per_step']:.2f} | "
              f"{row['compile_s']:.1f} | {row['loss']:.4f} |")
    print(json.dumps({"args": vars(args), "rows": rows, "backend": jax.default_backend(),
                      "load_average": os.getloadavg(), "cpu_count": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
