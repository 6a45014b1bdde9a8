"""Exactly-once bookkeeping of a teacher job's output folder.

The folder holds committed shards `{split}-{k:05d}.tfrecord` (via `sbs_jax.data.records`) and,
for every commit, a ledger `{split}-{k:05d}.ledger.json`: the ids in the shard, the examples that
ended without a record (with the reason), the shard's SHA-256 and what the batch cost. A commit
writes the shard as `.tmp`, then the ledger (`.tmp`, rename), then renames the shard: the
shard's rename is the commit point.
After a crash (even SIGKILL) at any moment a restart finds either

- a ledger whose shard exists, or one that lists no records: committed, its ids are done;
- a ledger that lists records but has no shard: not committed, removed, its ids asked again;
- `.tmp` files: half-written, removed.

So every example ends in exactly one committed shard, and only what was never committed is asked
again. Failures of the teacher (retries ran out, a request rejected) are asked again on a
re-run; a completion with no parsable label is final (it is not re-asked forever), as is an
input the rules teacher cannot solve.
A lock file keeps two jobs from writing one folder at once. The folder is teacher output only:
a published dataset (info.json) or shards without ledgers are refused, so teacher records never
mix with released ones. Readers (`sbs_jax.data.verify`) check each split against
its ledgers and `stats.json` (finished) before training reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field

from sbs_jax.data import records

_LEDGER_RE = records.LEDGER_RE
STATS_FILE = records.STATS_FILE
LOCK_FILE = ".teacher.lock"
COUNTERS = ("prompt_tokens", "completion_tokens", "requests", "gold_known", "gold_agree")


@dataclass
class Batch:
    """The results of one commit: records plus failures and their costs."""

    records: list[records.Record] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"id", "reason", "kind", "final"}
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def __len__(self) -> int:
        return len(self.records) + len(self.failures)


def _write_json_atomically(path: str, payload: dict) -> None:
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def refuse_published(output_dir: str) -> None:
    """ValueError when `output_dir` is a published dataset (it has an info.json): teacher shards
    added there would mix with the released ones."""
    if os.path.exists(os.path.join(output_dir, records.INFO_FILE)):
        raise ValueError(
            f"{output_dir} is a published dataset (it has {records.INFO_FILE}); teacher output "
            "never goes among built shards. Use a folder of its own, e.g. "
            f"--output_dir teacher_data/{os.path.basename(os.path.normpath(output_dir))} "
            "(then train with SBS_DATA_DIR=teacher_data)")


class Ledger:
    """The committed state of one split in an output folder; `commit` adds a batch."""

    def __init__(self, output_dir: str, split: str, settings: dict):
        self.output_dir = output_dir
        self.split = split
        refuse_published(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        # The lock lasts while its file is open: for the ledger's life (`close`), or until a
        # refusal below.
        with contextlib.ExitStack() as until_ready:
            self._lock_file = until_ready.enter_context(
                open(os.path.join(output_dir, LOCK_FILE), "w"))
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"another teacher job is writing to {output_dir}") from None
            self._check_settings(settings)
            self.record_ids: set[str] = set()
            self.failures: dict[str, dict] = {}
            self.totals = dict.fromkeys(COUNTERS, 0)
            self.next_index = 0
            self._recover()
            until_ready.pop_all()

    def close(self) -> None:
        self._lock_file.close()

    def _check_settings(self, settings: dict) -> None:
        """Refuses to resume into a folder written with different settings (mixed data)."""
        path = os.path.join(self.output_dir, f"job-{self.split}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
            changed = {key: (previous.get(key), value) for key, value in settings.items()
                       if previous.get(key) != value}
            if changed:
                details = "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items())
                raise ValueError(f"{self.output_dir} holds a teacher job with other settings "
                                 f"({details}): use another --output_dir")
        else:
            _write_json_atomically(path, settings)

    def _recover(self) -> None:
        names = os.listdir(self.output_dir)
        for name in names:
            if name.endswith(".tmp"):
                path = os.path.join(self.output_dir, name)
                if os.path.isdir(path):  # the Beam form's staging folder
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        shards = {os.path.basename(p)
                  for p in records.committed_shards(self.output_dir, self.split)}
        indices = [int(name.split("-")[-1].split(".")[0]) for name in shards]
        ledgered = set()
        for name in sorted(names):
            match = _LEDGER_RE.match(name)
            if not match or match.group("split") != self.split:
                continue
            index = int(match.group("index"))
            path = os.path.join(self.output_dir, name)
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
            shard = records.shard_name(self.split, index)
            if entry["record_ids"] and shard not in shards:
                os.remove(path)  # the shard never got committed: its examples are asked again
                continue
            ledgered.add(shard)
            indices.append(index)
            self._add(entry["record_ids"], entry["failures"], entry["counters"])
        unledgered = sorted(shards - ledgered)
        if unledgered:
            raise ValueError(
                f"{self.output_dir} holds shards no teacher ledger lists "
                f"({', '.join(unledgered[:3])}{' ...' if len(unledgered) > 3 else ''}): released "
                "or hand-made data. Teacher output goes to a folder of its own: use another "
                "--output_dir")
        self.next_index = max(indices, default=-1) + 1

    def _add(self, record_ids: list[str], failures: list[dict], counters: dict) -> None:
        duplicates = self.record_ids.intersection(record_ids)
        if duplicates:
            raise RuntimeError(f"{self.output_dir}: ids committed twice, e.g. "
                               f"{sorted(duplicates)[:3]}; the folder was edited by hand?")
        self.record_ids.update(record_ids)
        for failure in failures:
            self.failures[failure["id"]] = failure
        for record_id in record_ids:
            self.failures.pop(record_id, None)
        for key in COUNTERS:
            self.totals[key] += counters.get(key, 0)

    def is_done(self, example_id: str) -> bool:
        """True when the id has a record or failed for good."""
        failure = self.failures.get(example_id)
        return example_id in self.record_ids or (failure is not None and failure["final"])

    def commit(self, batch: Batch) -> None:
        """Commits a batch atomically: shard staged, ledger (with the shard's checksum) written,
        then the shard renamed into place (the commit point)."""
        if not len(batch):
            return
        staged = (records.stage_shard(batch.records, self.output_dir, self.split,
                                      self.next_index) if batch.records else None)
        self._commit(staged.tmp_path if staged else None, [r.id for r in batch.records],
                     staged.sha256 if staged else None, batch.failures, batch.counters)

    def commit_file(self, path: str) -> None:
        """Commits a complete shard file written elsewhere (the Beam sink's) the same way."""
        ids = [r.id for r in records.read_shard(path)]
        self._commit(path, ids, records.file_sha256(path), [], {})

    def _commit(self, shard_file: str | None, record_ids: list[str], sha256: str | None,
                failures: list[dict], counters: dict) -> None:
        index = self.next_index
        shard = records.shard_name(self.split, index) if shard_file else None
        entry = {"shard": shard, "record_ids": record_ids, "sha256": sha256,
                 "failures": failures, "counters": counters}
        name = f"{self.split}-{index:05d}.ledger.json"
        _write_json_atomically(os.path.join(self.output_dir, name), entry)
        if shard_file:
            os.replace(shard_file, os.path.join(self.output_dir, shard))
        self.next_index = index + 1
        self._add(record_ids, failures, counters)

    def write_stats(self, stats: dict) -> str:
        """`stats.json`: this split's stats at the top level; every split's summary (without
        the failure list, which its own run reported) under "splits"."""
        path = os.path.join(self.output_dir, STATS_FILE)
        splits = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                splits = json.load(f).get("splits", {})
        splits[self.split] = {k: v for k, v in stats.items() if k not in ("splits", "failures")}
        _write_json_atomically(path, {**stats, "splits": splits})
        return path
