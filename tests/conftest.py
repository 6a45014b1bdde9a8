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

import random

import pytest

# None of these imports jax.
from sbs_jax.experiments import grid, report, runner
from sbs_jax.experiments.grid import Recipe

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


# The tiny synthetic run the loop, run-files and infer tests train: one layer each way keeps
# compiles short; batch 8 fits the default 8-device data mesh.
TINY_MODEL = {"emb_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32,
              "num_encoder_layers": 1, "num_decoder_layers": 1, "dropout_rate": 0.0}


def tiny_run_config(model_dir, **overrides):
    """A RunConfig of 4 sbs steps of the tiny model on the synthetic tasks, a checkpoint every
    2 steps (saved synchronously), no evals; `overrides` replace any field."""
    from sbs_jax.train import run_config

    fields = {
        "model_dir": str(model_dir), "mixture_or_task_name": "synthetic_label_gt",
        "rationale_mixture_name": "synthetic_rationale", "model_name": "t5_1_1_tiny",
        "model_overrides": TINY_MODEL, "train_steps": 4, "batch_size": 8,
        "task_feature_lengths": {"inputs": 32, "targets": 64}, "learning_rate": 1e-3,
        "schedule": "constant", "checkpoint_period": 2, "eval_period": 0, "log_period": 1,
        "async_checkpointing": False}
    return run_config.RunConfig(**{**fields, **overrides})


def fresh_env(tmp_path) -> dict:
    """A new login shell: PATH, PYTHONPATH and an empty HOME; no SBS_* variables, no XLA
    device flags."""
    (tmp_path / "home").mkdir()
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"),
            "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO_ROOT))}


# The recipe of the finished grid cells tests write by hand (grid, runner and report tests).
GRID_RECIPE = Recipe(gin_files=("gin/quickstart.gin",), train_steps=7)


def write_finished_cells(grid_dir, cells, recipe, rng, wall_s=1.0):
    """Writes a results.json for every cell as run_cell would (random init, test scored at
    best valid only); returns accuracy by cell."""
    accuracies = {}
    for cell in cells:
        cell_dir = grid_dir / cell.name
        cell_dir.mkdir(parents=True)
        accuracy = rng.uniform(0, 100)
        accuracies[cell] = accuracy
        record = {**vars(cell), "accuracy": accuracy, "metrics": {"accuracy": accuracy},
                  **report.test_statistics(cell_dir / "no_history.jsonl"),
                  "initial_checkpoint": None,
                  "settings": grid.cell_settings(cell, recipe), "wall_s": wall_s}
        runner.write_json_atomic(cell_dir / report.RESULTS_FILE, record)
    return accuracies


@pytest.fixture()
def finished_grid(tmp_path):
    """A grid folder of finished cells (2 datasets x 2 methods x 2 fractions x 2 models x 3
    seeds) with seeded random accuracies: (folder, cells, accuracy by cell)."""
    cells = grid.make_cells(["svamp", "synthetic"], ["standard_ft", "sbs_llm"],
                            [0.25, 1.0], ["t5_1_1_tiny", "t5_1_1_small"], [0, 1, 2])
    accuracies = write_finished_cells(tmp_path, cells, GRID_RECIPE, random.Random(0))
    return tmp_path, cells, accuracies
