"""Token lengths of the sbs tasks on built data, and the length buckets a batch of them pads to.

Reads each dataset's label and rationale tasks through the input pipeline's own tokenization
(`pipeline.load_tokenized`: the SeqIO tasks with their prefixes, NLI separators and the data
folder's vocabulary), capped at 1024 input / 256 target tokens as the recipe caps them, and
reports per feature the longest example, the 99th percentile and the bucket
(`sbs_jax.data.packing.DEFAULT_BUCKETS`) that the longest pads to: a batch holding it is the largest step a
run on that data compiles. These are the lengths the shipped accelerator configs are sized for
with benchmarks/memory.py.

    python benchmarks/feature_lengths.py --data_dir DATA [--datasets esnli anli1 cqa svamp]

DATA is a folder built by `python -m sbs_jax.data.build` (its spiece.model is the vocabulary
unless SBS_VOCAB names another). Prints a markdown table, then JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

CAPS = {"inputs": 1024, "targets": 256}


def _lengths(task: str, split: str) -> dict[str, np.ndarray]:
    from sbs_jax.data import pipeline

    examples = pipeline.load_tokenized(task, split, CAPS)
    return {key: np.array([len(e[key]) for e in examples.values()]) for key in CAPS}


def _summary(values: np.ndarray, cap: int) -> dict[str, int]:
    from sbs_jax.data import packing

    longest = int(values.max())
    return {"max": longest, "p99": int(np.percentile(values, 99)), "at_cap": int((values >= cap)
            .sum()), "bucket": packing.bucket_length(longest, packing.DEFAULT_BUCKETS, cap)}


def measure(dataset: str, splits: list[str]) -> dict[str, dict]:
    """Per feature (inputs of either task, gold and teacher labels, rationales) over `splits`."""
    features: dict[str, list[np.ndarray]] = {"inputs": [], "label": [], "rationale": []}
    for split in splits:
        tasks = [f"{dataset}_label_gt", f"{dataset}_rationale"]
        if split == "train":
            tasks.append(f"{dataset}_label_llm")
        for task in tasks:
            lengths = _lengths(task, split)
            features["inputs"].append(lengths["inputs"])
            features["rationale" if task.endswith("rationale") else "label"].append(
                lengths["targets"])
    return {name: _summary(np.concatenate(values), CAPS["inputs" if name == "inputs"
                                                        else "targets"])
            for name, values in features.items()}


def markdown_table(results: dict[str, dict]) -> str:
    lines = [("| dataset (splits) | inputs max / p99 -> bucket | labels max / p99 -> bucket | "
              "rationales max / p99 -> bucket |"), "|---|---|---|---|"]
    for name, r in results.items():
        cells = [f"{r[f]['max']} / {r[f]['p99']} -> {r[f]['bucket']}"
                 + (f" ({r[f]['at_cap']} at the cap)" if r[f]["at_cap"] else "")
                 for f in ("inputs", "label", "rationale")]
        lines.append(f"| {name} ({', '.join(r['splits'])}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="a folder built by sbs_jax.data.build")
    parser.add_argument("--datasets", nargs="+", default=["esnli", "anli1", "cqa", "svamp"])
    args = parser.parse_args(argv)

    import tasks
    from sbs_jax.data import records

    tasks.set_data_dir(args.data_dir)
    results: dict[str, dict] = {}
    for dataset in args.datasets:
        folder = os.path.join(args.data_dir, dataset)
        splits = [s for s in ("train", "valid", "test") if records.shard_paths(folder, s)]
        if not splits:
            print(f"{dataset}: not built in {args.data_dir}; skipped", file=sys.stderr)
            continue
        results[dataset] = {**measure(dataset, splits), "splits": splits}
    overall = {f: max(r[f]["bucket"] for r in results.values())
               for f in ("inputs", "label", "rationale")}
    print(markdown_table(results))
    print(json.dumps({"caps": CAPS, "datasets": results, "largest_buckets": overall,
                      "vocabulary": str(tasks.get_vocabulary().sentencepiece_model_file)},
                     indent=2))
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
    sys.exit(0)
