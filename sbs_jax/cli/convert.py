"""Convert between a HF T5 directory and our orbax checkpoint (MODEL_DIR).

    python -m sbs_jax.convert --to=hf --model_dir=RUN [--step=N] --hf_dir=OUT [--overwrite]
    python -m sbs_jax.convert --to=ours --hf_dir=HF --model_dir=RUN

--to=hf exports a trained student so `T5ForConditionalGeneration.from_pretrained(OUT)` gives
the same logits and `AutoTokenizer.from_pretrained(OUT)` the same input ids as training: the
run's own vocabulary (MODEL_DIR/spiece.model) goes with it as spiece.model + tokenizer.json.
The architecture comes from MODEL_DIR/model_config.json when present, else from the run's
run_config.json (model_name + overrides) or --model_name, with every size read from the
checkpoint's own parameter shapes. --vocab names the vocabulary of a MODEL_DIR that recorded
none (one that differs from the run's is refused). A non-empty OUT is refused unless
--overwrite. Exported files are world-readable (0644).
--to=ours writes step 0 of MODEL_DIR (params plus the fresh AdamW state that step 0 of
training starts from), model_config.json and the HF folder's spiece.model (pinned as in
training); use it as INITIAL_CHECKPOINT_PATH or with eval / infer. (Training also reads a HF
directory as INITIAL_CHECKPOINT_PATH directly.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sbs-convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--to", required=True, choices=("hf", "ours"),
                        help="hf: MODEL_DIR -> HF directory; ours: HF directory -> MODEL_DIR")
    parser.add_argument("--model_dir", required=True, help="our run / checkpoint directory")
    parser.add_argument("--hf_dir", required=True, help="HF T5 directory (config.json + weights)")
    parser.add_argument("--step", type=int, default=None, help="--to=hf: step (default latest)")
    parser.add_argument("--model_name", default=None,
                        help="--to=hf: architecture name when MODEL_DIR does not record it")
    parser.add_argument("--vocab", default=None,
                        help="--to=hf: SentencePiece model to ship when MODEL_DIR records none")
    parser.add_argument("--overwrite", action="store_true",
                        help="--to=hf: write into a non-empty --hf_dir")
    args = parser.parse_args(argv)
    from sbs_jax.train import convert

    try:
        if args.to == "hf":
            config = convert.export_to_hf(args.model_dir, args.hf_dir, args.step,
                                          args.model_name, args.vocab, args.overwrite)
            target = args.hf_dir
        else:
            config = convert.import_from_hf(args.hf_dir, args.model_dir)
            target = args.model_dir
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"sbs-convert: error: {e}", file=sys.stderr)
        return 2
    from sbs_jax.runtime import console

    console.say(f"wrote {target}: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
