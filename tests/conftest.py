"""Test setup: 8 virtual CPU devices for mesh tests, shared fixtures.

XLA_FLAGS must be set before jax is first imported, so this runs at collection start.
"""

import os
import pathlib

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_VOCAB_TEXTS = [
    "Premise: A man plays a guitar on stage. Hypothesis: A person is performing music.",
    "Q: Where would you put a plate after washing it? Answer Choices: (a) cupboard (b) table",
    "Tom has 6 cards. He buys 5 more and then gives away 7. How many cards does he have?",
    "The answer is ( 6.0 + 5.0 ) - 7.0 . So the answer is entailment, neutral or contradiction.",
    "predict: explain: 3 4 7 + 2 5 9 = 6 0 6 ; 7 + 9 + 0 = 16 , write 6 carry 1 .",
    "Das Mädchen läuft über die Straße. 東京は日本の首都です。 ¿Qué tal? — naïve café",
] * 50


def dss_data_path() -> pathlib.Path | None:
    """The paper's released data beside the repo (or $SBS_DSS_DATA), if present."""
    env = os.environ.get("SBS_DSS_DATA")
    path = pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "dss_data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def dss_data_dir() -> pathlib.Path:
    path = dss_data_path()
    if path is None:
        pytest.skip("../shared/dss_data (the paper's released data) is not present")
    return path


@pytest.fixture(scope="session")
def tiny_vocab_path(tmp_path_factory) -> str:
    """A small T5-convention SentencePiece model trained by our own code."""
    from sbs_jax.data.vocab import train_vocab

    prefix = tmp_path_factory.mktemp("vocab") / "tiny"
    return train_vocab(_VOCAB_TEXTS, str(prefix), vocab_size=600)


@pytest.fixture()
def toy_dir(tmp_path, tiny_vocab_path):
    """An empty task data folder for hand-written records, read with the tiny test vocabulary."""
    import tasks

    tasks.set_data_dir(str(tmp_path))
    tasks.set_vocabulary_path(tiny_vocab_path)
    yield tmp_path
    tasks.set_data_dir(None)
    tasks.set_vocabulary_path(None)
