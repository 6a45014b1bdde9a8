"""The flags `sbs-eval` and `sbs-infer` share: a training run's MODEL_DIR (or its gin files)
-> the run's RunConfig, its data and vocabulary, and its trained model on the run's mesh.

Setup errors exit 2 with the setting named.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sbs_jax.runtime import gin_utils
from sbs_jax.train import run_config, run_files

BASE_GIN = "gin/base.gin"


def build_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The shared flags; `doc` (the CLI's docstring) gives the description and the epilog."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=doc.split("\n\n", 1)[1])
    parser.add_argument("--model_dir", default=None,
                        help="the training run's MODEL_DIR: configures everything (no --gin_file "
                             "needed)")
    gin_utils.add_gin_flags(parser)
    parser.add_argument("--split", default="valid", help="split of the label task (valid, test)")
    parser.add_argument("--step", default="best",
                        help="checkpoint: 'best' (by the saved eval metric; the latest when "
                             "none was saved), 'latest' or a step number")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="decode batch (default: the run's eval batch size)")
    parser.add_argument("--max_examples", type=int, default=None,
                        help="score only the first N examples (sorted by id)")
    return parser


def parse_run_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                    ) -> tuple[argparse.Namespace, run_config.RunConfig]:
    """Flags -> (args, the run's RunConfig). Gin files (or gin/base.gin under --model_dir), then
    MODEL_DIR/run_config.json, then the command line's bindings; setup errors exit 2."""
    args, shorthand = gin_utils.parse_flags(parser, argv)
    if not args.model_dir and not args.gin_file:
        parser.error("pass --model_dir=DIR (a training run's folder), or the run's --gin_file "
                     "flags and --gin.MODEL_DIR")
    if args.model_dir and any(b.split("=")[0].strip() == "MODEL_DIR" for b in shorthand):
        parser.error("--model_dir and --gin.MODEL_DIR both name the run; keep one")
    files = args.gin_file or [BASE_GIN]
    ours = [f"MODEL_DIR = {args.model_dir!r}"] if args.model_dir else []

    def resolve(run_bindings: list[str]) -> run_config.RunConfig:
        try:
            gin_utils.parse_gin(files, [*ours, *run_bindings, *args.gin_bindings],
                                args.gin_search_paths, shorthand)
            return run_config.from_gin()
        except (ValueError, TypeError) as exc:
            gin_utils.fail(parser, exc)

    from_flags = resolve([])
    try:
        run_bindings = run_files.run_bindings(from_flags.model_dir,
                                              identity_only=bool(args.gin_file))
    except (ValueError, OSError) as exc:
        gin_utils.fail(parser, exc)
    if args.model_dir and not run_bindings:
        gin_utils.fail(parser, f"--model_dir={args.model_dir}: no {run_config.CONFIG_FILE} "
                               "there; not a training run's MODEL_DIR (or pass the run's "
                               "--gin_file flags)")
    cfg = resolve(run_bindings)
    from sbs_jax.runtime import console

    if args.gin_file:
        gin_says = from_flags.to_json()
        for key, value in sorted(cfg.to_json().items()):
            if value != gin_says[key]:
                console.say(f"{parser.prog}: {run_config.setting_name(key)}={value!r} from "
                            f"{cfg.model_dir}/{run_config.CONFIG_FILE} (the gin files say "
                            f"{gin_says[key]!r}; a command-line binding chooses)",
                            file=sys.stderr)
    return args, cfg


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                command: Callable[[argparse.ArgumentParser, argparse.Namespace,
                                   run_config.RunConfig], int]) -> int:
    """Parses the flags, then returns `command(parser, args, cfg)`, run with the tasks reading
    the run's data folder and vocabulary (the task settings are restored afterwards)."""
    args, cfg = parse_run_flags(parser, argv)
    from tasks import config as tasks_config

    with tasks_config.overrides_restored():
        use_run_data(parser, cfg)
        return command(parser, args, cfg)


def use_run_data(parser: argparse.ArgumentParser, cfg: run_config.RunConfig) -> None:
    """Points the tasks at the run's vocabulary and data folder (inside
    `tasks.config.overrides_restored()`); a conflicting vocabulary exits 2 naming both."""
    from sbs_jax.runtime import console

    try:
        for note in run_files.use_run_data(cfg.model_dir):
            console.say(f"{parser.prog}: {note}", file=sys.stderr)
    except ValueError as exc:
        gin_utils.fail(parser, exc)


def choose_step(parser: argparse.ArgumentParser, args: argparse.Namespace,
                cfg: run_config.RunConfig) -> int:
    """The checkpoint step --step names, from the run's files alone (nothing loaded); none there
    exits 2 naming MODEL_DIR. Joins the multi-process job first (reading steps asks JAX which
    process this is)."""
    from sbs_jax.infer import evaluation
    from sbs_jax.runtime import distributed

    distributed.initialize_from_env()
    try:
        return evaluation.choose_step(cfg.model_dir, args.step, cfg.best_metric)
    except (ValueError, FileNotFoundError) as exc:
        gin_utils.fail(parser, exc)


def load_model(parser: argparse.ArgumentParser, args: argparse.Namespace,
               cfg: run_config.RunConfig, step: int | None = None):
    """(step, T5Config, params on the run's mesh, the mesh, its axis rules) for the flags (or
    for `step`, already chosen); setup errors exit 2 naming them."""
    from sbs_jax.infer import evaluation
    from sbs_jax.runtime import distributed

    distributed.initialize_from_env()
    try:
        return evaluation.load_for_decoding(cfg, args.step if step is None else step)
    except (ValueError, FileNotFoundError) as exc:
        gin_utils.fail(parser, exc)
