"""Preprocessors of the sbs tasks: record -> (inputs, targets) text, then tokens.

Inputs are `{prefix}{record input}`; for NLI the record input is `premise</s>hypothesis`
(see `sbs_jax.data.dss.NLI_SEPARATOR`) and tokenisation puts the EOS *token id* there, as the
reference does by joining premise and hypothesis with the tokenizer's EOS.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio

from sbs_jax.data.dss import NLI_SEPARATOR
from sbs_jax.data.parse import ANSWER_MARKER
from sbs_jax.runtime.tf_setup import tf

PASSTHROUGH = ("id", "source")


def _target_label(example: Mapping[str, tf.Tensor], teacher_labels: bool) -> tf.Tensor:
    """The gold label, or with `teacher_labels` the teacher's label on the train split."""
    if not teacher_labels:
        return example["label"]
    return tf.where(tf.equal(example["split"], "train"), example["llm_label"], example["label"])


def _select(example: Mapping[str, tf.Tensor], inputs: tf.Tensor, targets: tf.Tensor) -> dict:
    return {**{k: example[k] for k in PASSTHROUGH}, "inputs": inputs, "targets": targets}


def to_label_example(dataset: tf.data.Dataset, prefix: str, teacher_labels: bool):
    """inputs = prefix + input; targets = the gold label, or on train the teacher's label."""

    def fn(example):
        label = _target_label(example, teacher_labels)
        return _select(example, tf.strings.join([prefix, example["input"]]), label)

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def to_rationale_example(dataset: tf.data.Dataset, prefix: str):
    """inputs = prefix + input; targets = the teacher's rationale."""

    def fn(example):
        return _select(example, tf.strings.join([prefix, example["input"]]),
                       example["rationale"])

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# The single-task target: the rationale, then the label, in the completion format of the
# rule-based teacher (`<rationale> So the answer is <label>.`), so that format's parser
# (`sbs_jax.data.parse`, "synthetic") reads the label back out of a decoded prediction for every
# dataset. The final "." is stripped by the parser, so a label that itself ends in "." survives.
def to_single_task_example(dataset: tf.data.Dataset, prefix: str, teacher_labels: bool):
    """inputs = prefix + input; targets = `<rationale> So the answer is <label>.` (one task).

    The label is the gold one, or on train the teacher's (`teacher_labels`); the rationale is
    always the teacher's. This is the paper's single-task baseline (rationale and label in one
    target) against which multi-task step-by-step training is compared.
    """

    def fn(example):
        label = _target_label(example, teacher_labels)
        target = tf.strings.strip(tf.strings.join(
            [example["rationale"], f" {ANSWER_MARKER} ", label, "."]))
        return _select(example, tf.strings.join([prefix, example["input"]]), target)

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _encode_with_separator(text: tf.Tensor, vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """Tokens of each separator-delimited piece, joined by the EOS id (no trailing EOS)."""
    pieces = tf.strings.split(tf.reshape(text, [1]), sep=NLI_SEPARATOR).values
    tokens = tf.cast(vocabulary.encode_tf(pieces), tf.int32)
    eos = tf.RaggedTensor.from_tensor(
        tf.fill([tf.shape(pieces)[0], 1], tf.constant(vocabulary.eos_id, tf.int32)))
    return tf.concat([tokens, eos], axis=1).flat_values[:-1]


@seqio.map_over_dataset
def tokenize(example, output_features):
    """Tokenises inputs (separator -> EOS id) and targets, keeping the text as `*_pretokenized`."""
    result = dict(example)
    for key in ("inputs", "targets"):
        vocabulary = output_features[key].vocabulary
        result[f"{key}_pretokenized"] = example[key]
        if key == "inputs":
            result[key] = _encode_with_separator(example[key], vocabulary)
        else:
            result[key] = tf.cast(vocabulary.encode_tf(example[key]), tf.int32)
    return result
