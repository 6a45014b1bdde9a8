"""The teacher job as an Apache Beam pipeline, for millions of examples.

Same flags, prompts, backends, parsing, voting and record schema as `python -m sbs_jax.teacher`
(see `sbs_jax.cli.teacher`); Beam pipeline options follow a `--` separator. Locally it runs on
the DirectRunner:

    python -m sbs_jax.teacher.beam_job --dataset synthetic --input synthetic:100000 \\
        --output_dir teacher_data/synthetic -- --runner DirectRunner --direct_num_workers 2

On Google Cloud Dataflow (workers need sbs-jax installed, e.g. a custom container; the API key
must be in the workers' environment under the name given by --api_key_env, e.g. from Secret
Manager via the container's entry point; it is read on the worker, never put into the pipeline
graph):

    python -m sbs_jax.teacher.beam_job --dataset cqa --input gs://BUCKET/cqa_train.jsonl \\
        --backend openai --base_url https://HOST/v1 --model MODEL --api_key_env TEACHER_KEY \\
        --concurrency 32 --requests_per_minute 3000 --output_dir gs://BUCKET/teacher_data/cqa -- \\
        --runner DataflowRunner --project PROJECT --region REGION \\
        --temp_location gs://BUCKET/tmp --sdk_container_image IMAGE \\
        --max_num_workers 20 --experiments use_runner_v2

`--concurrency` and the rate limits apply per worker process: divide the server's budget by the
number of workers. Each bundle is sent with bounded concurrency from one event loop per worker.
"""

from __future__ import annotations

import json
import sys

from sbs_jax.cli import teacher


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split_at = argv.index("--") if "--" in argv else len(argv)
    parser = teacher.build_parser()
    parser.prog = "python -m sbs_jax.teacher.beam_job"
    parser.description = __doc__
    args = parser.parse_args(argv[:split_at])
    if args.dry_run:
        return teacher.run(args)
    if not args.output_dir:
        parser.error("--output_dir is required")
    from sbs_jax.teacher import beam_job  # imports apache_beam (the `beam` extra)

    try:
        stats = beam_job.run(args, argv[split_at + 1:])
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"sbs-teacher-beam: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in stats.items() if k != "failures"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
