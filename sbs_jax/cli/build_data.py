"""`sbs-build-data` (`python -m sbs_jax.data.build`): released data -> TFRecord datasets.

See sbs_jax.data.build for what is written and checked.
"""

from __future__ import annotations

import argparse
import os
import sys

from sbs_jax.data import build, records
from sbs_jax.runtime import console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbs-build-data",
                                     description=build.__doc__.splitlines()[0])
    parser.add_argument("--source_dir", help="released-data folder (dss_data layout); not "
                        "needed for --dataset synthetic")
    parser.add_argument("--data_dir", required=True,
                        help="output root (what SBS_DATA_DIR points at for training)")
    parser.add_argument("--dataset", action="append", choices=build.ALL_DATASETS, required=True,
                        help="repeatable")
    parser.add_argument("--splits", nargs="+", choices=records.SPLITS, default=None,
                        help="default: train valid test (others already built are kept)")
    parser.add_argument("--records_per_shard", type=int, default=50_000)
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip malformed rows (counted in info.json) instead of stopping")
    parser.add_argument("--allow_missing_teacher", action="store_true",
                        help="build splits that have no teacher completions (gold labels only)")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab", metavar="PATH",
                       help="SentencePiece model to copy to DATA_DIR/spiece.model (e.g. a HF T5 "
                            "spiece.model); default: keep the one there, or train one")
    vocab.add_argument("--no_vocab", action="store_true",
                       help="leave DATA_DIR/spiece.model alone (set SBS_VOCAB for training)")
    parser.add_argument("--vocab_size", type=int, default=build.DEFAULT_VOCAB_SIZE,
                        help="pieces of a trained vocabulary (with 3 specials + 256 bytes)")
    args = parser.parse_args(argv)
    if args.records_per_shard < 1:
        parser.error(f"--records_per_shard must be >= 1, got {args.records_per_shard}")
    if args.vocab_size < 512:
        parser.error(f"--vocab_size must be >= 512, got {args.vocab_size}")
    for dataset in args.dataset:
        if dataset != "synthetic" and not args.source_dir:
            parser.error(f"--source_dir is required for {dataset}")
    try:
        paths = build.build_all(args.source_dir, args.data_dir, list(dict.fromkeys(args.dataset)),
                                args.splits, args.records_per_shard, args.skip_bad,
                                args.allow_missing_teacher, args.vocab,
                                None if args.no_vocab else args.vocab_size)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}\nNothing was published.", file=sys.stderr)
        return 2
    for path in paths:
        console.say(f"wrote {path}")
    vocab_path = os.path.join(args.data_dir, build.VOCAB_FILE)
    if not args.no_vocab and os.path.exists(vocab_path):
        console.say(f"vocabulary: {vocab_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
