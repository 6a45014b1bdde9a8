"""The paired input pipeline: per step, a label batch and a rationale batch of the same examples.

Step-by-step distillation trains every example twice per step (`predict: x` -> label and
`explain: x` -> rationale), so the two batches must hold the same example ids in the same rows.
Sampling the two SeqIO mixtures independently cannot promise that, so this pipeline reads each
task once (shuffle off) into memory as token lists keyed by `id`, checks that both tasks hold
the same ids, and draws each global batch from one seeded permutation per epoch. That makes it
deterministic and exactly resumable: its state is the number of examples consumed.

Batches follow seqio's EncDecFeatureConverter (pack=False): `encoder_input_tokens`,
`decoder_target_tokens`, `decoder_input_tokens` (targets shifted right, starting with 0) and
`decoder_loss_weights` (1 on real target tokens), int32. Each view is padded to the smallest
length bucket that fits the *global* batch, so every host builds the same shapes. That still
leaves much of each batch padding on the paper's datasets (input lengths vary widely within
a batch), so `pack=True` packs each view of a step into fewer rows as seqio/T5X packing does
(plus `encoder_segment_ids`/`decoder_segment_ids`; the features are built in packing.py); both
views still train the same examples each step. Every host computes the same global batch and
keeps its block of rows.

Data fractions are nested: the subset for fraction f is the first round(f * n) ids of one
seeded permutation of the sorted ids, so 12.5% lies inside 25% inside 50% (same `fraction_seed`),
and label and rationale views always use the same ids. Which permutation a run uses is its
DATA_SUBSET (`fraction_seed`): `per_seed` draws it from the run seed, as the reference draws a
subset per run, so the spread over seeds includes which examples were kept; `nested` uses one
permutation for every seed, so all seeds train on the same examples.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# isort: split
# First, so TF loads quietly and with GPUs hidden before seqio imports it.
from sbs_jax.runtime.tf_setup import tf  # noqa: F401

# isort: split
import seqio

from sbs_jax.data import packing
from sbs_jax.data.packing import DEFAULT_BUCKETS, bucket_length

STATE_VERSION = 1


def check_task(name: str, setting: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture, or a ValueError naming the setting."""
    import tasks  # noqa: F401  (registers every task and mixture)

    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
        close = [k for k in known if name.split("_")[0] in k][:8]
        raise ValueError(
            f"{setting}={name!r} is not a registered SeqIO task or mixture"
            + (f"; similar: {close}" if close else f"; {len(known)} are registered")
        ) from None


def task_list(name: str) -> list[seqio.Task]:
    """The tasks behind a task or mixture name (a mixture's tasks are concatenated here)."""
    provider = seqio.get_mixture_or_task(name)
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


_KEPT = ("id", "inputs", "targets", "inputs_pretokenized", "targets_pretokenized")


def _unbatch_ragged(value: np.ndarray) -> list[np.ndarray]:
    """Rows of a ragged batch from `as_numpy_iterator` (an object array of rows, or a 2-D array
    when every row has the same length) as int32 arrays."""
    return [np.asarray(row, dtype=np.int32) for row in value]


def load_tokenized(name: str, split: str, lengths: Mapping[str, int],
                   use_cached: bool = False) -> dict[str, dict]:
    """`{id: example}` of a task or mixture, examples trimmed to `lengths` (EOS kept).

    Each example keeps `inputs`, `targets` (int32 arrays) and the `*_pretokenized` texts.
    Raises on a duplicate id: pairing by id would be ambiguous.
    """
    examples: dict[str, dict] = {}
    for task in task_list(name):
        dataset = task.get_dataset(dict(lengths), split=split, shuffle=False,
                                   use_cached=use_cached, num_epochs=1)
        # Batched iteration: tf.data's per-example Python iteration is far slower.
        dataset = dataset.map(lambda ex: {key: ex[key] for key in _KEPT}).ragged_batch(1024)
        for batch in dataset.as_numpy_iterator():
            tokens = {key: _unbatch_ragged(batch[key]) for key in ("inputs", "targets")}
            for row, raw_id in enumerate(batch["id"]):
                example_id = raw_id.decode("utf-8")
                if example_id in examples:
                    raise ValueError(f"duplicate example id {example_id!r} in {name!r}/{split}")
                examples[example_id] = {
                    "inputs": tokens["inputs"][row],
                    "targets": tokens["targets"][row],
                    "inputs_pretokenized": batch["inputs_pretokenized"][row].decode("utf-8"),
                    "targets_pretokenized": batch["targets_pretokenized"][row].decode("utf-8"),
                }
    if not examples:
        raise ValueError(f"{name!r} has no examples in split {split!r}")
    return examples


