"""Write predictions JSONL for a task split or for your own inputs.

    python -m sbs_jax.infer --model_dir=/tmp/run --split=test --output=/tmp/preds.jsonl \
        --output_rationale
    python -m sbs_jax.infer --model_dir=/tmp/run --input_file=questions.jsonl \
        --output=/tmp/preds.jsonl

--model_dir configures the job from the run itself (tasks, vocabulary, caps, data folder), as
for sbs-eval; the run's --gin_file flags work too.

Each line is `{"id", "input", "target", "prediction", "answer"[, "rationale"]}` (no `target`
for --input_file): `prediction` is the decoded text, `answer` what the task's metric compares
after its postprocessor (the label at the end of a single-task output, for instance). The label
is decoded from `predict:` inputs; `--output_rationale` also decodes the rationale from the
rationale task's `explain:` inputs of the same examples (like the reference's
--output_rationale). `input` is the task's input text with its prefix (never decoded tokens: NLI
inputs hold EOS as a separator). --input_file takes JSONL (`.jsonl`/`.json`/`.ndjson`: one object
a line with `input`, or `premise` and `hypothesis` for NLI, and optionally `id`) or plain text
(any other name: one input a line; blank lines skipped; ids are line numbers); lines end at
"\n" only (a U+2028 inside a JSON string is text) and must be UTF-8. The inputs go through the
label task's own preprocessors (prefix, NLI separator, tokenizer, EOS), so they are formatted
exactly as in training. Inputs longer than TASK_FEATURE_LENGTHS["inputs"] are cut to it as in
training: one warning says how many, and their lines carry `"truncated": true` (label input) or
`"rationale_truncated": true` (the `explain:` input of --output_rationale).
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
    parser = run_flags.build_parser("sbs-infer", __doc__)
    parser.add_argument("--output", required=True, help="predictions JSONL path")
    parser.add_argument("--output_rationale", action="store_true",
                        help="also decode each input's rationale (explain: prefix)")
    parser.add_argument("--input_file", default=None,
                        help="predict these inputs instead of --split: JSONL (.jsonl/.json/"
                             ".ndjson; 'input' or 'premise'+'hypothesis', optional 'id') or "
                             "plain text, one input a line")
    return run_flags.run_command(parser, argv, _infer)


def _infer(parser: argparse.ArgumentParser, args: argparse.Namespace,
           cfg: run_config.RunConfig) -> int:
    import jax
    from etils import epath

    from sbs_jax.data import packing
    from sbs_jax.infer import evaluation, inputs
    from sbs_jax.runtime import console

    step, config, params, mesh, rules = run_flags.load_model(parser, args, cfg)
    try:
        examples, explain, truncated, explain_truncated = inputs.read_examples(
            cfg, args.input_file, args.split, args.max_examples, args.output_rationale)
    except (ValueError, FileNotFoundError) as exc:
        gin_utils.fail(parser, exc)
    cap = cfg.task_feature_lengths["inputs"]
    cuts = [cut for cut in (("inputs", truncated, "truncated"),
                            ("rationale inputs", explain_truncated, "rationale_truncated"))
            if cut[1]]
    if cuts and jax.process_index() == 0:
        console.say(inputs.truncation_warning(parser.prog, cap, examples.ids, cuts),
                    file=sys.stderr)
    batch_size = args.batch_size or cfg.eval_batch_size
    predictions = evaluation.decode_texts(config, params, examples, batch_size,
                                          cfg.max_decode_len, mesh=mesh, axis_rules=rules)
    rationales = None
    if explain is not None:
        rationales = evaluation.decode_texts(
            config, params, explain, batch_size,
            packing.caps(cfg.task_feature_lengths)["rationale_targets"], mesh=mesh,
            axis_rules=rules)
    answers = examples.answers(predictions)
    marked = [(key, set(rows)) for _, rows, key in cuts]
    lines = []
    for row, example_id in enumerate(examples.ids):
        record = {"id": example_id, "input": examples.inputs_text[row]}
        if not args.input_file:
            record["target"] = examples.targets[row]
        record["prediction"] = predictions[row]
        record["answer"] = answers[row]
        if rationales is not None:
            record["rationale"] = rationales[row]
        record.update({key: True for key, rows in marked if row in rows})
        lines.append(json.dumps(record, ensure_ascii=False))
    if jax.process_index() == 0:
        run_config.write_text(epath.Path(args.output), "\n".join(lines) + "\n")
        counts = " and ".join(f"{len(rows)} {what}" for what, rows, _ in cuts)
        cut_note = f"; {counts} truncated to {cap} tokens" if cuts else ""
        console.say(f"{len(lines)} predictions (step {step}) written to {args.output}{cut_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
