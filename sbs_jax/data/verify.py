"""Whether a dataset folder may be read: a split checked against what vouches for its folder.

- A folder with `info.json` (the build job's commit marker; also written by the quickstart after
  its teacher runs, or by `records.write_info` to seal a folder filled by hand) must hold exactly
  the shards it lists for the split, with their sizes and SHA-256 checksums.
- A teacher output folder (ledgers, no info.json) must have a ledger for every shard, with the
  shard's record count (and checksum, when the ledger has one), no ledger whose shard was never
  committed, and `stats.json` saying the job finished that split.
- Shards with neither are refused (an unfinished build or a hand-made folder).
Readers (`records.shard_paths`, `records.read_split`, so the SeqIO sources, the pipeline and
eval_set) call `verify_split` first; `DatasetError` says which case failed and what to re-run.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from sbs_jax.data.records import (
    INFO_FILE,
    LEDGER_RE,
    SHARD_RE,
    STATS_FILE,
    DatasetError,
    file_sha256,
    shard_name,
)


def read_info(directory: str) -> dict | None:
    """The folder's info.json, or None when it has none."""
    path = os.path.join(directory, INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: unreadable ({error}). {rebuild_hint(directory)}") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise DatasetError(f"{path}: not a dataset info file (no 'splits'). "
                           + rebuild_hint(directory))
    return info


@dataclass(frozen=True)
class VerifiedShard:
    """A committed shard that matches the file that lists it (`listed_in`)."""

    path: str
    num_records: int
    listed_in: str


_VERIFIED: dict[tuple, list[VerifiedShard]] = {}


def rebuild_hint(directory: str) -> str:
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
            + rebuild_hint(directory))
    if extra:
        raise DatasetError(
            f"{directory}: {_names(extra)} not listed in its info.json: the folder mixes "
            "shards of another build or teacher output with the dataset info.json describes. "
            f"{rebuild_hint(directory)} Teacher output goes to a folder of its own.")
    shards = []
    for name in present:
        path = os.path.join(directory, name)
        _check_file(path, listed[name], "info.json", rebuild_hint(directory))
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
    """The shards of `split`, checked as the module docstring says (DatasetError otherwise);
    [] when the split has no shards and nothing lists any. Results are cached per process
    while the files stay unchanged (names, sizes, mtimes, inodes)."""
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
            f"unfinished build or a hand-made folder. {rebuild_hint(directory)} (To seal a folder "
            "you filled yourself, call sbs_jax.data.records.write_info on it.)")
    else:
        shards = []
    _VERIFIED[key] = shards
    return shards
