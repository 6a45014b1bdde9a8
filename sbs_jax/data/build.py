"""Released data (or the built-in synthetic set) -> sharded TFRecord datasets + info.json.

`python -m sbs_jax.data.build --source_dir ../shared/dss_data --data_dir DATA --dataset cqa`
publishes `DATA/cqa/` = `{train,valid,test}-NNNNN.tfrecord` in the record schema
(sbs_jax.data.records) plus `info.json` (counts per split, shard names, sizes, SHA-256
checksums, parse failures, skipped rows, the vocabulary's checksum), and makes sure
`DATA/spiece.model`, the vocabulary the tasks read by default, exists: `--vocab PATH` copies a
given SentencePiece model there (a HF T5 `spiece.model`, say); otherwise, when there is none yet,
one is trained on the built train splits (`--vocab_size`, default 2000; `--no_vocab` skips it).

cqa and svamp have no released valid split: it is carved once from the full train split (seed
0, 10%; see dss.carve_valid). Every row of every requested split is read and checked (types,
UTF-8, unique ids; each problem named FILE:LINE) before anything is written. The folder is then
written aside and published with one rename (sbs_jax.data.publish), so a failed or killed build
leaves the previous folder as it was and readers never see a partial dataset. Splits not asked
for are kept from the previous build.
"""

from __future__ import annotations

import os
import random
import shutil

from sbs_jax.data import dss, publish, records, synthetic
from sbs_jax.runtime import console

ALL_DATASETS = dss.DSS_DATASETS + ("synthetic",)
VOCAB_FILE = "spiece.model"
DEFAULT_VOCAB_SIZE = 2000
# Sentences a vocabulary is trained on at most (a seeded sample beyond that, as sentencepiece's
# own `input_sentence_size` would take): e-SNLI's train split alone has 2 million.
MAX_VOCAB_TEXTS = 400_000


def _needed_released_splits(dataset: str, splits: list[str]) -> list[str]:
    """Released files behind our splits (valid of cqa/svamp comes from train)."""
    released = dss.RELEASED_SPLITS[dataset]
    return sorted({s if s in released else "train" for s in splits}, key=records.SPLITS.index)


def _check_records(dataset: str, by_split: dict[str, list[records.Record]]) -> None:
    """Ids unique across splits and every field a string (what the schema can hold)."""
    seen: dict[str, str] = {}
    for split, recs in by_split.items():
        for record in recs:
            if record.id in seen:
                raise dss.DataError(f"{dataset}: duplicate id {record.id!r} in {seen[record.id]} "
                                    f"and {split}")
            seen[record.id] = split
            records.check_record(record, f"{dataset}/{split}")


def prepare(source_dir: str | None, dataset: str, splits: list[str], skip_bad: bool = False,
            allow_missing_teacher: bool = False
            ) -> tuple[dict[str, list[records.Record]], dict]:
    """Reads and checks the requested splits; returns records per split and info extras.

    Every bad row of every split is reported at once (dss.DataError) unless `skip_bad`. A split
    without teacher completions is an error unless `allow_missing_teacher` (its records then
    have empty teacher fields: fine for `_gt` / `_standard_gt` tasks only).
    """
    if dataset == "synthetic":
        by_split = {s: synthetic.generate(synthetic.DEFAULT_SIZES[s], 0, s) for s in splits}
        return by_split, {"seed": 0, "generator": synthetic.__name__}
    loaded = {}
    problems: list[str] = []
    for released in _needed_released_splits(dataset, splits):
        try:
            loaded[released] = dss.read_split(source_dir, dataset, released, skip_bad=True)
        except FileNotFoundError as error:
            hint = ""
            if released == "train" and "train" in splits:
                others = [s for s in splits if s != "train" and s in dss.RELEASED_SPLITS[dataset]]
                hint = f" Or build the other splits only: --splits {' '.join(others)}."
            raise FileNotFoundError(f"cannot build {dataset}/{released}: {error}{hint}") from None
        problems += loaded[released].skipped
        if not loaded[released].has_completions and not allow_missing_teacher:
            raise FileNotFoundError(
                f"cannot build {dataset}/{released}: no teacher completions "
                f"{os.path.join(source_dir, dataset, 'llm', released + '_CoT_*.json')}. Run the "
                "teacher job (sbs-teacher) on these inputs instead, or pass "
                "--allow_missing_teacher to build gold-label-only records.")
    if problems and not skip_bad:
        raise dss.DataError(dss.describe_problems(problems))
    by_split: dict[str, list[records.Record]] = {}
    for split in splits:
        if split in dss.RELEASED_SPLITS[dataset]:
            by_split[split] = loaded[split].records
    if "train" in loaded and "valid" not in dss.RELEASED_SPLITS[dataset]:
        train, valid = dss.carve_valid(loaded["train"].records)
        if "train" in splits:
            by_split["train"] = train
        if "valid" in splits:
            by_split["valid"] = [r.replace(source=f"{dataset}/valid (carved from train)")
                                 for r in valid]
    _check_records(dataset, by_split)
    extras = {
        "source_dir": os.path.abspath(source_dir),
        "released": {s: {"rows": len(d.records), "parse_failures": d.parse_failures,
                         "empty_rationales": d.empty_rationales, "skipped": d.skipped}
                     for s, d in loaded.items()},
    }
    if "valid" not in dss.RELEASED_SPLITS[dataset]:
        extras["valid_carve"] = {"fraction": dss.VALID_FRACTION, "seed": dss.VALID_SEED}
    return by_split, extras


