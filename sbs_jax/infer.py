"""Write predictions JSONL for a split: `{"id", "input", "target", "prediction"[, "rationale"]}`.

    python -m sbs_jax.infer --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'/tmp/run'" \
        --split=test --output=/tmp/preds.jsonl --output_rationale

The label is decoded from `predict:` inputs; `--output_rationale` also decodes the rationale from
the rationale task's `explain:` inputs of the same ids (like the reference's --output_rationale).
`input` is the record's text (never decoded tokens: NLI inputs hold EOS as a separator).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from sbs_jax import eval as eval_cli
from sbs_jax import gin_utils


def rationale_task_for(label_task: str, rationale_mixture: str | None) -> str:
    """RATIONALE_MIXTURE_NAME, else the dataset's `{ds}_rationale` task."""
    if rationale_mixture:
        return rationale_mixture
    return label_task.split("_")[0] + "_rationale"


def main(argv: Sequence[str] | None = None) -> int:
    parser = eval_cli.build_parser("sbs-infer", __doc__)
    parser.add_argument("--output", required=True, help="predictions JSONL path")
    parser.add_argument("--output_rationale", action="store_true",
                        help="also decode each input's rationale (explain: prefix)")
    args = gin_utils.parse_gin_flags(parser, argv)
    import jax
    from etils import epath

    from sbs_jax import evaluation, run_config, train_loop
    from sbs_jax.data import pipeline

    cfg, step, config, params, examples = eval_cli.load(parser, args)
    batch_size = args.batch_size or cfg.eval_batch_size
    predictions = evaluation.decode_texts(config, params, examples, batch_size,
                                          cfg.max_decode_len)
    rationales = None
    if args.output_rationale:
        task = rationale_task_for(cfg.mixture_or_task_name, cfg.rationale_mixture_name)
        try:
            train_loop.check_task(task, "RATIONALE_MIXTURE_NAME")
            explain = pipeline.eval_set(
                task, args.split, cfg.task_feature_lengths["inputs"],
                cfg.task_feature_lengths.get("rationale_targets",
                                             cfg.task_feature_lengths["targets"]))
        except (ValueError, FileNotFoundError) as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
        by_id = dict(zip(explain.ids, range(len(explain.ids))))
        missing = [i for i in examples.ids if i not in by_id]
        if missing:
            parser.exit(2, f"{parser.prog}: error: {task!r} lacks ids {missing[:3]} of "
                           f"{cfg.mixture_or_task_name!r}\n")
        rows = [by_id[i] for i in examples.ids]
        explain = evaluation.subset_rows(explain, rows)
        rationales = evaluation.decode_texts(config, params, explain, batch_size,
                                             cfg.task_feature_lengths.get(
                                                 "rationale_targets",
                                                 cfg.task_feature_lengths["targets"]))
    lines = []
    for row, example_id in enumerate(examples.ids):
        record = {"id": example_id, "input": examples.inputs_text[row],
                  "target": examples.targets[row], "prediction": predictions[row]}
        if rationales is not None:
            record["rationale"] = rationales[row]
        lines.append(json.dumps(record, ensure_ascii=False))
    if jax.process_index() == 0:
        run_config.write_text(epath.Path(args.output), "\n".join(lines) + "\n")
        print(f"{len(lines)} predictions (step {step}) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
