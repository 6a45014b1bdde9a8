"""The offline end-to-end demo behind the README's first command.

    python -m sbs_jax.quickstart --output_dir runs/quickstart

1. generates the built-in synthetic dataset (3-digit addition; `sbs_jax.data.synthetic`),
2. trains a SentencePiece vocabulary on it (nothing is downloaded),
3. runs the teacher job on every split (`python -m sbs_jax.teacher`, the rule-based teacher by
   default; `--teacher_backend openai --base_url ...` or `local` when configured), which writes
   the TFRecords that the SeqIO label and rationale tasks read,
4. trains a tiny T5 twice on the same examples for the same number of steps, with distilling
   step-by-step and with standard fine-tuning (`python -m sbs_jax.train`, gin/quickstart.gin),
5. evaluates both on the held-out test problems (`python -m sbs_jax.eval`),
6. prints a comparison table and writes it, a PNG plot and `quickstart_results.json` under
   `--output_dir`.
Re-running the same command resumes: finished steps are not repeated.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sbs-quickstart", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="run folder (data, models, report)")
    parser.add_argument("--train_steps", type=int, default=2000,
                        help="steps of each training run (default 2000: step-by-step may need "
                             "1000-1500 before it learns the carries)")
    parser.add_argument("--num_train", type=int, default=1000,
                        help="training problems (default 1000: with 2000 fine-tuning also learns "
                             "the carries on some seeds)")
    parser.add_argument("--num_valid", type=int, default=200, help="validation problems (default 200)")
    parser.add_argument("--num_test", type=int, default=500, help="held-out test problems (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    parser.add_argument("--eval_period", type=int, default=0,
                        help="also decode the validation split every N steps (0: only the "
                             "final test evaluation)")
    parser.add_argument("--gin_file", action="append", default=None,
                        help="training config(s) instead of gin/quickstart.gin")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="extra gin bindings for both runs, e.g. BATCH_SIZE=32")
    parser.add_argument("--teacher_backend", choices=("rules", "openai", "local"),
                        default="rules", help="who writes labels and rationales (default: rules, offline)")
    parser.add_argument("--base_url", help="OpenAI-compatible server (openai backend)")
    parser.add_argument("--teacher_model", help="teacher model name or local checkpoint path")
    parser.add_argument("--api_key_env", help="environment variable holding the API key")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sbs_jax.experiments import quickstart

    return quickstart.run(args)


if __name__ == "__main__":
    sys.exit(main())
