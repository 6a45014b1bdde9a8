"""Publishing a dataset folder whole: everything is written aside, then one rename shows it.

`publish(directory, dataset, {split: records})` writes the shards and `info.json` into a staging
folder `.{name}.staging-{pid}` beside `directory`, then swaps the two folders with one atomic
`renameat2(RENAME_EXCHANGE)` (a plain rename when `directory` does not exist yet) and removes
the old contents. A reader therefore sees the previous dataset or the new one, never a mix, and
a build killed at any moment leaves the published folder as it was. Splits not being rebuilt
are carried over from the published folder (hard links) after it verifies.

One build per folder at a time (a file lock `.{name}.publish.lock`); holding it, a build removes
staging folders of dead builds. The published folder may only hold what a build writes (shards,
info.json, `.tmp` files): a folder with anything else, such as teacher output, is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence

from sbs_jax.data import records, verify
from sbs_jax.data.records import Record
from sbs_jax.runtime import console

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive advisory file lock for the duration of the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two existing paths; False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_foreign(directory: str) -> None:
    """FileExistsError when `directory` holds anything a build does not write (teacher output,
    your own files): publishing replaces the folder, and those must not go with it."""
    if not os.path.isdir(directory):
        return
    foreign = sorted(name for name in os.listdir(directory)
                     if not (name == records.INFO_FILE or name.endswith(".tmp")
                             or records.SHARD_RE.match(name)))
    if foreign:
        raise FileExistsError(
            f"{directory} holds files a build does not write ({', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}): teacher output or your own files. Build "
            "into another --data_dir, or move that folder away first.")


def _clean_stale(parent: str, name: str, directory: str) -> None:
    """Removes what dead builds left (the caller holds the lock: no build is running).

    Where the swap had to be two renames and a build died between them, the previous dataset
    sits in `.{name}.previous-*`: it is put back first.
    """
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if entry.startswith(f".{name}.previous-") and not os.path.exists(directory):
            os.rename(path, directory)
        elif entry.startswith((f".{name}.staging-", f".{name}.previous-")):
            console.say(f"removing {path}: left by an interrupted build")
            shutil.rmtree(path, ignore_errors=True)


def _carry_over(directory: str, staging: str, splits: Sequence[str]) -> dict:
    """Hard-links the verified shards of `splits` into staging; returns the old info's extras."""
    info = verify.read_info(directory) if os.path.isdir(directory) else None
    if info is None:
        return {}
    for split in splits:
        try:
            paths = records.shard_paths(directory, split)
        except records.DatasetError as error:
            console.say(f"warning: not keeping split {split!r} of the published folder: {error}")
            continue
        for path in paths:
            target = os.path.join(staging, os.path.basename(path))
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    return {k: v for k, v in info.items() if k not in ("dataset", "splits")}


def _merge(old: dict, new: dict) -> dict:
    """`new` over `old`, dict values merged one level deep (per-split figures of both)."""
    merged = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            merged[key] = {**old[key], **value}
        else:
            merged[key] = value
    return merged


def publish(directory: str, dataset: str, by_split: Mapping[str, Sequence[Record]],
            extra: dict | None = None, records_per_shard: int = 50_000) -> str:
    """Replaces `directory` by a folder holding `by_split` (+ the other splits it had); returns
    the path of its info.json. Nothing is visible at `directory` until all of it is written."""
    if records_per_shard < 1:
        raise ValueError("records_per_shard must be >= 1")
    directory = os.path.abspath(directory)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    with locked(os.path.join(parent, f".{name}.publish.lock")):
        _clean_stale(parent, name, directory)
        refuse_foreign(directory)
        staging = os.path.join(parent, f".{name}.staging-{os.getpid()}")
        os.mkdir(staging)
        try:
            for split, split_records in by_split.items():
                records.write_split(split_records, staging, split, records_per_shard)
            kept = [s for s in records.SPLITS if s not in by_split]
            old_extra = _carry_over(directory, staging, kept)
            records.write_info(staging, dataset, _merge(old_extra, extra or {}))
            _fsync_dir(staging)
            if not os.path.exists(directory):
                os.rename(staging, directory)
            elif not _exchange(staging, directory):
                previous = os.path.join(parent, f".{name}.previous-{os.getpid()}")
                os.rename(directory, previous)
                os.rename(staging, directory)
                staging = previous
            _fsync_dir(parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(directory, records.INFO_FILE)