def select_fraction(ids: Sequence[str], fraction: float, seed: int = 0) -> list[str]:
    """The nested subset of `ids` for `fraction` (sorted): a prefix of one seeded permutation."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    ordered = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(ordered))
    keep = max(1, round(fraction * len(ordered)))
    return sorted(ordered[i] for i in order[:keep])


def fraction_seed(data_subset: str, run_seed: int) -> int:
    """The permutation seed of `select_fraction` for a DATA_SUBSET: `per_seed` -> the run seed,
    `nested` -> 0 (one subset for every seed). Within one seed, fractions nest either way."""
    if data_subset == "per_seed":
        return int(run_seed)
    if data_subset == "nested":
        return 0
    raise ValueError(f"DATA_SUBSET={data_subset!r} must be 'per_seed' or 'nested'")


def _fingerprint(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class PairedExamples:
    """Both views of one split in memory, keyed by id; load once, iterate many times."""

    label: dict[str, dict]
    rationale: dict[str, dict] | None
    caps: dict[str, int]

    @classmethod
    def load(cls, label_task: str, rationale_task: str | None, split: str,
             feature_lengths: Mapping[str, int], use_cached: bool = False) -> PairedExamples:
        """Reads the tasks (trimmed to the caps) and checks they hold the same ids."""
        caps = packing.caps(feature_lengths)
        label = load_tokenized(label_task, split, caps, use_cached)
        rationale = None
        if rationale_task is not None:
            rationale = load_tokenized(
                rationale_task, split,
                {"inputs": caps["inputs"], "targets": caps["rationale_targets"]}, use_cached)
            only_label = label.keys() - rationale.keys()
            only_rationale = rationale.keys() - label.keys()
            if only_label or only_rationale:
                raise ValueError(
                    f"{label_task!r} and {rationale_task!r} ({split}) hold different example "
                    f"ids: {len(only_label)} only in the label task (e.g. "
                    f"{sorted(only_label)[:3]}), {len(only_rationale)} only in the rationale "
                    f"task (e.g. {sorted(only_rationale)[:3]})")
        return cls(label, rationale, caps)


class PairedBatches:
    """Iterator of `{"label": batch, "rationale": batch, "ids": [rows]}` for this host.

    `rationale_task=None` gives label batches only (standard fine-tuning / distillation).
    `feature_lengths` are caps: `inputs`, `targets`, optional `rationale_targets` (default: the
    `targets` cap). `batch_size` is global and must divide by `num_shards`. With `repeat=False`
    the last batch is filled up with empty rows (id "", all weights 0). Pass `examples`
    (a `PairedExamples` of the same tasks, split and caps) to skip reading the tasks again.

    `pack=True` packs each view's examples of a step into fewer rows (`packed_encdec_batch`):
    a step still trains the same `batch_size` examples in both views, but in a number of rows
    rounded up to a multiple of `pack_row_multiple` (which this rounds up to a multiple of
    `num_shards`; default `batch_size / 8`), so few distinct shapes are compiled. `ids` then
    lists the examples of this host's label rows.
    """

    def __init__(self, label_task: str, rationale_task: str | None, split: str,
                 batch_size: int, feature_lengths: Mapping[str, int], *, seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, shard_id: int = 0,
                 num_shards: int = 1, data_fraction: float = 1.0, fraction_seed: int = 0,
                 length_buckets: Sequence[int] | Mapping[str, Sequence[int]] = DEFAULT_BUCKETS,
                 use_cached: bool = False, examples: PairedExamples | None = None,
                 pack: bool = False, pack_row_multiple: int | None = None):
        if batch_size % num_shards:
            raise ValueError(f"batch_size {batch_size} is not divisible by num_shards "
                             f"{num_shards}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} outside [0, {num_shards})")
        if examples is None:
            examples = PairedExamples.load(label_task, rationale_task, split, feature_lengths,
                                           use_cached)
        elif (examples.rationale is None) != (rationale_task is None):
            raise ValueError("`examples` and `rationale_task` disagree about the rationale view")
        self.caps = examples.caps
        self._label, self._rationale = examples.label, examples.rationale
        self._buckets = {key: list(length_buckets[key] if isinstance(length_buckets, Mapping)
                                   else length_buckets) for key in self.caps}
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.shuffle, self.repeat = shuffle, repeat
        self.shard_id, self.num_shards = shard_id, num_shards
        self._rows = slice(shard_id * batch_size // num_shards,
                           (shard_id + 1) * batch_size // num_shards)
        self.pack = pack
        multiple = pack_row_multiple or max(1, batch_size // 8)
        if multiple <= 0:
            raise ValueError(f"pack_row_multiple must be positive, got {pack_row_multiple}")
        self._row_multiple = math.lcm(int(multiple), num_shards)
        self.ids = select_fraction(list(self._label), data_fraction, fraction_seed)
        self._fingerprint = _fingerprint(self.ids)
        self._position = 0
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_examples(self) -> int:
        return len(self.ids)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = self.num_examples
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def _global_ids(self) -> list[str]:
        n, start = self.num_examples, self._position
        if not self.repeat:
            if start >= n:
                raise StopIteration
            end = min(start + self.batch_size, n)
        else:
            end = start + self.batch_size
        picked = [self.ids[self._epoch_order(p // n)[p % n]] for p in range(start, end)]
        self._position = end
        return picked + [""] * (self.batch_size - len(picked))

    def _view(self, examples: dict[str, dict], ids: list[str],
              target_cap: str) -> tuple[dict, list[str]]:
        """This host's rows of one view and the ids of the examples in them."""
        empty = np.zeros((0,), np.int32)
        inputs = [examples[i]["inputs"] if i else empty for i in ids]
        targets = [examples[i]["targets"] if i else empty for i in ids]
        input_length = bucket_length(max(len(x) for x in inputs), self._buckets["inputs"],
                                     self.caps["inputs"])
        target_length = bucket_length(max(len(y) for y in targets), self._buckets[target_cap],
                                      self.caps[target_cap])
        if not self.pack:
            return (packing.encdec_batch(inputs[self._rows], targets[self._rows], input_length,
                                         target_length), ids[self._rows])
        rows, input_length, target_length = packing.pack_plan(
            inputs, targets, (input_length, target_length),
            (self._buckets["inputs"], self._buckets[target_cap]),
            (self.caps["inputs"], self.caps[target_cap]), self._row_multiple)
        per_host = len(rows) // self.num_shards
        mine = rows[self.shard_id * per_host:(self.shard_id + 1) * per_host]
        return (packing.packed_encdec_batch(inputs, targets, mine, input_length, target_length),
                [ids[i] for row in mine for i in row])

    def __iter__(self) -> PairedBatches:
        return self

    def __next__(self) -> dict:
        ids = self._global_ids()
        label, label_ids = self._view(self._label, ids, "targets")
        batch = {"label": label, "ids": np.asarray(label_ids)}
        if self._rationale is not None:
            batch["rationale"] = self._view(self._rationale, ids, "rationale_targets")[0]
        return batch

    def state(self) -> dict:
        """JSON-serialisable position; `restore` continues exactly where this was taken."""
        return {"version": STATE_VERSION, "position": self._position, "seed": self.seed,
                "shuffle": self.shuffle, "num_examples": self.num_examples,
                "ids_fingerprint": self._fingerprint}

    def restore(self, state: Mapping) -> None:
        """Continues from `state()`; refuses a state taken over different data or order."""
        state = json.loads(state) if isinstance(state, (str, bytes)) else dict(state)
        mine = self.state()
        for key in ("version", "seed", "shuffle", "num_examples", "ids_fingerprint"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"iterator state does not match this pipeline: {key} is {state.get(key)!r} "
                    f"in the checkpoint but {mine[key]!r} here (data, fraction or seed changed)")
        self._position = int(state["position"])


