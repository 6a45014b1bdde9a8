"""Checksum manifests of checkpoint steps: what each file held when the step was committed.

orbax finalises a step atomically, but nothing in it notices a file that is later truncated or
overwritten: a truncated array file fails deep inside tensorstore, and overwritten bytes load as
numbers. So the writer records, per step, the size and SHA-256 of every file
(`<step>/checksums.json`), and readers compare the files they are about to read with it.

The manifest is written by the lead process from orbax's post-finalisation callback, after all
processes' writes are complete and merged and before the step folder is committed (renamed, or
given its commit file), so a committed step written by this code always has one. A step
without one is read unverified, with one line on stderr.

Cost: the lead process reads every file of a step once when saving (in orbax's background
thread, while training goes on) and a reader reads the files it verifies once more; on a shared
or remote filesystem that is network traffic of one checkpoint per save.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import sys

from etils import epath

MANIFEST = "checksums.json"
_CHUNK = 8 << 20
# (step folder, items, manifest text) -> what is wrong: each step's files are read once per
# process, however many callers ask (a rewritten step has another manifest).
_verdicts: dict[tuple[str, tuple[str, ...], str], str | None] = {}
_warned_unverified: set[str] = set()


def _digest(path: epath.Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of one file."""
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _digests(root: epath.Path, names: list[str]) -> dict[str, tuple[int, str] | OSError]:
    """Digests of `names` (relative to root), several files at a time (hashlib frees the GIL)."""
    def one(name: str) -> tuple[int, str] | OSError:
        try:
            return _digest(root / name)
        except OSError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(one, names)))


def _files(folder: epath.Path, prefix: str = "") -> list[str]:
    """Paths of every file under `folder`, relative to it (gs:// has no recursive glob)."""
    names = []
    for path in folder.iterdir():
        if path.is_dir():
            names += _files(path, f"{prefix}{path.name}/")
        else:
            names.append(prefix + path.name)
    return names


def write_manifest(step_dir: epath.Path) -> None:
    """Records size and SHA-256 of every file in the item folders of `step_dir` (atomically:
    temp + rename). The step's own files (`_CHECKPOINT_METADATA`) change after the commit."""
    names = sorted(name for name in _files(step_dir) if "/" in name)
    files = {}
    for name, digest in _digests(step_dir, names).items():
        if isinstance(digest, OSError):
            raise digest
        files[name] = {"size": digest[0], "sha256": digest[1]}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=0, sort_keys=True))
    tmp.replace(step_dir / MANIFEST)


def manifest_text(step_dir: epath.Path) -> str | None:
    """The raw manifest of a step (None without one)."""
    path = step_dir / MANIFEST
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def damage(step_dir: epath.Path, items: tuple[str, ...]) -> str | None:
    """Why the files of `items` (top-level folders of the step) do not match the manifest, in a
    few words naming the first bad file; None when they all match, or when the step has no
    manifest (said once per step and process)."""
    text = manifest_text(step_dir)
    if text is None:
        if str(step_dir) not in _warned_unverified:
            _warned_unverified.add(str(step_dir))
            print(f"sbs_jax.train.checksums: {step_dir} has no {MANIFEST} (saved without "
                  "checksums); reading it unverified", file=sys.stderr, flush=True)
        return None
    key = (str(step_dir), items, text)
    if key not in _verdicts:
        _verdicts[key] = _compare(step_dir, items, text)
    return _verdicts[key]


def _compare(step_dir: epath.Path, items: tuple[str, ...], text: str) -> str | None:
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    wanted = sorted(name for name in files if name.split("/", 1)[0] in items)
    if not wanted:
        return f"{MANIFEST} lists no files of {', '.join(items)}"
    for name, digest in _digests(step_dir, wanted).items():
        want = files[name]
        if isinstance(digest, OSError):
            return f"{name} cannot be read ({digest.strerror or digest})"
        if digest[0] != want["size"]:
            return f"{name} has {digest[0]} bytes, {want['size']} were written"
        if digest[1] != want["sha256"]:
            return f"{name} has other bytes than were written (SHA-256 differs)"
    return None
