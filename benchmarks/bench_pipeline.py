"""Input pipeline throughput on e-SNLI against what a paired training step consumes.

Builds e-SNLI records from the released data (the train split when its inputs are in place,
else the largest split present, `valid`, with a note), trains a vocabulary on them when none is
given, then measures in one run:
- load: reading + tokenising both views into memory (`PairedExamples.load`), examples/s;
- batches: assembling paired, bucket-padded batches (`PairedBatches`), examples/s;
- peer: a jitted paired training step (forward + backward of label and rationale views, sbs_loss)
  of `--model` on the same batches, examples/s consumed;
and prints JSON with the ratio batches / peer (>= 1 means the pipeline keeps up; the load is a
one-off per run and is reported as seconds per 100k examples).

    python benchmarks/bench_pipeline.py --source_dir ../shared/dss_data [--model t5_1_1_small]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 256, "targets": 16, "rationale_targets": 128}


def prepare(source_dir: str, work_dir: str, vocab: str | None,
            dataset: str = "esnli") -> tuple[str, str]:
    """Builds `dataset`'s records in `work_dir` (train split, else valid when the train inputs
    are absent) and a vocabulary trained on them unless one is given: (split, vocab path)."""
    from sbs_jax.data import build, dss, records
    from sbs_jax.data.vocab import train_vocab

    split = "train" if os.path.exists(dss.gold_path(source_dir, dataset, "train")) else "valid"
    build.build(source_dir, work_dir, dataset, [split])
    if vocab is None:
        texts = []
        for r in records.read_split(os.path.join(work_dir, dataset), split)[:20000]:
            texts += [r.input.replace(dss.NLI_SEPARATOR, " "), r.rationale, r.label]
        vocab = train_vocab(texts, os.path.join(work_dir, f"{dataset}_spiece"), vocab_size=8000)
    return split, vocab


def _train_step(model_name: str, vocab_size: int):
    import jax
    import optax

    from sbs_jax.data.vocab import padded_vocab_size
    from sbs_jax.models import T5, get_config, init_params
    from sbs_jax.train.losses import sbs_loss

    config = get_config(model_name, vocab_size=padded_vocab_size(vocab_size), dropout_rate=0.0)
    model = T5(config)
    params = init_params(config, jax.random.PRNGKey(0))
    optimizer = optax.adamw(1e-4, weight_decay=0.0)

    def loss_fn(p, label, rationale):
        label_logits = model.apply({"params": p}, label["encoder_input_tokens"],
                                   label["decoder_input_tokens"])
        rationale_logits = model.apply({"params": p}, rationale["encoder_input_tokens"],
                                       rationale["decoder_input_tokens"])
        return sbs_loss(label_logits, label, rationale_logits, rationale, 0.5)[0]

    @jax.jit
    def step(state, label, rationale):
        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p, label, rationale)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    return step, (params, optimizer.init(params)), jax.devices()[0].device_kind


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source_dir", default=os.path.join(ROOT, "..", "shared", "dss_data"))
    parser.add_argument("--vocab", help="a spiece.model (default: train one on the data)")
    parser.add_argument("--model", default="t5_1_1_tiny")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batch_steps", type=int, default=300)
    parser.add_argument("--train_steps", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)

    import jax
    import numpy as np

    import tasks
    from sbs_jax.data.pipeline import PairedBatches, PairedExamples

    with tempfile.TemporaryDirectory() as work_dir:
        split, vocab = prepare(args.source_dir, work_dir, args.vocab)
        tasks.set_data_dir(work_dir)
        tasks.set_vocabulary_path(vocab)
        start = time.perf_counter()
        examples = PairedExamples.load("esnli_label_llm", "esnli_rationale", split, LENGTHS)
        load_s = time.perf_counter() - start
        n = len(examples.label)

        batches = PairedBatches("esnli_label_llm", "esnli_rationale", split, args.batch_size,
                                LENGTHS, examples=examples)
        start = time.perf_counter()
        sample = [next(batches) for _ in range(args.batch_steps)]
        batch_s = (time.perf_counter() - start) / args.batch_steps

        step, state, device = _train_step(args.model, tasks.get_vocabulary().vocab_size)
        as_device = lambda b: {k: jax.device_put(v) for k, v in b.items()}
        fixed = sample[0]
        state, loss = step(state, as_device(fixed["label"]), as_device(fixed["rationale"]))
        loss.block_until_ready()
        timings = []
        for batch in [fixed] * args.train_steps:
            start = time.perf_counter()
            state, loss = step(state, as_device(batch["label"]), as_device(batch["rationale"]))
            loss.block_until_ready()
            timings.append(time.perf_counter() - start)
        step_s = float(np.median(timings))
    shapes = {view: {"inputs": fixed[view]["encoder_input_tokens"].shape[1],
                     "targets": fixed[view]["decoder_target_tokens"].shape[1]}
              for view in ("label", "rationale")}
    result = {
        "benchmark": "bench_pipeline", "dataset": "esnli", "split": split, "examples": n,
        "note": None if split == "train" else "e-SNLI train inputs absent: measured on valid",
        "load_examples_per_s": round(n / load_s, 1),
        "load_s_per_100k_examples": round(load_s / n * 1e5, 1),
        "batch_examples_per_s": round(args.batch_size / batch_s, 1),
        "peer": f"paired train step, {args.model}, batch {args.batch_size}, {device}",
        "peer_examples_per_s": round(args.batch_size / step_s, 1),
        "ratio_batches_to_peer": round(step_s / batch_s, 1),
        "padded_lengths_first_batch": shapes,
        "note_load": "CPU timings on a shared machine are inflated by other load",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
