"""What a MODEL_DIR keeps besides checkpoints, so that eval, infer and convert need nothing else.

    run_config.json    the resolved RunConfig: tasks, model name and overrides, caps, mesh
    model_config.json  the T5Config the checkpoints hold
    spiece.model       a copy of the run's SentencePiece vocabulary
    data_config.json   {"data_dir", "vocabulary": {"file", "sha256", "source"},
                        "seqio_cache_dirs" (a USE_CACHED_TASKS run's --seqio_additional_cache_dirs)}

The vocabulary is pinned by content: a run restarted, evaluated or exported uses its copy, never
the data folder's default spiece.model (which may have been rebuilt or be a stale cache), and a
different file named by SBS_VOCAB, gin `tasks.data_config.vocabulary_path` or
INITIAL_CHECKPOINT_PATH is refused with both paths and hashes named, instead of decoding with
pieces the model never saw. `run_bindings` turns run_config.json back into gin
bindings, so `--model_dir DIR` alone configures eval and infer as the run was configured.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from etils import epath

from sbs_jax.data.records import file_sha256
from sbs_jax.train import run_config

if TYPE_CHECKING:
    from sbs_jax.models import T5Config

VOCAB_FILE = "spiece.model"
MODEL_CONFIG_FILE = "model_config.json"
DATA_CONFIG_FILE = "data_config.json"
# What a run was trained on, as eval and infer read it: with --gin_file flags these still come
# from MODEL_DIR (the gin files' other values, e.g. a mesh for other hardware, are kept).
RUN_IDENTITY = ("mixture_or_task_name", "rationale_mixture_name", "model_name",
                "model_overrides", "task_feature_lengths")


class VocabularyError(ValueError):
    """Two vocabularies that must be one file differ; the message names both and their hashes."""


def _short(sha: str) -> str:
    return sha[:12]


def check_same_vocabulary(first: tuple[str, str], second: tuple[str, str]) -> None:
    """Raises VocabularyError unless the two (description, path) files have the same bytes."""
    (what_a, path_a), (what_b, path_b) = first, second
    sha_a, sha_b = file_sha256(path_a), file_sha256(path_b)
    if sha_a != sha_b:
        raise VocabularyError(
            f"{what_a} {path_a} (sha256 {_short(sha_a)}) and {what_b} {path_b} (sha256 "
            f"{_short(sha_b)}) are different vocabularies; a run has one: unset or correct the "
            "second")


def read_data_config(model_dir: str) -> dict | None:
    path = epath.Path(model_dir) / DATA_CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def run_vocabulary(model_dir: str) -> str | None:
    """MODEL_DIR's pinned vocabulary copy (checked against its recorded hash), or None for a
    run that recorded none."""
    record = read_data_config(model_dir) or {}
    pinned = record.get("vocabulary")
    if not pinned:
        return None
    path = epath.Path(model_dir) / pinned.get("file", VOCAB_FILE)
    if not path.exists():
        raise VocabularyError(f"{epath.Path(model_dir) / DATA_CONFIG_FILE} pins the vocabulary "
                              f"sha256 {_short(pinned['sha256'])} but {path} is missing")
    sha = file_sha256(path)
    if sha != pinned["sha256"]:
        raise VocabularyError(f"{path} (sha256 {_short(sha)}) is not the vocabulary the run "
                              f"recorded (sha256 {_short(pinned['sha256'])}, from "
                              f"{pinned.get('source')})")
    return str(path)


def checkpoint_vocabulary(path: str) -> str | None:
    """The vocabulary that goes with INITIAL_CHECKPOINT_PATH: a HF folder's spiece.model, or the
    pinned copy of one of our MODEL_DIRs; None when it has none."""
    folder = epath.Path(path)
    if (folder / "config.json").exists():
        return str(folder / VOCAB_FILE) if (folder / VOCAB_FILE).exists() else None
    return run_vocabulary(path)


NAMED = "the task vocabulary (SBS_VOCAB / tasks.data_config.vocabulary_path)"


def _agree(sources: list[tuple[str, str]]) -> str | None:
    """The first (description, path) source's path, after checking every other one, and the
    vocabulary named by SBS_VOCAB / gin, has the same bytes. None when there is no source."""
    from tasks import config as tasks_config

    named = tasks_config.named_vocabulary_path()
    if named and sources and not os.path.exists(named):
        raise VocabularyError(f"{NAMED} {named} does not exist; {sources[0][0]} {sources[0][1]}")
    if named:
        sources = [*sources, (NAMED, named)]
    for other in sources[1:]:
        check_same_vocabulary(sources[0], other)
    return sources[0][1] if sources else None


def choose_training_vocabulary(model_dir: str, initial_checkpoint_path: str | None
                               ) -> tuple[str | None, str | None]:
    """Points the tasks at the vocabulary a training run must use; returns it (None: the tasks'
    usual resolution applies) and INITIAL_CHECKPOINT_PATH's own vocabulary (None: it has none,
    or there is no such path). Call inside `tasks.config.overrides_restored()`.

    First the run's own pinned copy (a restart), then INITIAL_CHECKPOINT_PATH's vocabulary (so a
    HF t5-v1_1 folder brings its spiece.model). A vocabulary named by SBS_VOCAB or gin must have
    the same bytes as each of them.
    """
    from tasks import config as tasks_config

    sources = []
    pinned = run_vocabulary(model_dir)
    if pinned:
        sources.append((f"MODEL_DIR={model_dir} was trained with", pinned))
    initial = checkpoint_vocabulary(initial_checkpoint_path) if initial_checkpoint_path else None
    if initial:
        sources.append((f"INITIAL_CHECKPOINT_PATH={initial_checkpoint_path} comes with", initial))
    chosen = _agree(sources)
    if chosen:
        tasks_config.set_vocabulary_path(chosen)
    return chosen, initial


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def pin(model_dir: str, vocabulary_path: str | None, data_dir: str | None,
        seqio_cache_dirs: Sequence[str] = ()) -> None:
    """(Lead process.) Copies the run's vocabulary into MODEL_DIR, readable by all, and records
    its hash, the data folder and the seqio cache folders it read in data_config.json."""
    directory = epath.Path(model_dir)
    record: dict = {"data_dir": _absolute(data_dir) if data_dir else data_dir}
    if seqio_cache_dirs:
        record["seqio_cache_dirs"] = [_absolute(d) for d in seqio_cache_dirs]
    if vocabulary_path:
        sha = file_sha256(vocabulary_path)
        target = directory / VOCAB_FILE
        if not target.exists() or file_sha256(target) != sha:
            tmp = directory / (VOCAB_FILE + ".tmp")
            epath.Path(vocabulary_path).copy(tmp, overwrite=True)
            if "://" not in str(tmp):
                os.chmod(tmp, 0o644)
            tmp.replace(target)
        earlier = (read_data_config(model_dir) or {}).get("vocabulary") or {}
        if earlier.get("sha256") == sha:  # a restart: the copy is the source now; keep the first
            vocabulary_path = earlier.get("source", vocabulary_path)
        record["vocabulary"] = {"file": VOCAB_FILE, "sha256": sha, "source": vocabulary_path}
    run_config.write_text(directory / DATA_CONFIG_FILE, json.dumps(record, indent=1) + "\n")


def use_run_data(model_dir: str) -> list[str]:
    """Points the tasks at MODEL_DIR's vocabulary and data folder for eval / infer (call inside
    `tasks.config.overrides_restored()`); returns notes for the console.

    The vocabulary is always the run's; one named by SBS_VOCAB or gin must have its bytes. The
    data folder is a gin `tasks.data_config.data_dir` binding, else the run's (while it exists),
    else the usual SBS_DATA_DIR / default. A USE_CACHED_TASKS run's seqio cache folders are
    searched unless --seqio_additional_cache_dirs named some.
    """
    import seqio

    from tasks import config as tasks_config

    record = read_data_config(model_dir)
    if record is None:
        note = (f"{model_dir} records no vocabulary or data folder ({DATA_CONFIG_FILE}): using "
                "the tasks' own (SBS_VOCAB / SBS_DATA_DIR / gin tasks.data_config)")
        return [note]
    notes = []
    pinned = run_vocabulary(model_dir)
    if pinned:
        tasks_config.set_vocabulary_path(
            _agree([(f"MODEL_DIR={model_dir} was trained with", pinned)]))
    recorded = record.get("data_dir")
    if recorded and not tasks_config.named_data_dir():
        if epath.Path(recorded).exists():
            env = os.environ.get("SBS_DATA_DIR")
            if env and os.path.abspath(env) != recorded:
                notes.append(f"data folder: the run's {recorded} (SBS_DATA_DIR={env} ignored; "
                             "bind tasks.data_config.data_dir to choose another)")
            tasks_config.set_data_dir(recorded)
        else:
            notes.append(f"the run's data folder {recorded} is gone: reading "
                         f"{tasks_config.data_dir()}")
    cache_dirs = record.get("seqio_cache_dirs")
    if cache_dirs and not seqio.get_global_cache_dirs():
        notes.append(f"seqio cache: the run's {', '.join(cache_dirs)} (USE_CACHED_TASKS; "
                     "--seqio_additional_cache_dirs chooses others)")
        seqio.add_global_cache_dirs(cache_dirs)
    return notes


def _gin_value(value) -> str:
    """A gin literal for a run_config.json value (JSON lists back to the tuples gin expects)."""
    if isinstance(value, list):
        value = tuple(value)
    return repr(value)


def run_bindings(model_dir: str, identity_only: bool) -> list[str]:
    """Gin bindings that give RunConfig the values saved in MODEL_DIR/run_config.json (every
    field, or with `identity_only` the RUN_IDENTITY ones). Fields bound to a macro in the parsed
    gin config set that macro, so a later `--gin.NAME=...` still overrides them. [] when
    MODEL_DIR has no record."""
    import gin

    path = epath.Path(model_dir) / run_config.CONFIG_FILE
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(run_config.RunConfig)}
    bindings = []
    for name, value in sorted(saved.items()):
        if name not in fields or name == "model_dir":
            continue
        if identity_only and name not in RUN_IDENTITY:
            continue
        try:
            current = str(gin.query_parameter(f"RunConfig.{name}"))
        except ValueError:
            current = ""
        if current.startswith("%"):
            bindings += [f"{current[1:]} = {_gin_value(value)}",
                         f"RunConfig.{name} = {current}"]
        else:
            bindings.append(f"RunConfig.{name} = {_gin_value(value)}")
    return bindings


def base_config(model_dir: str, model_name: str | None) -> T5Config:
    """The architecture of MODEL_DIR before sizes are read from its parameters
    (`models.config_from_params`): model_config.json, else run_config.json's model_name and
    overrides, else `model_name`."""
    from sbs_jax import models  # imports jax: only where a config is made

    directory = epath.Path(model_dir)
    if (directory / MODEL_CONFIG_FILE).exists():
        path = directory / MODEL_CONFIG_FILE
        return models.config_from_json(path.read_text(), str(path))
    overrides: dict[str, Any] = {}
    if model_name is None and (directory / run_config.CONFIG_FILE).exists():
        run = json.loads((directory / run_config.CONFIG_FILE).read_text())
        model_name, overrides = run.get("model_name"), dict(run.get("model_overrides") or {})
    if model_name is None:
        raise ValueError(f"{model_dir}: no {MODEL_CONFIG_FILE} or {run_config.CONFIG_FILE}; "
                         "pass --model_name (e.g. t5_1_1_small) to say which architecture it holds")
    overrides.pop("vocab_size", None)
    return models.get_config(model_name, **overrides)
