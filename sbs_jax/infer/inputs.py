"""What `sbs-infer` decodes: the label task's examples of a split or of an --input_file, the
rationale task's examples of the same ids, and which inputs were cut to the input cap.

Inputs from a file go through the label task's own preprocessors (prefix, NLI separator,
tokenizer, EOS), so they are formatted exactly as in training; `input` texts come from the
records, never from decoded tokens (NLI inputs hold EOS as a separator).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from etils import epath

# isort: split
# First, so TF loads quietly and with GPUs hidden before seqio imports it.
from sbs_jax.runtime.tf_setup import tf

# isort: split
from sbs_jax.data import dss, pipeline, records
from sbs_jax.infer import evaluation
from sbs_jax.train.run_config import RunConfig

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class InputFileError(ValueError):
    """A malformed --input_file record; the message names the file and line."""


def rationale_task_for(label_task: str, rationale_mixture: str | None) -> str:
    """RATIONALE_MIXTURE_NAME, else the dataset's `{ds}_rationale` task."""
    if rationale_mixture:
        return rationale_mixture
    return label_task.split("_")[0] + "_rationale"


def _jsonl_input(path: str, line_no: int, line: str) -> tuple[str | None, str]:
    """(id or None, record input text) of one JSONL line."""
    where = f"--input_file {path}:{line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise InputFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "input" in record:
        text = record["input"]
    elif "premise" in record and "hypothesis" in record:
        if not all(isinstance(record[k], str) for k in ("premise", "hypothesis")):
            raise InputFileError(f"{where}: 'premise' and 'hypothesis' must be strings")
        text = dss.join_nli_input(record["premise"], record["hypothesis"])
    else:
        raise InputFileError(f"{where}: no 'input' field (or 'premise' and 'hypothesis'); "
                             f"fields: {sorted(record)}")
    if not isinstance(text, str) or not text.strip():
        raise InputFileError(f"{where}: 'input' must be a non-empty string, got {text!r}")
    example_id = record.get("id")
    if example_id is not None and not isinstance(example_id, (str, int)):
        raise InputFileError(f"{where}: 'id' must be a string or an integer, got {example_id!r}")
    return (None if example_id is None else str(example_id)), text


