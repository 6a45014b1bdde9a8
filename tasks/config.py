"""Where the tasks find their data folder and vocabulary, resolved when a task is read.

`import tasks` must not touch files, gin or the network, so nothing here is looked up at import.
Data folder, first match wins: `set_data_dir(...)`, gin `tasks.data_config.data_dir`, env
`SBS_DATA_DIR`, else `~/.cache/sbs_jax/data`. Vocabulary (a SentencePiece `.model`: a HF T5
`spiece.model` or one trained by `sbs_jax.data.vocab.train_vocab`): `set_vocabulary_path(...)`, gin
`tasks.data_config.vocabulary_path`, env `SBS_VOCAB`, else `{data folder}/spiece.model`. The
synthetic tasks create their data, and that default vocabulary, the first time they are read.
A dataset folder whose info.json pins a vocabulary (`sbs_jax.data.build` records its sha256) is
read only with that vocabulary (`check_pinned_vocabulary`, called by the record source).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import seqio

import gin
from sbs_jax.data import records, synthetic, verify

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sbs_jax", "data")
_overrides: dict[str, str | None] = {"data_dir": None, "vocabulary_path": None}


@gin.configurable("data_config", module="tasks")
def data_config(data_dir: str | None = None, vocabulary_path: str | None = None) -> dict:
    """Gin hook: bind `tasks.data_config.data_dir` / `.vocabulary_path` in a gin file."""
    return {"data_dir": data_dir, "vocabulary_path": vocabulary_path}


def set_data_dir(path: str | None) -> None:
    """Overrides the data folder for this process (None: fall back to gin / env)."""
    _overrides["data_dir"] = path


def set_vocabulary_path(path: str | None) -> None:
    """Overrides the vocabulary for this process (None: fall back to gin / env / default)."""
    _overrides["vocabulary_path"] = path


def data_dir() -> str:
    """The data folder that holds one sub-folder of record shards per dataset."""
    return (_overrides["data_dir"] or data_config()["data_dir"]
            or os.environ.get("SBS_DATA_DIR") or DEFAULT_DATA_DIR)


@contextlib.contextmanager
def overrides_restored() -> Iterator[None]:
    """Puts back the `set_data_dir` / `set_vocabulary_path` overrides and seqio's cache folders
    on exit, so a job that points the tasks at its run's files (train, eval, infer) leaves none
    behind in-process."""
    saved, cache_dirs = dict(_overrides), list(seqio.get_global_cache_dirs())
    try:
        yield
    finally:
        _overrides.update(saved)
        seqio.set_global_cache_dirs(cache_dirs)


def named_data_dir() -> str | None:
    """The data folder named in-process or by gin (SBS_DATA_DIR is a default, not a name)."""
    return _overrides["data_dir"] or data_config()["data_dir"]


def named_vocabulary_path() -> str | None:
    """The vocabulary someone named (override, gin, SBS_VOCAB); None means the default."""
    return (_overrides["vocabulary_path"] or data_config()["vocabulary_path"]
            or os.environ.get("SBS_VOCAB"))


def _vocabulary_file() -> str:
    """The vocabulary named, else the data folder's spiece.model; it may not exist yet."""
    return named_vocabulary_path() or os.path.join(data_dir(), "spiece.model")


def vocabulary_path(for_synthetic: bool = False) -> str:
    """The SentencePiece model path; for the synthetic tasks, created when it is the default."""
    path = _vocabulary_file()
    if not os.path.exists(path):
        if for_synthetic and named_vocabulary_path() is None:
            synthetic.ensure_dataset(data_dir(), vocabulary_path=path)
        else:
            raise FileNotFoundError(
                f"SentencePiece vocabulary not found: {path!r}. Point SBS_VOCAB, gin "
                "`tasks.data_config.vocabulary_path` or tasks.set_vocabulary_path() at a "
                "spiece.model (a HF T5 one, or one trained with `sbs-vocab`)."
            )
    return path


_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: one hash a file


def _sha256(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = records.file_sha256(path)
    return _SHA256[key]


def check_pinned_vocabulary(dataset_dir: str) -> None:
    """Refuses to read `dataset_dir` with a vocabulary other than the one its info.json pins
    (the build made the folder for it), naming both files and hashes. Reading without an info.json,
    without a pin, or before the vocabulary exists passes (the tokenizer names a missing one)."""
    info = verify.read_info(dataset_dir)
    pinned = (info or {}).get("vocabulary")
    path = _vocabulary_file()
    if not pinned or not os.path.exists(path):
        return
    sha = _sha256(path)
    if sha != pinned["sha256"]:
        pinned_path = os.path.normpath(os.path.join(dataset_dir, pinned.get("path", "?")))
        info_path = os.path.join(dataset_dir, records.INFO_FILE)
        raise records.DatasetError(
            f"the task vocabulary {path} (sha256 {sha[:12]}) is not the one {info_path} pins "
            f"(sha256 {pinned['sha256'][:12]}, {pinned_path}): the folder was built for that "
            "one. Name it (SBS_VOCAB / tasks.data_config.vocabulary_path), or build another data "
            f"folder for this one (`python -m sbs_jax.data.build --vocab {path} --data_dir "
            "OTHER ...`)")


class ConfiguredVocabulary(seqio.SentencePieceVocabulary):
    """A SentencePiece vocabulary whose model file is looked up on first use, not at import.

    Re-resolves on every load, so `set_vocabulary_path` takes effect for tasks already
    registered; seqio caches the loaded model per path.
    """

    def __init__(self, for_synthetic: bool = False):
        self._for_synthetic = for_synthetic
        super().__init__("<resolved when read: see tasks.config>")

    @property
    def sentencepiece_model_file(self) -> str:
        return vocabulary_path(self._for_synthetic)

    def _model_context(self):
        path = self.sentencepiece_model_file
        if path != self._sentencepiece_model_file:
            self._sentencepiece_model_file = path
            self._model = None
        return super()._model_context()

    def __eq__(self, other):
        if not isinstance(other, seqio.SentencePieceVocabulary):
            return False
        return self.sentencepiece_model_file == other.sentencepiece_model_file


def get_vocabulary(for_synthetic: bool = False) -> seqio.SentencePieceVocabulary:
    """The vocabulary the tasks use (synthetic: creating the default one when absent)."""
    return seqio.SentencePieceVocabulary(vocabulary_path(for_synthetic))
