"""`sbs-teacher-beam` (`python -m sbs_jax.teacher.beam_job`): the teacher job on Apache Beam
(see sbs_jax.teacher.beam_job); `sbs-teacher`'s flags, then `--` and Beam's pipeline options.
"""

from __future__ import annotations

import json
import sys

from sbs_jax.cli import teacher
from sbs_jax.teacher import beam_job


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split_at = argv.index("--") if "--" in argv else len(argv)
    parser = teacher.build_parser()
    parser.prog = "python -m sbs_jax.teacher.beam_job"
    parser.description = beam_job.__doc__
    args = parser.parse_args(argv[:split_at])
    if args.dry_run:
        return teacher.run(args)
    if not args.output_dir:
        parser.error("--output_dir is required")
    try:
        stats = beam_job.run(args, argv[split_at + 1:])
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"sbs-teacher-beam: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in stats.items() if k != "failures"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