def _lines(path: str) -> list[str]:
    """The file's lines, split at "\n" only (a trailing "\r" dropped), each decoded as UTF-8."""
    file = epath.Path(path)
    if not file.exists():
        raise FileNotFoundError(f"--input_file {path}: no such file")
    lines = []
    for line_no, raw in enumerate(file.read_bytes().split(b"\n"), start=1):
        try:
            lines.append(raw.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputFileError(f"--input_file {path}:{line_no}: not UTF-8 (byte "
                                 f"{raw[exc.start]:#04x} at column {exc.start + 1})") from None
    return lines


def read_inputs(path: str) -> list[tuple[str, str]]:
    """(id, record input text) per input of a JSONL or plain-text file, in file order."""
    is_jsonl = path.lower().endswith(JSONL_SUFFIXES)
    inputs: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        example_id, text = _jsonl_input(path, line_no, line) if is_jsonl else (None, line)
        example_id = str(line_no) if example_id is None else example_id
        if example_id in first_line:
            raise InputFileError(f"--input_file {path}:{line_no}: id {example_id!r} repeats "
                                 f"line {first_line[example_id]}")
        first_line[example_id] = line_no
        inputs.append((example_id, text))
    if not inputs:
        raise InputFileError(f"--input_file {path}: no inputs in the file")
    return inputs


def input_set(task_name: str, inputs: Sequence[tuple[str, str]], input_cap: int,
              target_cap: int = 8):
    """An EvalSet of `inputs` (no targets) made by the task's own preprocessors, in order."""
    tasks = pipeline.task_list(task_name)
    if len(tasks) != 1:
        raise ValueError(f"infer needs one task; {task_name!r} has {len(tasks)}")
    task = tasks[0]
    columns = {name: [""] * len(inputs) for name in records.tf_feature_spec()}
    columns.update(id=[i for i, _ in inputs], input=[t for _, t in inputs],
                   source=["input_file"] * len(inputs), split=["test"] * len(inputs))
    dataset = task.preprocess_postcache(
        task.preprocess_precache(tf.data.Dataset.from_tensor_slices(columns)),
        {"inputs": input_cap, "targets": target_cap})
    examples = list(dataset.as_numpy_iterator())
    return pipeline.EvalSet(
        task_name=task.name, ids=[ex["id"].decode("utf-8") for ex in examples],
        inputs=[np.asarray(ex["inputs"], np.int32) for ex in examples],
        inputs_text=[ex["inputs_pretokenized"].decode("utf-8") for ex in examples],
        targets=[""] * len(examples), vocabulary=task.output_features["targets"].vocabulary,
        postprocess_fn=task.postprocess_fn)


def split_rationale_set(task: str, split: str, examples, input_cap: int, target_cap: int,
                         use_cached: bool = False):
    """The rationale task's examples of `split` aligned row by row with `examples` by id."""
    pipeline.check_task(task, "RATIONALE_MIXTURE_NAME")
    explain = pipeline.eval_set(task, split, input_cap, target_cap, use_cached)
    by_id = {example_id: row for row, example_id in enumerate(explain.ids)}
    missing = [i for i in examples.ids if i not in by_id]
    if missing:
        raise ValueError(f"{task!r} lacks ids {missing[:3]} of {examples.task_name!r}")
    return evaluation.subset_rows(explain, [by_id[i] for i in examples.ids])


UNCAPPED = 1 << 20  # an input cap nothing reaches: the tokens before any cut


def truncated_rows(examples, load_uncapped, input_cap: int) -> list[int]:
    """Rows whose inputs were cut to `input_cap`: read again uncapped (only when some row has
    reached the cap) and compared by length."""
    if all(len(tokens) < input_cap for tokens in examples.inputs):
        return []
    whole = load_uncapped()
    by_id = {example_id: len(tokens) for example_id, tokens in zip(whole.ids, whole.inputs)}
    return [row for row, (example_id, tokens) in enumerate(zip(examples.ids, examples.inputs))
            if by_id[example_id] > len(tokens)]


def read_examples(cfg: RunConfig, input_file: str | None, split: str,
                  max_examples: int | None, output_rationale: bool):
    """(label EvalSet, rationale EvalSet or None, truncated rows of each) for --input_file or
    --split."""
    lengths = cfg.task_feature_lengths
    cap = lengths["inputs"]
    rationale_len = lengths.get("rationale_targets", lengths["targets"])
    rationale_task = rationale_task_for(cfg.mixture_or_task_name, cfg.rationale_mixture_name)
    explain, explain_truncated = None, []
    if input_file:
        inputs = read_inputs(input_file)[: max_examples]
        examples = input_set(cfg.mixture_or_task_name, inputs, cap)
        truncated = truncated_rows(
            examples, lambda: input_set(cfg.mixture_or_task_name, inputs, UNCAPPED), cap)
        if output_rationale:
            pipeline.check_task(rationale_task, "RATIONALE_MIXTURE_NAME")
            explain = input_set(rationale_task, inputs, cap)
            explain_truncated = truncated_rows(
                explain, lambda: input_set(rationale_task, inputs, UNCAPPED), cap)
    else:
        cached = cfg.use_cached_tasks
        examples = evaluation.subset(
            pipeline.eval_set(cfg.mixture_or_task_name, split, cap, lengths["targets"],
                              cached), max_examples)
        truncated = truncated_rows(examples, lambda: pipeline.eval_set(
            cfg.mixture_or_task_name, split, UNCAPPED, lengths["targets"], cached), cap)
        if output_rationale:
            explain = split_rationale_set(rationale_task, split, examples, cap,
                                           rationale_len, cached)
            explain_truncated = truncated_rows(explain, lambda: split_rationale_set(
                rationale_task, split, examples, UNCAPPED, rationale_len, cached), cap)
    return examples, explain, truncated, explain_truncated


def truncation_warning(prog: str, cap: int, ids: Sequence[str],
                       cuts: Sequence[tuple[str, list[int], str]]) -> str:
    """One warning for every kind of input cut to the cap; `cuts` holds (what, rows, the key
    their lines carry)."""
    counted = " and ".join(f"{len(rows)} of {len(ids)} {what}" for what, rows, _ in cuts)
    firsts = "; ".join(("first" if what == "inputs" else f"first {what[:-1]}")
                       + f": id {ids[rows[0]]!r}" for what, rows, _ in cuts)
    marks = " and ".join(f'"{key}": true' for _, _, key in cuts)
    return (f"{prog}: warning: {counted} are longer than the {cap}-token input cap "
            f"(TASK_FEATURE_LENGTHS['inputs']) and were cut to it, as in training ({firsts}); "
            f"their lines say {marks}")
