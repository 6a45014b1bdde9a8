"""The record schema shared by the build job, the teacher job and the SeqIO tasks.

One `tf.train.Example` per input, all features bytes: `id` (unique, stable), `input` (formatted
text without task prefix), `label` (gold; empty when unknown), `llm_label` and `rationale` (the
teacher's), `source` (dataset/split), optionally `teacher` (model name) and `raw_completion`.

A dataset folder holds shards `{split}-{k:05d}.tfrecord`. A shard is written to `NAME.tmp` and
renamed when complete, so a file whose name contains `.tfrecord` is always whole. A whole
*folder* is vouched for by `info.json` (the build job publishes it with the folder in one rename,
`sbs_jax.data.publish`) or, for teacher output, by the per-shard ledgers and `stats.json`:
readers (`shard_paths`, `read_split`, the SeqIO sources) check a split against them first and
refuse a partial or mixed folder (`sbs_jax.data.verify`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from etils import epath

SPLITS = ("train", "valid", "test")
REQUIRED_FIELDS = ("id", "input", "label", "llm_label", "rationale", "source")
OPTIONAL_FIELDS = ("teacher", "raw_completion")
FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})\.tfrecord$")
LEDGER_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})\.ledger\.json$")
INFO_FILE = "info.json"
STATS_FILE = "stats.json"


class DatasetError(ValueError):
    """A dataset folder that must not be read as it is: partial, mixed or changed."""


@dataclass(frozen=True)
class Record:
    """One example: the input, its gold label and the teacher's label and rationale."""

    id: str
    input: str
    label: str = ""
    llm_label: str = ""
    rationale: str = ""
    source: str = ""
    teacher: str = ""
    raw_completion: str = ""

    def replace(self, **changes: str) -> Record:
        return dataclasses.replace(self, **changes)


def shard_name(split: str, index: int) -> str:
    """`{split}-{index:05d}.tfrecord`, the committed name of a shard."""
    return f"{split}-{index:05d}.tfrecord"


def check_record(record: Record, where: str = "") -> None:
    """TypeError naming the record and field when a field is not a string (the schema's type)."""
    for name in FIELDS:
        value = getattr(record, name)
        if not isinstance(value, str):
            raise TypeError(f"{where + ': ' if where else ''}record {record.id!r}: field "
                            f"{name!r} is {type(value).__name__} {value!r}, expected str")


def to_example_bytes(record: Record) -> bytes:
    """Serialises a record as a `tf.train.Example` (optional fields only when non-empty)."""
    from sbs_jax.runtime.tf_setup import tf

    check_record(record)
    feature = {}
    for name in FIELDS:
        value = getattr(record, name)
        if name in OPTIONAL_FIELDS and not value:
            continue
        feature[name] = tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[value.encode("utf-8")])
        )
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def from_example_bytes(data: bytes, where: str = "<bytes>") -> Record:
    """Parses a serialised `tf.train.Example` into a Record; `where` names it in errors."""
    from sbs_jax.runtime.tf_setup import tf

    example = tf.train.Example.FromString(data)
    features = example.features.feature
    missing = [name for name in REQUIRED_FIELDS if name not in features]
    if missing:
        raise ValueError(f"{where}: record lacks required feature(s) {missing}")
    values = {}
    for name in FIELDS:
        if name in features:
            items = features[name].bytes_list.value
            values[name] = items[0].decode("utf-8") if items else ""
    return Record(**values)


@dataclass(frozen=True)
class StagedShard:
    """A shard written to its `.tmp` name, not yet committed (see `commit_shard`)."""

    tmp_path: str
    path: str
    num_records: int
    sha256: str


def stage_shard(records: Iterable[Record], directory: str, split: str, index: int) -> StagedShard:
    """Writes one shard to `{split}-{index:05d}.{pid}.tmp`, synced to disk, with its checksum."""
    from sbs_jax.runtime.tf_setup import tf

    os.makedirs(directory, exist_ok=True)
    final_path = os.path.join(directory, shard_name(split, index))
    tmp_path = os.path.join(directory, f"{split}-{index:05d}.{os.getpid()}.tmp")
    count = 0
    with tf.io.TFRecordWriter(tmp_path) as writer:
        for record in records:
            writer.write(to_example_bytes(record))
            count += 1
    with open(tmp_path, "rb") as f:
        os.fsync(f.fileno())
    return StagedShard(tmp_path, final_path, count, file_sha256(tmp_path))


