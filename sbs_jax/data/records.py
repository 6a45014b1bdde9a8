"""The record schema shared by the build job, the teacher job and the SeqIO tasks.

One `tf.train.Example` per input, all features bytes: `id` (unique, stable), `input` (formatted
text without task prefix), `label` (gold; empty when unknown), `llm_label` and `rationale` (the
teacher's), `source` (dataset/split), optionally `teacher` (model name) and `raw_completion`.

A dataset folder holds shards `{split}-{k:05d}.tfrecord`. A shard is written to `NAME.tmp` and
renamed when complete, so a file whose name contains `.tfrecord` is always whole. A whole
*folder* is vouched for by `info.json` (the build job publishes it with the folder in one rename,
`sbs_jax.data.publish`) or, for teacher output, by the per-shard ledgers and `stats.json`:
readers (`shard_paths`, `read_split`, the SeqIO sources) check a split against them first and
refuse a partial or mixed folder (`verify_split`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

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
    from sbs_jax.tf_setup import tf

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
    from sbs_jax.tf_setup import tf

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
    from sbs_jax.tf_setup import tf

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

    Raises `DatasetError` for a partial, mixed or changed folder (see `verify_split`); an empty
    list when the split has no shards at all.
    """
    return [shard.path for shard in verify_split(directory, split)]


def read_shard(path: str) -> Iterator[Record]:
    """The records of one shard file, in order (works inside tf.function tracing too)."""
    from sbs_jax.tf_setup import tf

    for position, data in enumerate(tf.compat.v1.io.tf_record_iterator(path)):
        yield from_example_bytes(data, where=f"{path} record {position}")


def read_split(directory: str, split: str) -> list[Record]:
    """All records of `split` in `directory`, shard by shard, from a verified folder.

    FileNotFoundError when the split has no shards, `DatasetError` when the folder is partial,
    mixed or changed (see `verify_split`).
    """
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
            raise DatasetError(f"{shard.path} holds {len(items)} records, its "
                               f"{shard.listed_in} says {shard.num_records}. {_rebuild(directory)}")
        found += items
    return found


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, for info.json checksums."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
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


