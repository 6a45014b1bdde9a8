"""Readers and input templates for the data released with the paper (esnli, anli1, cqa, svamp).

Input formatting follows the reference method:
- NLI (esnli, anli1): premise, the EOS token, hypothesis. A record's `input` holds
  `premise</s>hypothesis`; the SeqIO tasks turn the separator into the EOS *token id* (never the
  text "</s>"), as the reference joins the two with the tokenizer's EOS.
- cqa: the question, a newline, "Answer Choices:", then one line per choice "(a) ..." .. "(e) ...".
- svamp: the `input` field (Body + "\\n" + Question) as released.
Labels: NLI label names; cqa the answer text; svamp the equation string such as `( 84.0 / 2.0 )`.
Gold labels must lie in the label space (NLI 0/1/2, a cqa choice, an arithmetic expression);
teacher labels are kept as parsed (the reference does not normalise them).
Record ids: `esnli-{split}-{row}`, `anli1-{uid}`, `cqa-{id}`, `svamp-{split}-{row}`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from sbs_jax.data.parse import parse_completion
from sbs_jax.data.records import Record
from sbs_jax.infer.metrics import safe_arithmetic

NLI_SEPARATOR = "</s>"
NLI_LABELS = ("entailment", "neutral", "contradiction")


def join_nli_input(premise: str, hypothesis: str) -> str:
    """The record input of an NLI example."""
    return f"{premise}{NLI_SEPARATOR}{hypothesis}"


def split_nli_input(text: str) -> tuple[str, str]:
    """(premise, hypothesis) of an NLI record input (for prompts and display)."""
    premise, separator, hypothesis = text.partition(NLI_SEPARATOR)
    if not separator:
        raise ValueError(f"NLI input lacks the {NLI_SEPARATOR!r} separator: {text[:80]!r}")
    return premise, hypothesis


def format_cqa_input(question: str, choices: list[str]) -> str:
    """Question, newline, "Answer Choices:", then "(a) choice" lines."""
    lines = [question, "Answer Choices:"]
    lines += [f"({chr(ord('a') + i)}) {choice}" for i, choice in enumerate(choices)]
    return "\n".join(lines)


DSS_DATASETS = ("esnli", "anli1", "cqa", "svamp")
# Splits each dataset ships as files; cqa and svamp have no valid file (see `carve_valid`).
RELEASED_SPLITS = {"esnli": ("train", "valid", "test"), "anli1": ("train", "valid", "test"),
                   "cqa": ("train", "test"), "svamp": ("train", "test")}
VALID_FRACTION, VALID_SEED = 0.1, 0
TEACHER_NAME = "PaLM-540B (released completions)"

MISSING_TRAIN_HELP = {
    "esnli": "the public e-SNLI train split (549,367 rows, original order; e.g. the `esnli` "
             "dataset's train split) as JSON Lines with keys premise, hypothesis, label "
             "(0 entailment, 1 neutral, 2 contradiction)",
    "anli1": "the public ANLI round-1 train split `train_r1` (16,946 rows, original order) as "
             "JSON Lines with keys uid, premise, hypothesis, label (0 entailment, 1 neutral, "
             "2 contradiction)",
}


class DataError(ValueError):
    """A bad input record; the message names the file and line."""


@dataclass
class SplitData:
    """One released split: records (teacher fields filled when completions exist) + counts."""

    dataset: str
    split: str
    records: list[Record]
    has_completions: bool
    skipped: list[str] = field(default_factory=list)

    @property
    def parse_failures(self) -> int:
        """Completions from which no label could be parsed."""
        return sum(1 for r in self.records if r.raw_completion and not r.llm_label)

    @property
    def empty_rationales(self) -> int:
        return sum(1 for r in self.records if r.raw_completion and not r.rationale.strip())


def gold_path(root: str, dataset: str, split: str) -> str:
    return os.path.join(root, dataset, f"{dataset}_{split}.json")


def completion_paths(root: str, dataset: str, split: str) -> list[str]:
    """`{split}_CoT_{i}.json` files in index order (numeric: 10 after 9)."""
    directory = os.path.join(root, dataset, "llm")
    if not os.path.isdir(directory):
        return []
    pattern = re.compile(rf"^{split}_CoT_(\d+)\.json$")
    found = [(int(m.group(1)), name) for name in os.listdir(directory)
             if (m := pattern.match(name))]
    return [os.path.join(directory, name) for _, name in sorted(found)]


def read_completions(root: str, dataset: str, split: str) -> list[str] | None:
    """The teacher completions of a split, concatenated in file order; None when absent."""
    paths = completion_paths(root, dataset, split)
    if not paths:
        return None
    completions: list[str] = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 (byte {data[error.start]:#04x} at "
                            f"offset {error.start})") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
            raise DataError(f"{path}: expected one JSON array of completion strings")
        completions.extend(items)
    return completions


def missing_train_message(root: str, dataset: str) -> str:
    return (f"{dataset} train inputs are not in the released data: place "
            f"{MISSING_TRAIN_HELP[dataset]} at {gold_path(root, dataset, 'train')}. "
            "The released teacher completions are aligned with it by row.")


def decode_lines(path: str) -> tuple[list[str], dict[int, str]]:
    """The lines of a UTF-8 text file and, by 0-based index, why some could not be decoded.

    Lines end at "\n" only (a trailing "\r" is dropped): U+2028 and the other characters
    `str.splitlines` also breaks at are legal inside a JSON string. An undecodable line is ""
    in the list, with a message naming `path:LINE` and the offending byte.
    """
    with open(path, "rb") as f:
        data = f.read()
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines, problems = [], {}
    for index, line in enumerate(raw):
        try:
            lines.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as error:
            lines.append("")
            problems[index] = (f"{path}:{index + 1}: not valid UTF-8 (byte "
                               f"{line[error.start]:#04x} at column {error.start + 1})")
    return lines, problems


def _require(row: dict, types: dict[str, type | tuple[type, ...]], where: str) -> None:
    """Every key present with a value of its type (the error names key, value and type)."""
    missing = [k for k in types if k not in row]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    for key, kind in types.items():
        value = row[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise DataError(f"{where}: {key!r} is {type(value).__name__} {value!r}, expected "
                            f"{names}")


def _nli_record(dataset: str, split: str, row: dict, index: int, where: str) -> Record:
    _require(row, {"premise": str, "hypothesis": str, "label": int}, where)
    if "uid" in row:
        _require(row, {"uid": str}, where)
    premise, hypothesis = row["premise"], row["hypothesis"]
    if not premise.strip() or not hypothesis.strip():
        raise DataError(f"{where}: empty premise or hypothesis")
    label = row["label"]
    if label not in (0, 1, 2):
        raise DataError(f"{where}: label {label!r} is not 0, 1 or 2 ({', '.join(NLI_LABELS)})")
    example_id = f"{dataset}-{row['uid']}" if row.get("uid") else f"{dataset}-{split}-{index:06d}"
    return Record(id=example_id, input=join_nli_input(premise, hypothesis),
                  label=NLI_LABELS[label], source=f"{dataset}/{split}")


def _cqa_record(split: str, row: dict, index: int, where: str) -> Record:
    _require(row, {"id": str, "question": str, "choices": list, "answer": str}, where)
    choices = row["choices"]
    if len(choices) != 5 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: expected 5 choices (strings), got {choices!r}")
    if not row["question"].strip():
        raise DataError(f"{where}: empty question")
    if row["answer"] not in choices:
        raise DataError(f"{where}: answer {row['answer']!r} is not one of the choices {choices}")
    return Record(id=f"cqa-{row['id']}", input=format_cqa_input(row["question"], choices),
                  label=row["answer"], source=f"cqa/{split}")


def _svamp_record(split: str, row: dict, index: int, where: str) -> Record:
    _require(row, {"input": str, "label": str}, where)
    if not row["input"].strip():
        raise DataError(f"{where}: empty input")
    if safe_arithmetic(row["label"]) is None:
        raise DataError(f"{where}: label {row['label']!r} is not an arithmetic expression")
    return Record(id=f"svamp-{split}-{index:04d}", input=row["input"], label=row["label"],
                  source=f"svamp/{split}")


def _gold_record(dataset: str, split: str, row: dict, index: int, where: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if dataset in ("esnli", "anli1"):
        return _nli_record(dataset, split, row, index, where)
    if dataset == "cqa":
        return _cqa_record(split, row, index, where)
    return _svamp_record(split, row, index, where)


def read_split(root: str, dataset: str, split: str, skip_bad: bool = False) -> SplitData:
    """Gold rows of a released split joined row by row with the teacher's parsed completions.

    Raises FileNotFoundError (saying which public split to place where) when the gold file is
    missing, and one DataError naming file and line of every bad row (wrong types, not UTF-8,
    a repeated id, ...) unless `skip_bad`: then bad rows are left out and listed in `skipped`
    (their completions too, so rows stay aligned).
    """
    if dataset not in DSS_DATASETS or split not in RELEASED_SPLITS[dataset]:
        raise ValueError(f"no released split {dataset}/{split}")
    path = gold_path(root, dataset, split)
    if not os.path.exists(path):
        if split == "train" and dataset in MISSING_TRAIN_HELP:
            raise FileNotFoundError(missing_train_message(root, dataset))
        raise FileNotFoundError(f"released data file not found: {path}")
    completions = read_completions(root, dataset, split)
    records: list[Record] = []
    problems: list[str] = []
    lines, undecodable = decode_lines(path)
    if completions is not None and len(completions) != len(lines):
        raise DataError(f"{path} has {len(lines)} rows but the teacher completions "
                        f"{completion_paths(root, dataset, split)} hold {len(completions)}")
    first_line: dict[str, int] = {}
    for index, line in enumerate(lines):
        where = f"{path}:{index + 1}"
        try:
            if index in undecodable:
                raise DataError(undecodable[index])
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: malformed JSON ({error.msg})") from None
            record = _gold_record(dataset, split, row, index, where)
            if record.id in first_line:
                raise DataError(f"{where}: id {record.id!r} already at line "
                                f"{first_line[record.id]}")
        except DataError as error:
            problems.append(str(error))
            continue
        first_line[record.id] = index + 1
        if completions is not None:
            parsed = parse_completion(dataset, completions[index])
            record = record.replace(llm_label=parsed.label or "", rationale=parsed.rationale,
                                    teacher=TEACHER_NAME, raw_completion=completions[index])
        records.append(record)
    if problems and not skip_bad:
        raise DataError(describe_problems(problems))
    return SplitData(dataset, split, records, completions is not None, problems)


def describe_problems(problems: list[str], limit: int = 20) -> str:
    """One message for every bad row (the first `limit` shown, each naming FILE:LINE)."""
    if len(problems) == 1:
        return problems[0]
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return (f"{len(problems)} bad rows (fix them, or pass --skip_bad to leave them out):"
            f"\n  {shown}{more}")


def carve_valid(train: list[Record], fraction: float = VALID_FRACTION,
                seed: int = VALID_SEED) -> tuple[list[Record], list[Record]]:
    """(train, valid) for cqa/svamp: a fixed seeded carve of ceil(fraction * n) full-train rows.

    The reference splits after subsampling; we carve once from the full split so that data
    fractions of the remaining train rows can be nested (smaller subsets inside larger ones).
    Sizes match the reference at 100%: cqa 8,766 / 975, svamp 720 / 80.
    """
    order = np.random.default_rng(seed).permutation(len(train))
    valid_rows = set(order[: math.ceil(fraction * len(train))].tolist())
    kept = [r for i, r in enumerate(train) if i not in valid_rows]
    valid = [r for i, r in enumerate(train) if i in valid_rows]
    return kept, valid
