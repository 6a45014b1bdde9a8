"""What the teacher job reads: JSONL, our TFRecord shards, the released data, or synthetic problems.

`--input` may be
- a `.jsonl` file of {"id", "input", optional "label"} (NLI rows may give "premise" and
  "hypothesis" instead of "input");
- a `.tfrecord` shard, or a folder of `{split}-*.tfrecord` shards (our record schema);
- a released-data folder (the paper's `datasets/{ds}` layout), read by `sbs_jax.data.dss`;
- `synthetic:N` or `synthetic:N:SEED`: N built-in addition problems of `--split`.
Every example needs a unique id: resuming is keyed by it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from sbs_jax.data import dss, records, synthetic

NLI_DATASETS = ("esnli", "anli1")


@dataclass(frozen=True)
class TeacherInput:
    """One example to label: `input` as records store it, `label` gold or ""."""

    id: str
    input: str
    label: str = ""

    def prompt_fields(self, dataset: str) -> dict[str, str]:
        """The fields a prompt template substitutes: premise/hypothesis for NLI, else input."""
        if dataset in NLI_DATASETS:
            premise, hypothesis = dss.split_nli_input(self.input)
            return {"premise": premise, "hypothesis": hypothesis}
        return {"input": self.input}


def parse_jsonl_line(line: str, where: str) -> TeacherInput | None:
    """One JSONL line as an example (None for a blank line); errors name `where`."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or "id" not in row:
        raise ValueError(f"{where}: each line needs an object with an \"id\"")
    if "input" in row:
        text = row["input"]
    elif "premise" in row and "hypothesis" in row:
        text = dss.join_nli_input(row["premise"], row["hypothesis"])
    else:
        raise ValueError(f"{where}: needs \"input\" (or \"premise\" and \"hypothesis\")")
    if not isinstance(text, str) or not text:
        raise ValueError(f"{where}: \"input\" must be a non-empty string")
    label = row.get("label")
    return TeacherInput(str(row["id"]), text, "" if label is None else str(label))


def _from_jsonl(path: str) -> list[TeacherInput]:
    lines, undecodable = dss.decode_lines(path)  # "\n" only: U+2028 may sit inside a string
    if undecodable:
        raise ValueError(dss.describe_problems(list(undecodable.values())))
    examples = [parse_jsonl_line(line, f"{path}:{number}") for number, line in enumerate(lines, 1)]
    return [example for example in examples if example is not None]


def _from_records(items: list[records.Record]) -> list[TeacherInput]:
    return [TeacherInput(r.id, r.input, r.label) for r in items]


def _from_synthetic(spec: str, split: str) -> list[TeacherInput]:
    parts = spec.split(":")[1:]
    try:
        count = int(parts[0])
        seed = int(parts[1]) if len(parts) > 1 else 0
    except (IndexError, ValueError):
        raise ValueError(f"--input {spec!r}: expected synthetic:N or synthetic:N:SEED") from None
    return _from_records(synthetic.generate(count, seed, split))


def read_inputs(path: str, dataset: str, split: str) -> list[TeacherInput]:
    """The examples of `path` (see the module docstring); errors name the file and record."""
    if path.startswith("synthetic:"):
        examples = _from_synthetic(path, split)
    elif os.path.isfile(path) and path.endswith(".tfrecord"):
        examples = _from_records(list(records.read_shard(path)))
    elif os.path.isfile(path):
        examples = _from_jsonl(path)
    elif os.path.isdir(path) and records.committed_shards(path, split):
        examples = _from_records(records.read_split(path, split))
    elif os.path.isdir(path):
        examples = _from_records(_released_split(path, dataset, split))
    else:
        raise FileNotFoundError(f"--input {path!r}: no such file or folder")
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise ValueError(f"--input {path!r}: id {example.id!r} occurs more than once")
        seen.add(example.id)
    return examples


def _released_split(path: str, dataset: str, split: str) -> list[records.Record]:
    """Gold rows of a released-data folder: the `datasets/` root or its `{dataset}/` folder.

    Only id, input and gold label are used: the released completions are not this teacher's.
    """
    root = path if os.path.isdir(os.path.join(path, dataset)) else os.path.dirname(
        os.path.normpath(path))
    if dataset not in dss.DSS_DATASETS:
        raise ValueError(f"--input {path!r}: {dataset} has no released data; use "
                         "synthetic:N or a JSONL file")
    return dss.read_split(root, dataset, split).records