@dataclass
class EvalSet:
    """A label task's evaluation examples, with the task's own postprocessing and metrics.

    Use: `for rows, tokens in s.batches(64): ...` -> decode predictions for `rows` with
    `s.vocabulary.decode`, then `s.score(predictions)` (ordered like `s.ids`).
    """

    task_name: str
    ids: list[str]
    inputs: list[np.ndarray]
    inputs_text: list[str]
    targets: list[str]
    vocabulary: seqio.Vocabulary
    metric_fns: Sequence[Callable] = field(default_factory=list)
    postprocess_fn: Callable | None = None

    def batches(self, batch_size: int, input_cap: int | None = None,
                buckets: Sequence[int] = DEFAULT_BUCKETS
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row indices, encoder_input_tokens) per batch; the last one may be short."""
        cap = input_cap or max(len(x) for x in self.inputs)
        for start in range(0, len(self.ids), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self.ids)))
            chunk = [self.inputs[i] for i in rows]
            length = bucket_length(max(len(x) for x in chunk), buckets, cap)
            tokens = np.zeros((len(rows), length), np.int32)
            for row, x in enumerate(chunk):
                tokens[row, : len(x)] = x
            yield rows, tokens

    def answers(self, predictions: Sequence[str]) -> list:
        """Decoded predictions postprocessed as the task does: what its metrics compare (the
        label a single-task output ends with, for instance)."""
        if self.postprocess_fn is None:
            return list(predictions)
        return [self.postprocess_fn(p, example=None, is_target=False) for p in predictions]

    def score(self, predictions: Sequence[str]) -> dict[str, float]:
        """The task's metrics of decoded predictions (postprocessed as the task does)."""
        answers = self.answers(predictions)
        results: dict[str, float] = {}
        for metric_fn in self.metric_fns:
            results.update(metric_fn(self.targets, answers))
        return results


