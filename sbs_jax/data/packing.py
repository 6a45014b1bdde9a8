"""Token lists -> seqio EncDecFeatureConverter features, padded to a length bucket, packed or not.

A view of a step is padded to the smallest length bucket that fits its longest example, so a run
compiles few shapes; `fixed` buckets give one shape per view. Packing (seqio/T5X `pack=True`)
puts several examples side by side in one row, numbered by `encoder_segment_ids` /
`decoder_segment_ids`, and `pack_plan` picks how long the packed rows are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_BUCKETS = (8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# Packing plans are costed per row as tokens + tokens**2 / this: the row length at which a T5
# layer's attention work matches its projections' (the FLOPs alone put it at ~3k tokens for
# t5.1.1-small; attention runs several times slower than the projections on CPU, so lower).
_ATTENTION_EVEN_LENGTH = 1024


def caps(feature_lengths: Mapping[str, int]) -> dict[str, int]:
    """The length cap of each feature: `inputs`, `targets` and `rationale_targets` (default:
    the `targets` cap)."""
    out = {"inputs": int(feature_lengths["inputs"]), "targets": int(feature_lengths["targets"])}
    out["rationale_targets"] = int(feature_lengths.get("rationale_targets", out["targets"]))
    return out


def length_buckets(feature_lengths: Mapping[str, int], fixed: bool = False
                   ) -> Sequence[int] | dict[str, tuple[int]]:
    """The buckets `PairedBatches` pads to: DEFAULT_BUCKETS, or with `fixed` one per feature,
    its cap (every batch of a view has the same shape, so a run compiles its step once)."""
    if not fixed:
        return DEFAULT_BUCKETS
    return {key: (cap,) for key, cap in caps(feature_lengths).items()}


def bucket_length(length: int, buckets: Sequence[int], cap: int) -> int:
    """The smallest bucket >= `length` (and <= `cap`; `cap` itself when none fits)."""
    for bucket in sorted(buckets):
        if length <= bucket <= cap:
            return bucket
    return cap


def encdec_batch(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                 input_length: int, target_length: int) -> dict[str, np.ndarray]:
    """EncDecFeatureConverter features (no packing) of token lists, zero padded."""
    rows = len(inputs)
    encoder = np.zeros((rows, input_length), np.int32)
    target = np.zeros((rows, target_length), np.int32)
    for row, (x, y) in enumerate(zip(inputs, targets)):
        encoder[row, : len(x)] = x
        target[row, : len(y)] = y
    decoder_inputs = np.zeros_like(target)
    decoder_inputs[:, 1:] = target[:, :-1]
    return {
        "encoder_input_tokens": encoder,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": target,
        "decoder_loss_weights": (target != 0).astype(np.int32),
    }


def pack_rows(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], input_length: int,
              target_length: int) -> list[list[int]]:
    """Example indices per packed row, by first-fit decreasing on the input length.

    Each row's inputs fit `input_length` and its targets `target_length`; examples with no
    tokens (the fill of a short last batch) are left out. Deterministic for the same lists.
    """
    order = sorted((i for i in range(len(inputs)) if len(inputs[i]) or len(targets[i])),
                   key=lambda i: (-len(inputs[i]), -len(targets[i]), i))
    rows: list[list[int]] = []
    free_inputs = np.zeros((0,), np.int64)
    free_targets = np.zeros((0,), np.int64)
    for i in order:
        fits = np.flatnonzero((free_inputs >= len(inputs[i])) & (free_targets >= len(targets[i])))
        if fits.size:
            row = int(fits[0])
            rows[row].append(i)
            free_inputs[row] -= len(inputs[i])
            free_targets[row] -= len(targets[i])
        else:
            rows.append([i])
            free_inputs = np.append(free_inputs, input_length - len(inputs[i]))
            free_targets = np.append(free_targets, target_length - len(targets[i]))
    return rows


def pack_plan(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray],
              lengths: tuple[int, int], buckets: tuple[Sequence[int], Sequence[int]],
              caps: tuple[int, int], row_multiple: int) -> tuple[list[list[int]], int, int]:
    """(rows, input length, target length) of the cheapest packing of one view of a step.

    `lengths` are the view's unpacked (input, target) bucket lengths; `buckets` and `caps` its
    (input, target) buckets and caps. Rows are 1, 2, 4 or 8 times those long (the shapes stay on
    the bucket grid): longer rows let long examples share one, but attention grows with the
    square of the row length. The row count is rounded up to a multiple of `row_multiple` with
    empty rows.
    """
    plans = []
    for scale in (1, 2, 4, 8):
        scaled = tuple(bucket_length(n * scale, bucket, cap)
                       for n, bucket, cap in zip(lengths, buckets, caps))
        rows = pack_rows(inputs, targets, *scaled)
        num_rows = max(1, -(-len(rows) // row_multiple)) * row_multiple
        cost = num_rows * sum(n + n * n / _ATTENTION_EVEN_LENGTH for n in scaled)
        plans.append((cost, scale, rows, num_rows, scaled))
    _, _, rows, num_rows, (input_length, target_length) = min(plans, key=lambda p: p[:2])
    return rows + [[] for _ in range(num_rows - len(rows))], input_length, target_length


def packed_encdec_batch(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                        rows: Sequence[Sequence[int]], input_length: int,
                        target_length: int) -> dict[str, np.ndarray]:
    """EncDecFeatureConverter features with packing (seqio/T5X `pack=True`): the examples of
    `rows` side by side in each row, `encoder_segment_ids` / `decoder_segment_ids` numbering
    them from 1 (0 on padding), and decoder inputs shifted right within each segment."""
    shape_inputs, shape_targets = (len(rows), input_length), (len(rows), target_length)
    out = {key: np.zeros(shape_inputs, np.int32)
           for key in ("encoder_input_tokens", "encoder_segment_ids")}
    out.update({key: np.zeros(shape_targets, np.int32) for key in (
        "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids")})
    for row, members in enumerate(rows):
        at_input = at_target = 0
        for segment, index in enumerate(members, start=1):
            x, y = inputs[index], targets[index]
            out["encoder_input_tokens"][row, at_input:at_input + len(x)] = x
            out["encoder_segment_ids"][row, at_input:at_input + len(x)] = segment
            out["decoder_target_tokens"][row, at_target:at_target + len(y)] = y
            out["decoder_input_tokens"][row, at_target + 1:at_target + len(y)] = y[:-1]
            out["decoder_segment_ids"][row, at_target:at_target + len(y)] = segment
            at_input, at_target = at_input + len(x), at_target + len(y)
    out["decoder_loss_weights"] = (out["decoder_target_tokens"] != 0).astype(np.int32)
    return out
