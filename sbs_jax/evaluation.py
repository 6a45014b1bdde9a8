"""Validation by decoding: the label task's inputs -> greedy decode -> the task's metric_fns.

Only the label is decoded at test time (the paper's method). Batches are padded to a fixed
number of rows and to bucketed lengths so `sbs_jax.decoding.generate` compiles a handful of
shapes once per process. Inputs shown to people come from the records' text
(`EvalSet.inputs_text`), never from decoding tokens: decoding stops at the first EOS, which
NLI inputs use as the premise/hypothesis separator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sbs_jax import decoding
from sbs_jax.data.pipeline import EvalSet
from sbs_jax.models import T5Config


def decode_texts(
    config: T5Config, params: Any, eval_set: EvalSet, batch_size: int, max_decode_len: int = 64,
    input_cap: int | None = None, method: str = "greedy",
) -> list[str]:
    """Decoded strings for every example of `eval_set`, in its order."""
    texts: list[str] = [""] * len(eval_set.ids)
    for rows, tokens in eval_set.batches(batch_size, input_cap=input_cap):
        padded = np.zeros((batch_size, tokens.shape[1]), np.int32)
        padded[: len(rows)] = tokens
        decoded = np.asarray(
            decoding.generate(config, params, padded, max_decode_len, method=method))
        for row, ids in zip(rows, decoded[: len(rows)]):
            texts[row] = eval_set.vocabulary.decode([int(t) for t in ids if t != 0])
    return texts


def subset(eval_set: EvalSet, max_examples: int | None) -> EvalSet:
    """The first `max_examples` examples (ids are sorted, so the subset is stable)."""
    if max_examples is None or max_examples >= len(eval_set.ids):
        return eval_set
    n = int(max_examples)
    return dataclasses.replace(
        eval_set, ids=eval_set.ids[:n], inputs=eval_set.inputs[:n],
        inputs_text=eval_set.inputs_text[:n], targets=eval_set.targets[:n])


def evaluate(
    config: T5Config, params: Any, eval_set: EvalSet, batch_size: int, max_decode_len: int = 64,
    input_cap: int | None = None,
) -> tuple[dict[str, float], list[str]]:
    """(metrics from the task's metric_fns, raw decoded predictions)."""
    predictions = decode_texts(config, params, eval_set, batch_size, max_decode_len, input_cap)
    metrics = {k: float(v) for k, v in eval_set.score(predictions).items()}
    metrics["num_examples"] = float(len(predictions))
    return metrics, predictions
