"""Released data (or the built-in synthetic set) -> sharded TFRecord datasets + info.json.

`python -m sbs_jax.data.build --source_dir ../shared/dss_data --data_dir DATA --dataset cqa`
writes `DATA/cqa/{train,valid,test}-NNNNN.tfrecord` in the record schema (sbs_jax.data.records)
plus `DATA/cqa/info.json` (counts per split, shard names, SHA-256 checksums, parse failures,
skipped rows). cqa and svamp have no released valid split: it is carved once from the full
train split (seed 0, 10%; see dss.carve_valid). Every requested split is read and checked
before anything is written, so a missing file (e.g. the e-SNLI / ANLI train inputs) or a bad row
stops the job with a clear message and leaves earlier output untouched.
"""

from __future__ import annotations

import argparse
import os
import sys

from sbs_jax.data import dss, records, synthetic

ALL_DATASETS = dss.DSS_DATASETS + ("synthetic",)


def _needed_released_splits(dataset: str, splits: list[str]) -> list[str]:
    """Released files behind our splits (valid of cqa/svamp comes from train)."""
    released = dss.RELEASED_SPLITS[dataset]
    return sorted({s if s in released else "train" for s in splits}, key=records.SPLITS.index)


def prepare(source_dir: str, dataset: str, splits: list[str], skip_bad: bool = False,
            allow_missing_teacher: bool = False
            ) -> tuple[dict[str, list[records.Record]], dict]:
    """Reads and checks the requested splits; returns records per split and info extras.

    A split without teacher completions is an error unless `allow_missing_teacher` (its
    records then have empty teacher fields: fine for `_gt` / `_standard_gt` tasks only).
    """
    loaded = {}
    for released in _needed_released_splits(dataset, splits):
        try:
            loaded[released] = dss.read_split(source_dir, dataset, released, skip_bad)
        except FileNotFoundError as error:
            hint = ""
            if released == "train" and "train" in splits:
                others = [s for s in splits if s != "train" and s in dss.RELEASED_SPLITS[dataset]]
                hint = f" Or build the other splits only: --splits {' '.join(others)}."
            raise FileNotFoundError(f"cannot build {dataset}/{released}: {error}{hint}") from None
        if not loaded[released].has_completions and not allow_missing_teacher:
            raise FileNotFoundError(
                f"cannot build {dataset}/{released}: no teacher completions "
                f"{os.path.join(source_dir, dataset, 'llm', released + '_CoT_*.json')}. Run the "
                "teacher job (sbs-teacher) on these inputs instead, or pass "
                "--allow_missing_teacher to build gold-label-only records.")
    by_split: dict[str, list[records.Record]] = {}
    for split in splits:
        if split in dss.RELEASED_SPLITS[dataset]:
            by_split[split] = loaded[split].records
    if "train" in loaded and "valid" not in dss.RELEASED_SPLITS[dataset]:
        train, valid = dss.carve_valid(loaded["train"].records)
        if "train" in splits:
            by_split["train"] = train
        if "valid" in splits:
            by_split["valid"] = [r.replace(source=f"{dataset}/valid (carved from train)")
                                 for r in valid]
    seen: dict[str, str] = {}
    for split, recs in by_split.items():
        for record in recs:
            if record.id in seen:
                raise dss.DataError(f"{dataset}: duplicate id {record.id!r} in {seen[record.id]} "
                                    f"and {split}")
            seen[record.id] = split
    extras = {
        "source_dir": os.path.abspath(source_dir),
        "released": {s: {"rows": len(d.records), "parse_failures": d.parse_failures,
                         "empty_rationales": d.empty_rationales, "skipped": d.skipped}
                     for s, d in loaded.items()},
    }
    if "valid" not in dss.RELEASED_SPLITS[dataset]:
        extras["valid_carve"] = {"fraction": dss.VALID_FRACTION, "seed": dss.VALID_SEED}
    return by_split, extras


def build(source_dir: str, data_dir: str, dataset: str, splits: list[str] | None = None,
          records_per_shard: int = 50_000, skip_bad: bool = False,
          allow_missing_teacher: bool = False) -> str:
    """Builds one dataset folder under `data_dir`; returns its info.json path."""
    splits = list(splits or records.SPLITS)
    directory = os.path.join(data_dir, dataset)
    if dataset == "synthetic":
        synthetic.write_dataset(directory, {s: synthetic.DEFAULT_SIZES[s] for s in splits})
        return os.path.join(directory, "info.json")
    by_split, extras = prepare(source_dir, dataset, splits, skip_bad, allow_missing_teacher)
    for split, recs in by_split.items():
        records.write_split(recs, directory, split, records_per_shard)
    return records.write_info(directory, dataset, extras)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source_dir", help="released-data folder (dss_data layout); not "
                        "needed for --dataset synthetic")
    parser.add_argument("--data_dir", required=True,
                        help="output root (what SBS_DATA_DIR points at for training)")
    parser.add_argument("--dataset", action="append", choices=ALL_DATASETS, required=True,
                        help="repeatable")
    parser.add_argument("--splits", nargs="+", choices=records.SPLITS, default=None,
                        help="default: train valid test")
    parser.add_argument("--records_per_shard", type=int, default=50_000)
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip malformed rows (counted in info.json) instead of stopping")
    parser.add_argument("--allow_missing_teacher", action="store_true",
                        help="build splits that have no teacher completions (gold labels only)")
    args = parser.parse_args(argv)
    for dataset in args.dataset:
        if dataset != "synthetic" and not args.source_dir:
            parser.error(f"--source_dir is required for {dataset}")
        try:
            info = build(args.source_dir, args.data_dir, dataset, args.splits,
                         args.records_per_shard, args.skip_bad, args.allow_missing_teacher)
        except (FileNotFoundError, dss.DataError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"{dataset}: wrote {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
