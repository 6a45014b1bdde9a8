"""`python -m sbs_jax.teacher` / `sbs-teacher`: label inputs with a teacher LLM, exactly once.

Few-shot chain-of-thought prompts (tasks/prompts/{dataset}.txt) go to the teacher; each
completion is parsed into a rationale and a label and written as TFRecord shards in the schema the
SeqIO tasks read, plus stats.json. Re-running with the same arguments resumes: only examples
that were never committed are asked again (and those whose retries ran out).

Examples:
  sbs-teacher --dataset synthetic --input synthetic:2000 --output_dir teacher_data/synthetic
  OPENAI_API_KEY=... sbs-teacher --dataset cqa --input cqa_train.jsonl --backend openai \\
      --base_url https://api.example.com/v1 --model some-model --api_key_env OPENAI_API_KEY \\
      --output_dir teacher_data/cqa --concurrency 64 --requests_per_minute 3000
  sbs-teacher --dataset svamp --input inputs.jsonl --backend local --model /ckpt/flan_t5 \\
      --vocab /ckpt/flan_t5/spiece.model --output_dir teacher_data/svamp

Exit status: 0 when the job finished (failed examples are listed in stats.json), 2 when it
could not run (bad arguments or input, missing key, teacher unreachable or refusing the job),
130 when SIGTERM/SIGINT stopped it (what was done is committed; re-run to resume).
The API key is read only from the environment variable named by --api_key_env.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys

from sbs_jax.data.parse import DATASETS
from sbs_jax.runtime import console
from sbs_jax.teacher import backends
from sbs_jax.teacher.http_backend import STARTUP_CONNECT_S

log = logging.getLogger("sbs_jax.teacher")
BACKENDS = ("openai", "local", "rules")


def _bounded(kind: type, low: float, inclusive: bool = True):
    """An argparse type: a `kind` number >= low (> low when not inclusive); argparse names the
    flag in the error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if math.isnan(value) or (value < low if inclusive else value <= low):
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value

    return parse


COUNT = _bounded(int, 1)  # at least one
NON_NEGATIVE_INT = _bounded(int, 0)
POSITIVE = _bounded(float, 0, inclusive=False)
NON_NEGATIVE = _bounded(float, 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbs-teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="JSONL of {id, input, label?}, a .tfrecord shard or folder of shards, a "
                        "released-data folder, or synthetic:N[:SEED]")
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="which prompt set and completion parser to use")
    p.add_argument("--split", default="train", help="split to read and to name shards by")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="teacher backend (default: rules for synthetic, else openai)")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible server, e.g. "
                   "http://localhost:8000/v1")
    p.add_argument("--model", default=None, help="model name (openai) or checkpoint / HF "
                   "directory (local)")
    p.add_argument("--api_key_env", default=None,
                   help="NAME of the environment variable holding the API key")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--output_dir", default=None,
                   help="where shards, ledgers and stats.json go: a folder of its own, e.g. "
                        "teacher_data/DATASET (never a built dataset folder)")
    p.add_argument("--concurrency", type=COUNT, default=16, help="requests in flight")
    p.add_argument("--max_retries", type=NON_NEGATIVE_INT, default=5)
    p.add_argument("--timeout_s", type=POSITIVE, default=60.0, help="per request, in total")
    p.add_argument("--startup_connect_s", type=POSITIVE, default=STARTUP_CONNECT_S,
                   help="stop when connecting fails this long before the server ever answered")
    p.add_argument("--num_samples", type=COUNT, default=1,
                   help="completions per input; the label is the majority vote")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=None,
                   help="default 0 for one sample, 0.7 for several")
    p.add_argument("--max_tokens", type=COUNT, default=256)
    p.add_argument("--stop", action="append", default=None,
                   help="stop sequence (repeatable; default a blank line)")
    p.add_argument("--requests_per_minute", type=POSITIVE, default=None)
    p.add_argument("--tokens_per_minute", type=POSITIVE, default=None)
    p.add_argument("--backoff_base_s", type=NON_NEGATIVE, default=1.0)
    p.add_argument("--backoff_max_s", type=NON_NEGATIVE, default=60.0)
    p.add_argument("--limit", type=NON_NEGATIVE_INT, default=None, help="only the first N inputs")
    p.add_argument("--dry_run", action="store_true",
                   help="print one rendered prompt and exit without asking the teacher")
    p.add_argument("--shard_size", type=COUNT, default=1000, help="examples per commit")
    p.add_argument("--commit_every_s", type=POSITIVE, default=60.0,
                   help="commit at least this often")
    p.add_argument("--max_consecutive_failures", type=COUNT, default=100,
                   help="stop when this many examples in a row fail (teacher down)")
    p.add_argument("--prompt_cost_per_1k", type=NON_NEGATIVE, default=0.0,
                   help="price per 1,000 prompt tokens, for the cost estimate")
    p.add_argument("--completion_cost_per_1k", type=NON_NEGATIVE, default=0.0)
    p.add_argument("--prompts_dir", default=None, help="folder of {dataset}.txt prompt files")
    p.add_argument("--vocab", default=None, help="local backend: SentencePiece model")
    p.add_argument("--batch_size", type=COUNT, default=32, help="local backend: decode batch")
    p.add_argument("--log_level", default="INFO")
    return p


