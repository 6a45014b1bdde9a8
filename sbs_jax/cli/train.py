"""Train a T5 student: `python -m sbs_jax.train --gin_file=gin/sbs_base.gin --gin.MODEL_DIR=...`.

Standard fine-tuning, standard distillation or distilling step-by-step, as the gin files say
(see gin/ and WORKSPACE.md). Re-running the same command resumes from MODEL_DIR's latest
checkpoint. Exit codes: 0 done, 2 bad configuration, 143 stopped by SIGTERM after checkpointing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import gin
from sbs_jax.runtime import gin_utils, malloc
from sbs_jax.train import run_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbs-train", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: sbs-train --gin_file=gin/quickstart.gin "
               "--gin.MODEL_DIR=\"'/tmp/sbs_quickstart'\" --gin.TRAIN_STEPS=200")
    gin_utils.add_gin_flags(parser)
    return parser


def resolve_config(parser: argparse.ArgumentParser) -> run_config.RunConfig:
    """RunConfig from the parsed gin config; a missing or invalid setting exits with code 2."""
    try:
        return run_config.from_gin()
    except (ValueError, TypeError) as exc:
        gin_utils.fail(parser, exc)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # from the command line: choose the C allocator before XLA loads
        malloc.ensure_preloaded()
    parser = build_parser()
    gin_utils.parse_gin_flags(parser, argv)
    from sbs_jax.runtime import distributed

    distributed.initialize_from_env()
    cfg = resolve_config(parser)
    from sbs_jax.runtime import console
    from sbs_jax.train import loop

    try:
        summary = loop.train(cfg, operative_gin=gin.config_str())
    except loop.SetupError as exc:  # each names its setting
        gin_utils.fail(parser, exc)
    except loop.NonFiniteLossError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    console.say(f"done: step {summary['step']}, summary in "
                f"{cfg.model_dir}/{loop.SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
