"""The built-in synthetic reasoning dataset: 3-digit addition with per-digit rationales.

An input is two 3-digit numbers with their digits split by spaces, `3 4 7 + 2 5 9`; the label is
the sum written the same way, `6 0 6`; the rationale works column by column from the right,
`7 + 9 + 0 = 16 , write 6 carry 1 . 4 + 5 + 1 = 10 , write 0 carry 1 . 3 + 2 + 1 = 6 , write 6
carry 0 .` (and `write 1 .` for a final carry). Each rationale step is a one-digit fact the
model can learn, while predicting the whole sum directly needs the carries implicitly, so the
rationale is genuinely informative: this is where step-by-step distillation visibly helps a tiny
model (the quickstart shows it: step-by-step learns the sums that fine-tuning on the labels alone
does not).

Every problem belongs to exactly one split, fixed by a hash of its operands, so train, valid and
test never share a problem whatever seeds or sizes are asked for.
"""

from __future__ import annotations

import hashlib
import os
import random
import re

from sbs_jax.data import publish, records
from sbs_jax.data.records import Record

SPLIT_BUCKETS = {"test": range(10), "valid": range(10, 20), "train": range(20, 100)}
_INPUT_RE = re.compile(r"^\s*(\d(?: \d)*) \+ (\d(?: \d)*)\s*$")
_LOW, _HIGH = 100, 999
# Enough training problems for step-by-step to learn the carries on a tiny T5 from scratch.
DEFAULT_SIZES = {"train": 2000, "valid": 200, "test": 500}
VOCAB_SIZE = 512


def _spaced(number: int) -> str:
    return " ".join(str(number))


def format_input(a: int, b: int) -> str:
    """`a + b` with every digit separated by a space."""
    return f"{_spaced(a)} + {_spaced(b)}"


def split_of(a: int, b: int) -> str:
    """The split a problem belongs to (stable across runs and machines)."""
    bucket = int(hashlib.sha256(f"{a}+{b}".encode()).hexdigest()[:8], 16) % 100
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def solve(input_text: str) -> tuple[str, str]:
    """(rationale, label) for an input such as `3 4 7 + 2 5 9`; the rule-based teacher's answer.

    Raises ValueError naming the input when it is not two space-separated digit strings.
    """
    match = _INPUT_RE.match(input_text)
    if not match:
        raise ValueError(f"not a synthetic addition problem: {input_text!r}")
    left, right = (group.split(" ") for group in match.groups())
    width = max(len(left), len(right))
    left = ["0"] * (width - len(left)) + left
    right = ["0"] * (width - len(right)) + right
    steps, digits, carry = [], [], 0
    for x, y in zip(reversed(left), reversed(right)):
        total = int(x) + int(y) + carry
        digit, carry_out = total % 10, total // 10
        steps.append(f"{x} + {y} + {carry} = {total} , write {digit} carry {carry_out} .")
        digits.append(str(digit))
        carry = carry_out
    if carry:
        steps.append(f"write {carry} .")
        digits.append(str(carry))
    return " ".join(steps), " ".join(reversed(digits))


def generate(num_examples: int, seed: int, split: str) -> list[Record]:
    """`num_examples` distinct problems of `split`, drawn with `seed`, with gold label/rationale.

    The teacher fields equal the gold ones (`solve` is an exact teacher), so the records are
    ready for both the `_gt` and `_llm` tasks.
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_BUCKETS)}")
    capacity = round((_HIGH - _LOW + 1) ** 2 * len(SPLIT_BUCKETS[split]) / 100 * 0.9)
    if not 0 <= num_examples <= capacity:
        raise ValueError(f"num_examples must be in [0, {capacity}] for split {split!r}")
    rng = random.Random(f"sbs-synthetic/{seed}/{split}")
    seen: set[tuple[int, int]] = set()
    records = []
    while len(records) < num_examples:
        a, b = rng.randint(_LOW, _HIGH), rng.randint(_LOW, _HIGH)
        if (a, b) in seen or split_of(a, b) != split:
            continue
        seen.add((a, b))
        text = format_input(a, b)
        rationale, label = solve(text)
        records.append(
            Record(
                id=f"synthetic-{split}-{len(records):06d}",
                input=text,
                label=label,
                llm_label=label,
                rationale=rationale,
                source=f"synthetic/{split}",
                teacher="rules",
            )
        )
    return records


def write_dataset(directory: str, sizes: dict[str, int] | None = None, seed: int = 0) -> str:
    """Publishes every split as record shards plus `info.json`; returns `directory`."""
    sizes = sizes or DEFAULT_SIZES
    publish.publish(directory, "synthetic",
                    {split: generate(size, seed, split) for split, size in sizes.items()},
                    {"seed": seed, "generator": __name__})
    return directory


def vocabulary_texts(examples: list[Record]) -> list[str]:
    """The texts a synthetic vocabulary is trained on: prefixed inputs, rationales, labels."""
    texts = []
    for record in examples:
        texts += [f"predict: {record.input}", f"explain: {record.input}", record.rationale,
                  record.label]
    return texts


def ensure_dataset(data_dir: str, vocabulary_path: str | None = None) -> str:
    """Creates `{data_dir}/synthetic` (and the vocabulary, if a path is given) when absent.

    Safe when several processes race: creation runs under a file lock and the dataset counts
    as present only once its `info.json` (written last) exists. Returns the dataset folder.
    """
    directory = os.path.join(data_dir, "synthetic")
    info_path = os.path.join(directory, "info.json")
    needs_vocab = vocabulary_path is not None and not os.path.exists(vocabulary_path)
    if os.path.exists(info_path) and not needs_vocab:
        return directory
    os.makedirs(data_dir, exist_ok=True)
    with publish.locked(os.path.join(data_dir, ".synthetic.lock")):
        if not os.path.exists(info_path):
            write_dataset(directory)
        if vocabulary_path is not None and not os.path.exists(vocabulary_path):
            _train_vocabulary(records.read_split(directory, "train"), vocabulary_path)
    return directory


def _train_vocabulary(examples: list[Record], vocabulary_path: str) -> None:
    from sbs_jax.data.vocab import train_vocab

    if not vocabulary_path.endswith(".model"):
        raise ValueError(f"vocabulary path must end in .model: {vocabulary_path!r}")
    prefix = vocabulary_path[: -len(".model")]
    tmp_prefix = f"{prefix}.{os.getpid()}.tmp"
    trained = train_vocab(vocabulary_texts(examples), tmp_prefix, VOCAB_SIZE)
    os.replace(tmp_prefix + ".vocab", prefix + ".vocab")
    os.replace(trained, vocabulary_path)