def run(args: argparse.Namespace) -> int:
    from sbs_jax.teacher import job
    from sbs_jax.teacher.http_backend import TeacherUnavailable, redact
    from sbs_jax.teacher.inputs import read_inputs
    from sbs_jax.teacher.prompts import load_prompt

    api_key = None
    try:
        if args.backend is None:
            args.backend = "rules" if args.dataset == "synthetic" else "openai"
        if args.temperature is None:
            args.temperature = 0.0 if args.num_samples == 1 else 0.7
        if args.stop is None:
            args.stop = ["\n\n"]
        prompt = load_prompt(args.dataset, args.prompts_dir)
        examples = read_inputs(args.input, args.dataset, args.split)
        if args.limit is not None:
            examples = examples[: args.limit]
        if args.dry_run:
            if not examples:
                raise ValueError(f"--input {args.input!r} holds no examples")
            print(prompt.render(examples[0].prompt_fields(args.dataset)))
            return 0
        if not args.output_dir:
            raise ValueError("--output_dir is required (except with --dry_run)")
        api_key = backends.api_key(args.api_key_env)
        backend = backends.make_backend(args, api_key)
        options = job.JobOptions(
            dataset=args.dataset, split=args.split, output_dir=args.output_dir,
            teacher=args.model or args.backend, num_samples=args.num_samples,
            concurrency=args.concurrency if args.backend != "local" else args.batch_size,
            shard_size=args.shard_size, commit_every_s=args.commit_every_s,
            max_consecutive_failures=args.max_consecutive_failures,
            prompt_cost_per_1k=args.prompt_cost_per_1k,
            completion_cost_per_1k=args.completion_cost_per_1k)
        settings = {"input": args.input, "dataset": args.dataset, "split": args.split,
                    "backend": args.backend, "model": args.model, "endpoint": args.endpoint,
                    "num_samples": args.num_samples}
        stats = asyncio.run(job.run_job(examples, backend, prompt, options, settings))
    except job.JobInterrupted as exc:
        console.say(f"sbs-teacher: {exc}; re-run the same command to resume", file=sys.stderr)
        return 130
    except (TeacherUnavailable, ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"sbs-teacher: error: {redact(str(exc), api_key)}", file=sys.stderr)
        return 2
    log.info("done: %d records, %d failed (%d parse failures) of %d examples; stats in %s",
             stats["records"], stats["failed"], stats["parse_failures"], stats["examples"],
             os.path.join(args.output_dir, "stats.json"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(console.LogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpcore2").setLevel(logging.WARNING)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
