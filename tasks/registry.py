"""Registers the sbs SeqIO tasks and mixtures for every dataset.

Per dataset `ds` (esnli, anli1, cqa, svamp, synthetic):
- `{ds}_label_gt`, `{ds}_label_llm`: `predict: <input>` -> gold label / on train the teacher's
  label (valid and test keep gold labels in both).
- `{ds}_rationale`: `explain: <input>` -> the teacher's rationale.
- `{ds}_standard_gt`, `{ds}_standard_llm`: `<input>` (no prefix) -> label, for standard
  fine-tuning / standard distillation.
- `{ds}_single_task` (teacher labels on train) and `{ds}_single_task_gt` (gold labels):
  `<input>` (no prefix) -> `<rationale> So the answer is <label>.`, the paper's single-task
  baseline; the postprocessor extracts the label, so metrics compare it with the gold label.
- `{ds}_label_mixture` (= `{ds}_label_gt`) and `{ds}_rationale_mixture` (= `{ds}_rationale`):
  separate mixtures, because the trainer builds each step's label and rationale batches from the
  same examples (sbs_jax.data.pipeline) instead of sampling one mixed stream. For step-by-step
  distillation with teacher labels name `{ds}_label_llm` as MIXTURE_OR_TASK_NAME.
Every example carries `id`, `source`, `inputs`, `targets` and `*_pretokenized`.
"""

from __future__ import annotations

import functools

import seqio

from sbs_jax.data.parse import ANSWER_MARKER, DATASETS, parse_completion
from sbs_jax.infer import metrics
from tasks import config, preprocessors
from tasks.sources import RecordSource

LABEL_PREFIX = "predict: "
RATIONALE_PREFIX = "explain: "
# What each registered name yields, one line (`python -m tasks --list`).
DESCRIPTIONS: dict[str, str] = {}
_LABELS = {False: "gold label", True: "teacher label on train, gold on valid/test"}


def round_trip_targets(output: str, example=None, is_target: bool = False, *, vocabulary):
    """Targets pass through the tokenizer (encode, decode) so accuracy compares like with like:
    a vocabulary that normalises text would otherwise make exact match impossible."""
    del example
    if is_target:
        return vocabulary.decode(vocabulary.encode(output))
    return output


def extract_single_task_label(output: str, example=None, is_target: bool = False, *,
                              vocabulary) -> str:
    """The label of a single-task text `<rationale> So the answer is <label>.` ("" if none).

    Read with the parser of that completion format (the rule-based teacher's), whatever the
    dataset. Targets are round-tripped through the tokenizer first, as for the label tasks; a
    target without the answer marker is an error (every target is built with it), a prediction
    without a label scores as wrong.
    """
    text = round_trip_targets(output, example, is_target, vocabulary=vocabulary)
    if is_target and ANSWER_MARKER not in text:
        raise ValueError(f"single-task target without '... So the answer is <label>.': {text!r}")
    return parse_completion("synthetic", text).label or ""


def _output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary, add_eos=True, required=True),
    }


def _add_task(name: str, description: str, source, first_step, vocabulary, metric_fns,
              postprocess_fn=round_trip_targets) -> None:
    DESCRIPTIONS[name] = description
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[first_step, preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features=_output_features(vocabulary),
        postprocess_fn=functools.partial(postprocess_fn, vocabulary=vocabulary)
        if metric_fns else None,
        metric_fns=metric_fns,
    )


def _add_mixture(name: str, tasks: list[str]) -> None:
    DESCRIPTIONS[name] = "the same as " + ", ".join(tasks)
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, tasks, default_rate=1.0)


def register_dataset(dataset: str) -> None:
    """Registers (or re-registers: idempotent) the tasks and mixtures of one dataset."""
    vocabulary = config.ConfiguredVocabulary(for_synthetic=dataset == "synthetic")
    source = RecordSource(dataset)
    label_metric = metrics.arithmetic_accuracy if dataset == "svamp" else metrics.accuracy
    for variant, teacher_labels in (("gt", False), ("llm", True)):
        _add_task(f"{dataset}_label_{variant}",
                  f"'{LABEL_PREFIX}<input>' -> {_LABELS[teacher_labels]}", source,
                  functools.partial(preprocessors.to_label_example, prefix=LABEL_PREFIX,
                                    teacher_labels=teacher_labels),
                  vocabulary, [label_metric])
        _add_task(f"{dataset}_standard_{variant}",
                  f"'<input>' -> {_LABELS[teacher_labels]}, no prefix (standard "
                  f"{'distillation' if teacher_labels else 'fine-tuning'})", source,
                  functools.partial(preprocessors.to_label_example, prefix="",
                                    teacher_labels=teacher_labels),
                  vocabulary, [label_metric])
    for suffix, teacher_labels in (("", True), ("_gt", False)):
        _add_task(f"{dataset}_single_task{suffix}",
                  f"'<input>' -> '<rationale> So the answer is <label>.', "
                  f"{_LABELS[teacher_labels]} (single-task baseline)", source,
                  functools.partial(preprocessors.to_single_task_example, prefix="",
                                    teacher_labels=teacher_labels),
                  vocabulary, [label_metric], extract_single_task_label)
    _add_task(f"{dataset}_rationale", f"'{RATIONALE_PREFIX}<input>' -> teacher rationale",
              source,
              functools.partial(preprocessors.to_rationale_example, prefix=RATIONALE_PREFIX),
              vocabulary, [])
    _add_mixture(f"{dataset}_label_mixture", [f"{dataset}_label_gt"])
    _add_mixture(f"{dataset}_rationale_mixture", [f"{dataset}_rationale"])


def register_all() -> None:
    for dataset in DATASETS:
        register_dataset(dataset)
