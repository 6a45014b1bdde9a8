"""Estimated cost of the paper preset's grid cells: FLOPs (benchmarks/flops.py) and hours.

    python benchmarks/grid_cost.py --source_dir ../shared/dss_data --model t5_1_1_base \
        [--vocab /models/t5-v1_1-base/spiece.model] [--markdown]

A cell's cost does not depend on its data fraction or seed: every cell trains TRAIN_STEPS steps
of BATCH_SIZE examples. Per (dataset, method):
- training FLOPs = steps x the mean step FLOPs over batches sampled from the released data, each
  view padded to the length bucket our pipeline pads it to (unpacked, the paper's recipe);
- evaluation FLOPs = greedy decoding of valid and test at every eval (the paper preset scores
  test at every eval) plus the final test eval, each batch decoding as many steps as its longest
  target (decoding stops once every row has ended).
Hours = FLOPs / (peak x MFU). These are estimates, not measurements: the MFUs are assumptions
(see README "Reproducing the paper"), and without --vocab token counts are estimated as
characters / CHARS_PER_TOKEN (T5's SentencePiece averages about 4 characters a token on English
text); a HF T5 spiece.model gives T5's exact counts. Where the release lacks train inputs
(e-SNLI, ANLI r1), the valid split stands in for train (same distribution).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

# benchmarks/ holds scripts, not a package: its modules import each other by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops
import peak

from sbs_jax.data import dss
from sbs_jax.data.packing import DEFAULT_BUCKETS, bucket_length
from sbs_jax.experiments.grid import METHODS
from sbs_jax.models import get_config

CHARS_PER_TOKEN = 4.0
T5_VOCAB_ROWS = 32128  # T5's 32,100 pieces padded to a multiple of 128
# The paper preset's recipe (gin/sbs_base.gin + gin/base.gin, gin/single_task.gin).
TRAIN_STEPS, BATCH_SIZE, EVAL_PERIOD, EVAL_BATCH = 10_000, 64, 250, 64
INPUT_CAP, TARGET_CAP = 1024, 256
# Accelerators of the estimate: name -> dense bf16 peak FLOP/s of the whole host.
HOSTS = {"H100": peak.published_peak("H100"), "TPU v4-8": 4 * peak.published_peak("TPU v4")}


class TokenCounter:
    """Tokens of a text (+1 EOS): the vocabulary's when given, else estimated from its length."""

    def __init__(self, vocab_path: str | None):
        self._processor = None
        if vocab_path:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_file=vocab_path)

    def __call__(self, text: str) -> int:
        if self._processor is not None:
            return len(self._processor.encode(text)) + 1
        return int(np.ceil(len(text) / CHARS_PER_TOKEN)) + 1


def example_lengths(records: list, method: str, count: TokenCounter, split: str
                    ) -> dict[str, np.ndarray]:
    """Per example: input tokens (with the method's prefix) and the target tokens of the split
    (teacher labels on train for the teacher-label methods, gold ones elsewhere)."""
    label_task, rationale_task = METHODS[method].tasks("ds")
    prefix = {"ds_label_gt": "predict: ", "ds_label_llm": "predict: "}.get(label_task, "")
    teacher = split == "train" and (label_task.endswith("_llm") or label_task == "ds_single_task")

    def input_tokens(text: str) -> int:
        if dss.NLI_SEPARATOR in text:  # the separator is one token (EOS)
            premise, hypothesis = dss.split_nli_input(text)
            return count(prefix + premise) + count(hypothesis)
        return count(prefix + text)

    def label(record) -> str:
        return (record.llm_label or record.label) if teacher else record.label

    inputs = np.array([input_tokens(r.input) for r in records])
    if label_task.startswith("ds_single_task"):
        labels = np.array([count(f"{r.rationale} So the answer is {label(r)}.")
                           for r in records])
    else:
        labels = np.array([count(label(r)) for r in records])
    lengths = {"inputs": np.minimum(inputs, INPUT_CAP), "labels": np.minimum(labels, TARGET_CAP)}
    if rationale_task:
        lengths["rationales"] = np.minimum([count(r.rationale) for r in records], TARGET_CAP)
    return lengths


def _padded(lengths: np.ndarray, cap: int) -> int:
    return bucket_length(int(lengths.max()), DEFAULT_BUCKETS, cap)


def train_step_flops(config, lengths: dict, rng: np.random.Generator, samples: int) -> float:
    """Mean FLOPs of one train step over `samples` random batches."""
    total = 0.0
    for _ in range(samples):
        rows = rng.choice(len(lengths["inputs"]), BATCH_SIZE, replace=False)
        input_len = _padded(lengths["inputs"][rows], INPUT_CAP)
        label_len = _padded(lengths["labels"][rows], TARGET_CAP)
        if "rationales" in lengths:
            total += flops.sbs_step_flops(config, BATCH_SIZE, input_len, label_len,
                                          _padded(lengths["rationales"][rows], TARGET_CAP))["total"]
        else:
            total += flops.train_flops(config, BATCH_SIZE, input_len, label_len)
    return total / samples