def vocabulary_texts(train_records: list[records.Record]) -> list[str]:
    """What a data folder's vocabulary is trained on (at most MAX_VOCAB_TEXTS, seeded sample)."""
    texts = synthetic.vocabulary_texts(train_records)
    if len(texts) > MAX_VOCAB_TEXTS:
        texts = random.Random(0).sample(texts, MAX_VOCAB_TEXTS)
    return texts


def ensure_vocabulary(data_dir: str, train_records: list[records.Record],
                      vocab: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
                      ) -> str | None:
    """`{data_dir}/spiece.model`: copied from `vocab`, kept when it exists, else trained on
    `train_records` (None, with a note, when there are none). Returns its path. A different
    model already there is an error (datasets built with it would silently change vocabulary)."""
    from sbs_jax.data.vocab import train_vocab

    target = os.path.join(data_dir, VOCAB_FILE)
    os.makedirs(data_dir, exist_ok=True)
    with publish.locked(os.path.join(data_dir, ".vocab.lock")):
        for name in os.listdir(data_dir):
            if name.startswith("spiece.") and ".tmp" in name:  # a killed copy or training
                os.remove(os.path.join(data_dir, name))
        if vocab is not None:
            if not os.path.isfile(vocab):
                raise FileNotFoundError(f"--vocab {vocab}: no such file")
            if os.path.exists(target):
                if records.file_sha256(target) != records.file_sha256(vocab):
                    raise FileExistsError(
                        f"{target} exists and differs from --vocab {vocab}: the datasets of "
                        f"{data_dir} were built with it. Use another --data_dir, or remove it.")
                return target
            tmp = f"{target}.{os.getpid()}.tmp"
            shutil.copyfile(vocab, tmp)
            os.replace(tmp, target)
            return target
        if os.path.exists(target):
            return target
        texts = vocabulary_texts(train_records)
        if not texts:
            console.say(f"note: no vocabulary made: no train split was built to train {target} "
                        "on (pass --vocab PATH, or build a train split)")
            return None
        console.say(f"training a {vocab_size}-piece vocabulary on {len(texts)} texts: {target}")
        prefix = os.path.join(data_dir, f"spiece.{os.getpid()}.tmp")
        trained = train_vocab(texts, prefix, vocab_size)
        os.replace(f"{prefix}.vocab", os.path.join(data_dir, "spiece.vocab"))
        os.replace(trained, target)
        return target


def build(source_dir: str | None, data_dir: str, dataset: str, splits: list[str] | None = None,
          records_per_shard: int = 50_000, skip_bad: bool = False,
          allow_missing_teacher: bool = False, vocab: str | None = None,
          vocab_size: int | None = None) -> str:
    """Builds and publishes one dataset folder under `data_dir`; returns its info.json path.

    With `vocab` (a path) or `vocab_size`, also makes `{data_dir}/spiece.model` (see
    `ensure_vocabulary`) and pins its checksum in info.json.
    """
    return build_all(source_dir, data_dir, [dataset], splits, records_per_shard, skip_bad,
                     allow_missing_teacher, vocab, vocab_size)[0]


def build_all(source_dir: str | None, data_dir: str, datasets: list[str],
              splits: list[str] | None = None, records_per_shard: int = 50_000,
              skip_bad: bool = False, allow_missing_teacher: bool = False,
              vocab: str | None = None, vocab_size: int | None = None) -> list[str]:
    """Checks every dataset, makes the vocabulary, then publishes each; info.json paths."""
    splits = list(splits or records.SPLITS)
    prepared = {d: prepare(source_dir, d, splits, skip_bad, allow_missing_teacher)
                for d in datasets}
    for dataset in datasets:
        publish.refuse_foreign(os.path.join(data_dir, dataset))
    pin = {}
    if vocab is not None or vocab_size is not None:
        train = [r for by_split, _ in prepared.values() for r in by_split.get("train", [])]
        path = ensure_vocabulary(data_dir, train, vocab, vocab_size or DEFAULT_VOCAB_SIZE)
        if path is not None:
            pin = {"vocabulary": {"path": os.path.join("..", VOCAB_FILE),
                                  "sha256": records.file_sha256(path)}}
    return [publish.publish(os.path.join(data_dir, dataset), dataset, by_split,
                            {**extras, **pin}, records_per_shard)
            for dataset, (by_split, extras) in prepared.items()]


if __name__ == "__main__":  # `python -m sbs_jax.data.build`: runs sbs_jax.cli.build_data
    import sys

    from sbs_jax.cli import build_data

    sys.exit(build_data.main())
