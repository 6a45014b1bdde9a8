"""Packing on the paper's data: sbs training examples/s with `pack=True` against bucket-padded
batches, measured in one run.

For each dataset of the released data (the train split, or `valid` where the train inputs are
not released, noted), builds the records and a vocabulary, then draws the same `--steps` paired
batches of `--batch` examples both ways (`PairedBatches(pack=False)` and `pack=True`: the same
examples in each step). Every batch is run once to compile its shapes, then the sbs train step
(`bench_sbs_step.sbs_step`: both views, AdamW) is timed over all of them, `--rounds` times, the
order alternating. Reports the share of real tokens among the padded ones, the shapes compiled,
examples/s and packed / unpacked.

    python benchmarks/bench_packing.py [--datasets esnli,cqa] [--config t5_1_1_small]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 512, "targets": 32, "rationale_targets": 256}
VIEWS = ("label", "rationale")


def _fill(batches: list[dict]) -> dict[str, float]:
    """Real tokens / padded positions over the batches, encoder and decoder (both views)."""
    out = {}
    for side, key in (("encoder", "encoder_input_tokens"), ("decoder", "decoder_target_tokens")):
        real = sum(int(np.count_nonzero(b[v][key])) for b in batches for v in VIEWS)
        size = sum(b[v][key].size for b in batches for v in VIEWS)
        out[side] = real / size
    return out


def _dataset(args, dataset: str, work_dir: str) -> dict:
    import jax
    from bench_pipeline import prepare
    from bench_sbs_step import sbs_step

    import tasks
    from sbs_jax import models
    from sbs_jax.data.pipeline import PairedBatches, PairedExamples
    from sbs_jax.data.vocab import padded_vocab_size

    split, vocab = prepare(args.source_dir, work_dir, None, dataset)
    tasks.set_data_dir(work_dir)
    tasks.set_vocabulary_path(vocab)
    label_task, rationale_task = f"{dataset}_label_llm", f"{dataset}_rationale"
    examples = PairedExamples.load(label_task, rationale_task, split, LENGTHS)
    drawn = {}
    for pack in (False, True):
        batches = PairedBatches(label_task, rationale_task, split, args.batch, LENGTHS,
                                examples=examples, pack=pack)
        drawn[pack] = [next(batches) for _ in range(args.steps)]
    config = models.get_config(args.config, dtype=args.dtype, dropout_rate=0.0,
                               vocab_size=padded_vocab_size(tasks.get_vocabulary().vocab_size))
    params = models.init_params(config, jax.random.PRNGKey(0))
    steps = {}
    for pack in drawn:
        to_device, step = sbs_step(config, params, 0.5)
        steps[pack] = lambda batch, to_device=to_device, step=step: float(step(to_device(
            {v: batch[v] for v in VIEWS})))
    compile_s = {}
    for pack, batches in drawn.items():  # first pass: compiles every shape
        start = time.perf_counter()
        for batch in batches:
            steps[pack](batch)
        compile_s[pack] = time.perf_counter() - start
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for pack in ((False, True) if r % 2 == 0 else (True, False)):
            time.sleep(args.settle_s)
            start = time.perf_counter()
            for batch in drawn[pack]:
                steps[pack](batch)
            times[pack].append(time.perf_counter() - start)
    per_s = {pack: args.batch * args.steps / statistics.median(t) for pack, t in times.items()}

    def shapes(batches):
        return len({tuple(b[v]["encoder_input_tokens"].shape + b[v]["decoder_target_tokens"]
                          .shape) for b in batches for v in VIEWS})
    return {
        "dataset": dataset, "split": split, "examples": len(examples.label),
        "fill_unpacked": _fill(drawn[False]), "fill_packed": _fill(drawn[True]),
        "rows_per_step": {mode: float(np.mean([len(b[v]["encoder_input_tokens"])
                                                for b in drawn[pack] for v in VIEWS]))
                          for mode, pack in (("unpacked", False), ("packed", True))},
        "view_shapes": {"unpacked": shapes(drawn[False]), "packed": shapes(drawn[True])},
        "first_pass_s": {"unpacked": compile_s[False], "packed": compile_s[True]},
        "examples_per_s": {"unpacked": per_s[False], "packed": per_s[True]},
        "ratio_packed_to_unpacked": per_s[True] / per_s[False],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source_dir", default=os.path.join(ROOT, "..", "shared", "dss_data"))
    parser.add_argument("--datasets", default="esnli,cqa", help="comma-separated")
    parser.add_argument("--config", default="t5_1_1_small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="batches timed per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle_s", type=float, default=0.5)
    parser.add_argument("--json_out")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sbs_jax.runtime import malloc

    malloc.ensure_preloaded()
    import jax

    if not os.path.isdir(args.source_dir):
        sys.exit(f"bench_packing: no released data at {args.source_dir} (see README)")
    results = []
    with tempfile.TemporaryDirectory() as work_dir:
        for dataset in args.datasets.split(","):
            results.append(_dataset(args, dataset.strip(), work_dir))
            print(json.dumps(results[-1]), flush=True)
    out = {"benchmark": "bench_packing", "config": args.config, "dtype": args.dtype,
           "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
           "device": jax.devices()[0].device_kind, "allocator": malloc.active_allocator(),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "results": results}
    print(json.dumps(out, indent=2))
    print("| dataset (split) | real tokens, unpacked enc / dec | packed enc / dec | rows a view "
          "| examples/s unpacked | packed | packed / unpacked |\n|---|---|---|---|---|---|---|")
    for r in results:
        fu, fp = r["fill_unpacked"], r["fill_packed"]
        print(f"| {r['dataset']} ({r['split']}) | {fu['encoder']:.0%} / {fu['decoder']:.0%} | "
              f"{fp['encoder']:.0%} / {fp['decoder']:.0%} | {r['rows_per_step']['unpacked']:.0f}"
              f" -> {r['rows_per_step']['packed']:.1f} | {r['examples_per_s']['unpacked']:.1f} "
              f"| {r['examples_per_s']['packed']:.1f} | **{r['ratio_packed_to_unpacked']:.2f}** |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
