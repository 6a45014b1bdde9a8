"""Evaluate a trained checkpoint: decode a split of the label task, score with its metric_fns.

    python -m sbs_jax.eval --model_dir=/tmp/run --split=test
    python -m sbs_jax.eval --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'/tmp/run'" --split=test

MODEL_DIR describes its run (run_config.json, spiece.model, data_config.json), so --model_dir
alone evaluates the run's own task with its vocabulary, caps and data folder; --gin.NAME=VALUE
and --gin_bindings still override (e.g. another task or mesh). With --gin_file flags, what the
run was trained on (tasks, model, caps) still comes from MODEL_DIR unless a command-line binding
names it; each value that differs from the gin files is noted. A vocabulary other than the run's
(SBS_VOCAB, gin) is refused. Prints the metrics and writes them as JSON (`accuracy` in percent,
plus `step`, `split`, `task`, `num_examples`), by default to
MODEL_DIR/eval_<task>_<split>_step<N>.json; an existing file is never replaced unless
--overwrite is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sbs_jax import run_config, run_files
from sbs_jax.runtime import gin_utils, malloc

BASE_GIN = "gin/base.gin"


def build_parser(prog: str = "sbs-eval", doc: str = __doc__) -> argparse.ArgumentParser:
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


def _fail(parser: argparse.ArgumentParser, exc: Exception) -> None:
    parser.exit(2, f"{parser.prog}: error: {exc}\n")


def parse_run_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                    ) -> tuple[argparse.Namespace, run_config.RunConfig]:
    """Flags -> (args, the run's RunConfig). Gin files (or gin/base.gin under --model_dir), then
    MODEL_DIR/run_config.json, then the command line's bindings; setup errors exit 2."""
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, shorthand = gin_utils.split_gin_shorthand(raw)
    except gin_utils.GinConfigError as exc:
        _fail(parser, exc)
    args = parser.parse_args(rest)
    gin_utils.add_seqio_cache_dirs(args.seqio_additional_cache_dirs)
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
            _fail(parser, exc)

    from_flags = resolve([])
    try:
        run_bindings = run_files.run_bindings(from_flags.model_dir,
                                              identity_only=bool(args.gin_file))
    except (ValueError, OSError) as exc:
        _fail(parser, exc)
    if args.model_dir and not run_bindings:
        _fail(parser, f"--model_dir={args.model_dir}: no {run_config.CONFIG_FILE} there; not a "
                      "training run's MODEL_DIR (or pass the run's --gin_file flags)")
    cfg = resolve(run_bindings)
    from sbs_jax.runtime import console

    if args.gin_file:
        for key, value in sorted(cfg.to_json().items()):
            if value != from_flags.to_json()[key]:
                console.say(f"{parser.prog}: {run_config.setting_name(key)}={value!r} from "
                            f"{cfg.model_dir}/{run_config.CONFIG_FILE} (the gin files say "
                            f"{from_flags.to_json()[key]!r}; a command-line binding chooses)",
                            file=sys.stderr)
    return args, cfg


def use_run_data(parser: argparse.ArgumentParser, cfg: run_config.RunConfig) -> None:
    """Points the tasks at the run's vocabulary and data folder (inside
    `tasks.config.overrides_restored()`); a conflicting vocabulary exits 2 naming both."""
    from sbs_jax.runtime import console

    try:
        for note in run_files.use_run_data(cfg.model_dir):
            console.say(f"{parser.prog}: {note}", file=sys.stderr)
    except ValueError as exc:
        _fail(parser, exc)


def load_model(parser: argparse.ArgumentParser, args: argparse.Namespace,
               cfg: run_config.RunConfig):
    """(step, T5Config, params on the run's mesh, the mesh, its axis rules) for the flags; setup
    errors exit 2 naming them."""
    from sbs_jax import evaluation, train_loop
    from sbs_jax.runtime import distributed

    distributed.initialize_from_env()
    try:
        train_loop.check_task(cfg.mixture_or_task_name, "MIXTURE_OR_TASK_NAME")
        step = evaluation.choose_step(cfg.model_dir, args.step, cfg.best_metric)
        config, params = evaluation.load_trained(cfg.model_dir, step)
        params, mesh, rules = evaluation.place_on_mesh(config, params, cfg.mesh_shape, cfg.fsdp)
    except (ValueError, FileNotFoundError) as exc:
        _fail(parser, exc)
    return step, config, params, mesh, rules


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # from the command line: choose the C allocator before XLA loads
        malloc.ensure_preloaded()
    parser = build_parser()
    parser.add_argument("--output", default=None,
                        help="metrics JSON path (default: MODEL_DIR/eval_<task>_<split>_step<N>"
                             ".json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the metrics file if it exists (refused otherwise)")
    args, cfg = parse_run_flags(parser, argv)
    from tasks import config as tasks_config

    with tasks_config.overrides_restored():
        use_run_data(parser, cfg)
        return _evaluate(parser, args, cfg)


def _evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace,
              cfg: run_config.RunConfig) -> int:
    import jax
    from etils import epath

    from sbs_jax import evaluation
    from sbs_jax.data import pipeline
    from sbs_jax.runtime import console

    step, config, params, mesh, rules = load_model(parser, args, cfg)
    output = epath.Path(args.output or f"{cfg.model_dir}/eval_{cfg.mixture_or_task_name}_"
                                       f"{args.split}_step{step}.json")
    if output.exists() and not args.overwrite:
        _fail(parser, f"{output} exists (an earlier eval); pass --overwrite to replace it, or "
                      "--output=PATH")
    try:
        examples = evaluation.subset(
            pipeline.eval_set(cfg.mixture_or_task_name, args.split,
                              cfg.task_feature_lengths["inputs"],
                              cfg.task_feature_lengths["targets"], cfg.use_cached_tasks),
            args.max_examples)
    except (ValueError, FileNotFoundError) as exc:
        _fail(parser, exc)
    metrics, _ = evaluation.evaluate(config, params, examples,
                                     args.batch_size or cfg.eval_batch_size, cfg.max_decode_len,
                                     mesh=mesh, axis_rules=rules)
    result = {**metrics, "step": step, "split": args.split, "task": examples.task_name}
    if jax.process_index() == 0:
        run_config.write_text(output, json.dumps(result, indent=1) + "\n")
        console.say(f"eval step {step} ({args.split}): {console.format_metrics(metrics)}")
        console.say(f"metrics written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