def decode_flops(config, lengths: dict) -> float:
    """Greedy decoding of one split in eval batches, each as long as its longest target."""
    total = 0.0
    for start in range(0, len(lengths["inputs"]), EVAL_BATCH):
        rows = slice(start, start + EVAL_BATCH)
        total += flops.greedy_decode_flops(config, EVAL_BATCH,
                                           _padded(lengths["inputs"][rows], INPUT_CAP),
                                           int(lengths["labels"][rows].max()))
    return total


def dataset_splits(source_dir: str, dataset: str) -> dict[str, list]:
    """Train (or, where the release lacks its inputs, valid), valid and test records."""
    test = dss.read_split(source_dir, dataset, "test").records
    if dataset in ("cqa", "svamp"):
        train, valid = dss.carve_valid(dss.read_split(source_dir, dataset, "train").records)
        return {"train": train, "valid": valid, "test": test}
    valid = dss.read_split(source_dir, dataset, "valid").records
    return {"train": valid, "valid": valid, "test": test}


def cell_costs(source_dir: str, model: str, vocab: str | None, train_mfu: float,
               decode_mfu: float, samples: int = 200) -> list[dict]:
    config = get_config(model, vocab_size=T5_VOCAB_ROWS)
    count = TokenCounter(vocab)
    evals = TRAIN_STEPS // EVAL_PERIOD
    rows = []
    for dataset in ("esnli", "anli1", "cqa", "svamp"):
        splits = dataset_splits(source_dir, dataset)
        for method in METHODS:
            lengths = {s: example_lengths(r, method, count, s) for s, r in splits.items()}
            train = TRAIN_STEPS * train_step_flops(config, lengths["train"],
                                                   np.random.default_rng(0), samples)
            evaluation = (evals * (decode_flops(config, lengths["valid"])
                                   + decode_flops(config, lengths["test"]))
                          + decode_flops(config, lengths["test"]))
            row = {"dataset": dataset, "method": method, "train_flops": train,
                   "eval_flops": evaluation}
            for host, host_peak in HOSTS.items():
                row[f"{host} hours"] = (train / (host_peak * train_mfu)
                                        + evaluation / (host_peak * decode_mfu)) / 3600
            rows.append(row)
    return rows


# The paper's T5-Base table (its Table 6 rows at 100% of the data, 4 runs each; the
# single-task baseline with gold labels, as `sbs_jax.experiments.grid` reads it) and the whole
# grid per size.
TABLE_METHODS, SEEDS, FRACTIONS = ("standard_ft", "single_task_gt", "sbs_gt"), 4, 4


def totals(rows: list[dict]) -> dict[str, dict]:
    """Summed FLOPs and hours of the T5-Base table's runs and of the whole grid for the model."""
    keys = ["train_flops", "eval_flops", *(f"{h} hours" for h in HOSTS)]
    table = [r for r in rows if r["method"] in TABLE_METHODS]
    return {
        f"the table's {len(table) * SEEDS} runs": {
            k: SEEDS * sum(r[k] for r in table) for k in keys},
        f"the grid's {len(rows) * SEEDS * FRACTIONS} runs for this size": {
            k: SEEDS * FRACTIONS * sum(r[k] for r in rows) for k in keys},
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| dataset | method (one run) | train PFLOPs | eval PFLOPs | "
             + " | ".join(f"{h} hours" for h in HOSTS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(HOSTS)]
    named = [(f"{r['dataset']} | {r['method']}", r) for r in rows]
    named += [(f"total | {name}", total) for name, total in totals(rows).items()]
    for name, r in named:
        lines.append(f"| {name} | {r['train_flops'] / 1e15:,.0f} | {r['eval_flops'] / 1e15:,.0f} | "
                     + " | ".join(f"{r[f'{h} hours']:,.2f}" for h in HOSTS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source_dir", required=True, help="the released data (dss_data)")
    parser.add_argument("--model", default="t5_1_1_base")
    parser.add_argument("--vocab", help="a T5 spiece.model for exact token counts")
    parser.add_argument("--train_mfu", type=float, default=0.25)
    parser.add_argument("--decode_mfu", type=float, default=0.03)
    parser.add_argument("--samples", type=int, default=200, help="train batches sampled")
    parser.add_argument("--markdown", action="store_true", help="a markdown table, not JSON")
    args = parser.parse_args(argv)
    rows = cell_costs(args.source_dir, args.model, args.vocab, args.train_mfu, args.decode_mfu,
                      args.samples)
    print(markdown(rows) if args.markdown
          else json.dumps({"cells": rows, "totals": totals(rows)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