def commit_shard(staged: StagedShard) -> str:
    """Renames a staged shard to its committed name (atomic); returns that path."""
    os.replace(staged.tmp_path, staged.path)
    return staged.path


def write_shard(records: Iterable[Record], directory: str, split: str, index: int) -> str:
    """Writes one shard atomically (`.tmp`, then rename); returns the committed path."""
    return commit_shard(stage_shard(records, directory, split, index))


def write_split(
    records: Sequence[Record], directory: str, split: str, records_per_shard: int = 50_000
) -> list[str]:
    """Writes a whole split as shards of at most `records_per_shard` records each.

    Shards of an earlier, larger write of the same split are removed afterwards. Meant for a
    folder nobody reads yet (a build's staging folder): `sbs_jax.data.publish` makes it visible.
    """
    if records_per_shard < 1:
        raise ValueError("records_per_shard must be >= 1")
    paths = []
    for index, start in enumerate(range(0, max(len(records), 1), records_per_shard)):
        paths.append(
            write_shard(records[start : start + records_per_shard], directory, split, index)
        )
    for stale in committed_shards(directory, split)[len(paths) :]:
        os.remove(stale)
    return paths


def committed_shards(directory: str, split: str) -> list[str]:
    """Every file named like a committed shard of `split`, in index order, unverified.

    For writers that manage the folder themselves (the teacher's ledger); readers use
    `shard_paths`, which checks the folder first.
    """
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = SHARD_RE.match(name)
        if match and match.group("split") == split:
            found.append((int(match.group("index")), os.path.join(directory, name)))
    return [path for _, path in sorted(found)]


def shard_paths(directory: str, split: str) -> list[str]:
    """The shards of `split` in `directory`, in index order, after checking the folder is whole.

    Raises `DatasetError` for a partial, mixed or changed folder (see `sbs_jax.data.verify`); an
    empty list when the split has no shards at all.
    """
    from sbs_jax.data.verify import verify_split

    return [shard.path for shard in verify_split(directory, split)]


def read_shard(path: str) -> Iterator[Record]:
    """The records of one shard file, in order (works inside tf.function tracing too)."""
    from sbs_jax.runtime.tf_setup import tf

    for position, data in enumerate(tf.compat.v1.io.tf_record_iterator(path)):
        yield from_example_bytes(data, where=f"{path} record {position}")


def read_split(directory: str, split: str) -> list[Record]:
    """All records of `split` in `directory`, shard by shard, from a verified folder.

    FileNotFoundError when the split has no shards, `DatasetError` when the folder is partial,
    mixed or changed (see `sbs_jax.data.verify`).
    """
    from sbs_jax.data.verify import rebuild_hint, verify_split

    shards = verify_split(directory, split)
    if not shards:
        raise FileNotFoundError(
            f"no committed shards '{split}-*.tfrecord' in {directory!r} "
            "(build them with `python -m sbs_jax.data.build` or the teacher job)"
        )
    found = []
    for shard in shards:
        items = list(read_shard(shard.path))
        if len(items) != shard.num_records:
            raise DatasetError(f"{shard.path} holds {len(items)} records, its {shard.listed_in} "
                               f"says {shard.num_records}. {rebuild_hint(directory)}")
        found += items
    return found


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (local or gs://), for info.json checksums and vocabulary pins."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_info(directory: str, dataset: str, extra: dict | None = None) -> str:
    """Writes `info.json`: per split the record count, shard names, sizes and SHA-256 checksums.

    Written last and atomically: from then on readers check the folder against it (a shard
    missing, added or changed is refused). The build job writes it in its staging folder; call
    it yourself to seal a folder you filled by hand.
    """
    splits = {}
    for split in SPLITS:
        shards = []
        for path in committed_shards(directory, split):
            count = sum(1 for _ in read_shard(path))
            shards.append({"name": os.path.basename(path), "num_records": count,
                           "bytes": os.path.getsize(path), "sha256": file_sha256(path)})
        if shards:
            splits[split] = {"num_records": sum(s["num_records"] for s in shards),
                             "shards": shards}
    info = {"dataset": dataset, "splits": splits, **(extra or {})}
    path = os.path.join(directory, INFO_FILE)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    return path


def tf_feature_spec() -> dict:
    """`tf.io.parse_single_example` spec of the schema (optional fields default to b"")."""
    from sbs_jax.runtime.tf_setup import tf

    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in REQUIRED_FIELDS}
    for name in OPTIONAL_FIELDS:
        spec[name] = tf.io.FixedLenFeature([], tf.string, default_value="")
    return spec
