"""Evaluate a trained checkpoint: decode a split of the label task, score with its metric_fns.

    python -m sbs_jax.eval --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'/tmp/run'" \
        --split=test --output=/tmp/run/test_metrics.json

Takes the training gin flags, so MODEL_DIR, the label task (MIXTURE_OR_TASK_NAME) and the
feature caps are the run's own. Prints the metrics and writes them as JSON (`accuracy` in
percent, plus `step`, `split`, `num_examples`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sbs_jax import gin_utils, malloc, run_config


def build_parser(prog: str = "sbs-eval", doc: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
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


def load_model(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(RunConfig, step, T5Config, params on the run's mesh, batch sharding) for the flags;
    setup errors exit 2 naming them."""
    from sbs_jax import distributed, evaluation, train_loop

    distributed.initialize_from_env()
    try:
        cfg = run_config.from_gin()
        train_loop.check_task(cfg.mixture_or_task_name, "MIXTURE_OR_TASK_NAME")
        step = evaluation.choose_step(cfg.model_dir, args.step, cfg.best_metric)
        config, params = evaluation.load_trained(cfg.model_dir, step)
        params, batch_sharding = evaluation.place_on_mesh(config, params, cfg.mesh_shape,
                                                          cfg.fsdp)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return cfg, step, config, params, batch_sharding


def load(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """`load_model`'s tuple plus the EvalSet of the label task's split, for the flags."""
    from sbs_jax import evaluation
    from sbs_jax.data import pipeline

    cfg, step, config, params, batch_sharding = load_model(parser, args)
    try:
        examples = evaluation.subset(
            pipeline.eval_set(cfg.mixture_or_task_name, args.split,
                              cfg.task_feature_lengths["inputs"],
                              cfg.task_feature_lengths["targets"]),
            args.max_examples)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return cfg, step, config, params, batch_sharding, examples


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # from the command line: choose the C allocator before XLA loads
        malloc.ensure_preloaded()
    parser = build_parser()
    parser.add_argument("--output", default=None,
                        help="metrics JSON path (default: MODEL_DIR/eval_<split>_step<N>.json)")
    args = gin_utils.parse_gin_flags(parser, argv)
    import jax
    from etils import epath

    from sbs_jax import console, evaluation

    cfg, step, config, params, batch_sharding, examples = load(parser, args)
    metrics, _ = evaluation.evaluate(config, params, examples,
                                     args.batch_size or cfg.eval_batch_size, cfg.max_decode_len,
                                     batch_sharding=batch_sharding)
    result = {**metrics, "step": step, "split": args.split, "task": examples.task_name}
    output = args.output or f"{cfg.model_dir}/eval_{args.split}_step{step}.json"
    if jax.process_index() == 0:
        run_config.write_text(epath.Path(output), json.dumps(result, indent=1) + "\n")
        console.say(f"eval step {step} ({args.split}): {console.format_metrics(metrics)}")
        console.say(f"metrics written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
