"""`sbs-vocab`: train a T5-convention SentencePiece vocabulary on text files, one sentence a
line (see sbs_jax.data.vocab); prints the .model path.
"""

from __future__ import annotations

import argparse
import sys

from sbs_jax.data import vocab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbs-vocab", description=vocab.__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, nargs="+", help="text files, one sentence a line")
    parser.add_argument("--output_prefix", required=True)
    parser.add_argument("--vocab_size", type=int, default=512)
    args = parser.parse_args(argv)
    texts = []
    for path in args.input:
        with open(path, encoding="utf-8") as f:
            texts.extend(line.rstrip("\n") for line in f)
    print(vocab.train_vocab(texts, args.output_prefix, args.vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