def read_info(directory: str) -> dict | None:
    """The folder's info.json, or None when it has none."""
    path = os.path.join(directory, INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: unreadable ({error}). {_rebuild(directory)}") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise DatasetError(f"{path}: not a dataset info file (no 'splits'). {_rebuild(directory)}")
    return info


@dataclass(frozen=True)
class VerifiedShard:
    """A committed shard that matches the file that lists it (`listed_in`)."""

    path: str
    num_records: int
    listed_in: str


_VERIFIED: dict[tuple, list[VerifiedShard]] = {}


def _rebuild(directory: str) -> str:
    parent, name = os.path.split(os.path.abspath(directory))
    return (f"Rebuild it: `python -m sbs_jax.data.build --data_dir {parent} --dataset {name} "
            "...` (a build publishes the whole folder at once, or nothing).")


def _rerun_teacher(directory: str, split: str) -> str:
    return (f"Re-run the same teacher command (`--output_dir {directory} --split {split}`) to "
            "finish it.")


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def count_records(path: str) -> int:
    """Records in a TFRecord file, from its framing alone; DatasetError when it is cut short."""
    size = os.path.getsize(path)
    count = offset = 0
    with open(path, "rb") as f:
        while offset < size:
            header = f.read(8)
            if len(header) < 8:
                raise DatasetError(f"{path}: truncated after {count} records")
            offset += 8 + 4 + struct.unpack("<Q", header)[0] + 4
            if offset > size:
                raise DatasetError(f"{path}: truncated after {count} records")
            f.seek(offset)
            count += 1
    return count


def _check_file(path: str, expected: dict, listed_in: str, fix: str) -> None:
    if "bytes" in expected and os.path.getsize(path) != expected["bytes"]:
        raise DatasetError(f"{path}: {os.path.getsize(path)} bytes, {listed_in} says "
                           f"{expected['bytes']} (changed after it was written). {fix}")
    if "sha256" in expected:
        if file_sha256(path) != expected["sha256"]:
            raise DatasetError(f"{path}: SHA-256 differs from {listed_in} (changed after it was "
                               f"written). {fix}")
    elif count_records(path) != expected["num_records"]:
        raise DatasetError(f"{path}: {count_records(path)} records, {listed_in} lists "
                           f"{expected['num_records']}. {fix}")


def _against_info(directory: str, split: str, info: dict,
                  present: list[str]) -> list[VerifiedShard]:
    entry = info["splits"].get(split) or {"shards": []}
    listed = {s["name"]: s for s in entry["shards"]}
    missing = [name for name in listed if name not in present]
    extra = [name for name in present if name not in listed]
    if missing:
        raise DatasetError(
            f"{directory}: split {split!r} is incomplete: {len(listed) - len(missing)} of "
            f"{len(listed)} shards listed in info.json are there (missing {_names(missing)}). "
            + _rebuild(directory))
    if extra:
        raise DatasetError(
            f"{directory}: {_names(extra)} not listed in its info.json: the folder mixes "
            "shards of another build or teacher output with the dataset info.json describes. "
            f"{_rebuild(directory)} Teacher output goes to a folder of its own.")
    shards = []
    for name in present:
        path = os.path.join(directory, name)
        _check_file(path, listed[name], "info.json", _rebuild(directory))
        shards.append(VerifiedShard(path, listed[name]["num_records"], "info.json"))
    return shards


def _against_ledgers(directory: str, split: str, names: list[str],
                     present: list[str]) -> list[VerifiedShard]:
    ledgers = {}
    for name in names:
        match = LEDGER_RE.match(name)
        if match and match.group("split") == split:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                ledgers[shard_name(split, int(match.group("index")))] = (name, json.load(f))
    if not ledgers and not present:
        return []
    unledgered = [name for name in present if name not in ledgers]
    if unledgered:
        raise DatasetError(
            f"{directory}: {_names(unledgered)} have no teacher ledger: shards the teacher job "
            "did not write are mixed into its output folder. Keep teacher output in a folder of "
            "its own and rebuild released data with `python -m sbs_jax.data.build`.")
    uncommitted = [ledger for shard, (ledger, entry) in ledgers.items()
                   if entry.get("record_ids") and shard not in present]
    if uncommitted:
        raise DatasetError(f"{directory}: {_names(uncommitted)} list records whose shard was "
                           "never committed (the teacher job was interrupted). "
                           + _rerun_teacher(directory, split))
    try:
        with open(os.path.join(directory, STATS_FILE), encoding="utf-8") as f:
            stats = json.load(f)
        split_stats = stats.get("splits", {}).get(split) or (
            stats if stats.get("split") == split else None)
    except FileNotFoundError:
        split_stats = None
    if not split_stats or not split_stats.get("finished"):
        detail = ("no stats for it yet: still running, or killed" if not split_stats else
                  f"{split_stats.get('not_attempted')} examples not attempted; stopped: "
                  f"{split_stats.get('aborted')}")
        raise DatasetError(f"{directory}: the teacher job on split {split!r} has not finished "
                           f"({detail}). " + _rerun_teacher(directory, split))
    shards = []
    for name in present:
        ledger, entry = ledgers[name]
        expected = {"num_records": len(entry["record_ids"])}
        if entry.get("sha256"):
            expected["sha256"] = entry["sha256"]
        path = os.path.join(directory, name)
        _check_file(path, expected, ledger, _rerun_teacher(directory, split))
        shards.append(VerifiedShard(path, expected["num_records"], ledger))
    return shards


def verify_split(directory: str, split: str) -> list[VerifiedShard]:
    """The shards of `split`, checked against what says the folder is whole.

    - A folder with `info.json` (the build job's commit marker; also written by the quickstart
      after its teacher runs) must hold exactly the shards it lists for the split, with their
      sizes and SHA-256 checksums.
    - A teacher output folder (ledgers, no info.json) must have a ledger for every shard, with
      the shard's record count (and checksum, when the ledger has one), no uncommitted ledger,
      and `stats.json` saying the job finished that split.
    - Shards with neither are refused (an unfinished build or a hand-made folder).
    `DatasetError` says which case failed and what to re-run; [] when the split has no shards
    and nothing lists any. Results are cached per process while the files stay unchanged.
    """
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory))
    indexed = []
    for name in names:
        match = SHARD_RE.match(name)
        if match and match.group("split") == split:
            indexed.append((int(match.group("index")), name))
    present = [name for _, name in sorted(indexed)]
    watched = [n for n in names if n in present or n in (INFO_FILE, STATS_FILE)
               or LEDGER_RE.match(n)]
    key = (os.path.abspath(directory), split,
           tuple((n, (s := os.stat(os.path.join(directory, n))).st_size, s.st_mtime_ns,
                  s.st_ino) for n in watched))
    if key in _VERIFIED:
        return _VERIFIED[key]
    info = read_info(directory)
    if info is not None:
        shards = _against_info(directory, split, info, present)
    elif any(LEDGER_RE.match(n) for n in names):
        shards = _against_ledgers(directory, split, names, present)
    elif present:
        raise DatasetError(
            f"{directory}: shards {_names(present)} without an info.json or teacher ledgers: an "
            f"unfinished build or a hand-made folder. {_rebuild(directory)} (To seal a folder "
            "you filled yourself, call sbs_jax.data.records.write_info on it.)")
    else:
        shards = []
    _VERIFIED[key] = shards
    return shards


def tf_feature_spec() -> dict:
    """`tf.io.parse_single_example` spec of the schema (optional fields default to b"")."""
    from sbs_jax.tf_setup import tf

    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in REQUIRED_FIELDS}
    for name in OPTIONAL_FIELDS:
        spec[name] = tf.io.FixedLenFeature([], tf.string, default_value="")
    return spec