def eval_set(task_name: str, split: str = "valid", input_cap: int = 1024,
             target_cap: int = 256, use_cached: bool = False) -> EvalSet:
    """The evaluation examples of a label task (or a one-task mixture), sorted by id."""
    tasks = task_list(task_name)
    if len(tasks) != 1:
        raise ValueError(f"evaluate one task at a time; {task_name!r} has {len(tasks)}")
    task = tasks[0]
    examples = load_tokenized(task.name, split, {"inputs": input_cap, "targets": target_cap},
                              use_cached)
    ids = sorted(examples)
    post = task.postprocess_fn
    targets = [examples[i]["targets_pretokenized"] for i in ids]
    if post is not None:
        targets = [post(t, example=None, is_target=True) for t in targets]
    return EvalSet(
        task_name=task.name, ids=ids, inputs=[examples[i]["inputs"] for i in ids],
        inputs_text=[examples[i]["inputs_pretokenized"] for i in ids], targets=targets,
        vocabulary=task.output_features["targets"].vocabulary,
        metric_fns=list(task.metric_fns), postprocess_fn=post)


def count_examples(name: str, split: str, use_cached: bool = False) -> int:
    """Examples of a task or mixture split, without reading one: the seqio cache's stats, or
    what the source's shard listings say. Raises, naming the task, split and folder, when the
    split is missing (or the task is not in any seqio cache) and when it is empty."""
    total = 0
    for task in task_list(name):
        if use_cached:
            if not task.cache_dir:
                raise FileNotFoundError(
                    f"task {task.name!r} is not in any seqio cache folder (searched "
                    f"{seqio.get_global_cache_dirs() or 'none'}): cache it with "
                    f"`launch/seqio_cache.sh --tasks {task.name} --output_cache_dir DIR`, then "
                    "pass --seqio_additional_cache_dirs=DIR, or train without USE_CACHED_TASKS")
            try:
                count = task.get_cached_stats(split)["examples"]
            except ValueError:
                raise FileNotFoundError(f"the seqio cache of task {task.name!r} in "
                                        f"{task.cache_dir} has no {split!r} split") from None
            where = f"the seqio cache {task.cache_dir}"
        else:
            count = task.num_input_examples(split)
            source = task.source
            where = source.directory() if hasattr(source, "directory") else str(source)
        if count == 0:
            raise ValueError(f"task {task.name!r} has no examples in split {split!r} ({where})")
        total += count or 0
    return total
