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

from sbs_jax.cli import run_flags
from sbs_jax.runtime import gin_utils, malloc
from sbs_jax.train import run_config


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # from the command line: choose the C allocator before XLA loads
        malloc.ensure_preloaded()
    parser = run_flags.build_parser("sbs-eval", __doc__)
    parser.add_argument("--output", default=None,
                        help="metrics JSON path (default: MODEL_DIR/eval_<task>_<split>_step<N>"
                             ".json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the metrics file if it exists (refused otherwise)")
    return run_flags.run_command(parser, argv, _evaluate)


def _evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace,
              cfg: run_config.RunConfig) -> int:
    import jax
    from etils import epath

    from sbs_jax.data import pipeline
    from sbs_jax.infer import evaluation
    from sbs_jax.runtime import console

    # The output is refused before the checkpoint is loaded onto the mesh; the default path
    # names the step, so that step is chosen first (from the run's files alone).
    step = None if args.output else run_flags.choose_step(parser, args, cfg)
    output = epath.Path(args.output or f"{cfg.model_dir}/eval_{cfg.mixture_or_task_name}_"
                                       f"{args.split}_step{step}.json")
    if output.exists() and not args.overwrite:
        gin_utils.fail(parser, f"{output} exists (an earlier eval); pass --overwrite to "
                               "replace it, or --output=PATH")
    step, config, params, mesh, rules = run_flags.load_model(parser, args, cfg, step)
    try:
        examples = evaluation.subset(
            pipeline.eval_set(cfg.mixture_or_task_name, args.split,
                              cfg.task_feature_lengths["inputs"],
                              cfg.task_feature_lengths["targets"], cfg.use_cached_tasks),
            args.max_examples)
    except (ValueError, FileNotFoundError) as exc:
        gin_utils.fail(parser, exc)
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
