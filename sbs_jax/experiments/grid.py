"""What the experiment grid runs: methods, cells, recipes, presets and each cell's trainer flags.

Pure definitions (no files, no subprocesses): `sbs_jax.experiments.runner` runs the cells and
`sbs_jax.experiments.report` tables them. A cell is (dataset, method, data fraction, model,
seed); its training is fully described by the gin flags `gin_flags` returns, and
`cell_settings` is what a finished cell records so a re-run with another recipe is caught.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

DATASETS = ("esnli", "anli1", "cqa", "svamp", "synthetic")
PAPER_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class Method:
    """Which SeqIO task trains the label and which (if any) the rationale; its gin file."""

    label_task: str
    rationale_task: str | None
    gin_file: str | None = None

    def tasks(self, dataset: str) -> tuple[str, str | None]:
        rationale = self.rationale_task.format(ds=dataset) if self.rationale_task else None
        return self.label_task.format(ds=dataset), rationale


# The single-task baseline trains one target, rationale then label: the teacher's rationale
# always; teacher labels on train for `single_task` (the teacher's whole chain of thought),
# gold ones for `single_task_gt` (our reading of the paper's Table 6, whose other rows are
# gold-label fine-tuning and step-by-step; the reference code has no single-task mode). Its gin
# file sets what that target needs: label-only training, the 256-token cap and max_decode_len.
METHODS = {
    "standard_ft": Method("{ds}_standard_gt", None, "gin/standard_finetune.gin"),
    "standard_distill": Method("{ds}_standard_llm", None, "gin/standard_distill.gin"),
    "single_task_gt": Method("{ds}_single_task_gt", None, "gin/single_task.gin"),
    "single_task": Method("{ds}_single_task", None, "gin/single_task.gin"),
    "sbs_gt": Method("{ds}_label_gt", "{ds}_rationale"),
    "sbs_llm": Method("{ds}_label_llm", "{ds}_rationale"),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    dataset: str
    method: str
    fraction: float
    model: str
    seed: int

    @property
    def name(self) -> str:
        """Folder of the cell, relative to the grid directory."""
        return f"{self.dataset}/{self.model}/{self.method}/{self.fraction * 100:g}pct/seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How every cell of a grid trains.

    Gin files and bindings may name `{model}`, `{size}` (the model name's last part, e.g.
    `base`) and `{dataset}`, e.g. `gin/sbs_{size}.gin` or
    `INITIAL_CHECKPOINT_PATH='/models/t5-v1_1-{size}'`. `train_steps` None keeps the gin files'
    TRAIN_STEPS (the paper's XXL config trains 4,000 steps, the others 10,000). The bindings
    come after the method's gin file, so they override it: a TASK_FEATURE_LENGTHS binding also
    caps the single-task target (rationale + label), whose label is lost when cut.
    """

    gin_files: tuple[str, ...]
    train_steps: int | None = None
    gin_bindings: tuple[str, ...] = ()
    model_gin_dir: str = "gin/models"
    # DATA_SUBSET of every cell: 'per_seed' (the reference) or 'nested' (pipeline.fraction_seed).
    data_subset: str = "nested"
    # A folder of HF checkpoints named as on the hub (`hf_checkpoint_name`): every cell starts
    # from its model's folder and reads that folder's spiece.model. None: random init.
    checkpoint_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Preset:
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    fractions: tuple[float, ...]
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    recipe: Recipe
    # The paper's cells start from pretrained T5: without --checkpoint_dir the grid refuses to
    # run unless told --from_scratch.
    needs_checkpoints: bool = False


PRESETS = {
    # CI-sized: one real-data cell pair (10 steps, batch 16), proves the grid runs end to end on
    # the released files; not a meaningful accuracy.
    "ci": Preset(("svamp",), ("standard_ft", "sbs_llm"), (0.125,), ("t5_1_1_tiny",), (0,),
                 Recipe(("gin/quickstart.gin",), train_steps=10, gin_bindings=(
                     # targets 256: room for a single-task target (rationale + label).
                     'TASK_FEATURE_LENGTHS = {"inputs": 128, "targets": 256}', "BATCH_SIZE = 16",
                     "RunConfig.warmup_steps = 0", "EVAL_PERIOD = 0"))),
    # Small scale on CPU: the synthetic dataset shows the gap between the methods within
    # gin/quickstart.gin's 2,000 steps; 48 cells, hours on a CPU (a step-by-step step also trains
    # on the rationales, far longer than the labels).
    "cpu": Preset(("synthetic",), tuple(METHODS), PAPER_FRACTIONS, ("t5_1_1_tiny",), (0, 1),
                  Recipe(("gin/quickstart.gin",), train_steps=2000)),
    # The paper's grid (T5 v1.1 small/base/large from their HF checkpoints, 4 seeds, 10,000
    # steps; TPU/GPU scale) with the reference's protocol: a data subset per seed and test
    # decoded at every eval (the reference's logs), beside our test at the best-valid step.
    "paper": Preset(("esnli", "anli1", "cqa", "svamp"), tuple(METHODS), PAPER_FRACTIONS,
                    ("t5_1_1_small", "t5_1_1_base", "t5_1_1_large"), (0, 1, 2, 3),
                    Recipe(("gin/sbs_{size}.gin",), gin_bindings=(
                        "RunConfig.test_every_eval = True",), data_subset="per_seed"),
                    needs_checkpoints=True),
}

# What a HF checkpoint folder must hold to start a cell (weights: any one of WEIGHT_FILES).
CHECKPOINT_FILES = ("config.json", "spiece.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def hf_checkpoint_name(model: str) -> str:
    """The hub name of a model gin's checkpoint: t5_1_1_base -> t5-v1_1-base (google/...),
    flan_t5_large -> flan-t5-large, t5_small -> t5-small."""
    if model.startswith("t5_1_1_"):
        return "t5-v1_1-" + model[len("t5_1_1_"):].replace("_", "-")
    return model.replace("_", "-")


def initial_checkpoint(model: str, recipe: Recipe) -> str | None:
    """The HF folder a cell of `model` starts from (None: random init)."""
    if recipe.checkpoint_dir is None:
        return None
    return os.path.join(recipe.checkpoint_dir, hf_checkpoint_name(model))


def missing_checkpoint_files(models: Iterable[str], checkpoint_dir: str) -> list[str]:
    """Paths the models' checkpoint folders lack (a folder, a file, or the weights)."""
    recipe = Recipe((), checkpoint_dir=checkpoint_dir)
    missing = []
    for model in dict.fromkeys(models):
        folder = initial_checkpoint(model, recipe)
        if not os.path.isdir(folder):
            missing.append(folder + os.sep)
            continue
        missing += [os.path.join(folder, f) for f in CHECKPOINT_FILES
                    if not os.path.isfile(os.path.join(folder, f))]
        if not any(os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_FILES):
            missing.append(os.path.join(folder, "|".join(WEIGHT_FILES)))
    return missing


def make_cells(datasets: Iterable[str], methods: Iterable[str], fractions: Iterable[float],
               models: Iterable[str], seeds: Iterable[int]) -> list[Cell]:
    """The cross product, validated; order: dataset, model, fraction, method, seed."""
    datasets, methods = list(datasets), list(methods)
    fractions, models, seeds = list(fractions), list(models), list(seeds)
    for name, values, known in (("dataset", datasets, DATASETS), ("method", methods, METHODS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(f"unknown {name}(s) {unknown}; choose from {sorted(known)}")
    bad = [f for f in fractions if not 0.0 < f <= 1.0]
    if bad:
        raise ValueError(f"data fractions must be in (0, 1]: {bad}")
    if not (datasets and methods and fractions and models and seeds):
        raise ValueError("the grid is empty: every axis needs at least one value")
    return [Cell(d, m, f, s_model, seed)
            for d in datasets for s_model in models for f in fractions for m in methods
            for seed in seeds]


def _fill(text: str, fields: dict[str, str]) -> str:
    """Replaces `{name}` placeholders only (gin values such as dicts keep their braces)."""
    for name, value in fields.items():
        text = text.replace("{" + name + "}", value)
    return text


def cell_settings(cell: Cell, recipe: Recipe) -> dict:
    """What determines a cell's result besides its coordinates; recorded in results.json."""
    method = METHODS[cell.method]
    label_task, rationale_task = method.tasks(cell.dataset)
    fields = {"model": cell.model, "size": cell.model.rsplit("_", 1)[-1],
              "dataset": cell.dataset}
    gin_files = [_fill(f, fields) for f in recipe.gin_files]
    gin_files.append(f"{recipe.model_gin_dir}/{cell.model}.gin")
    if method.gin_file:
        gin_files.append(method.gin_file)
    return {
        "gin_files": gin_files,
        "gin_bindings": [_fill(b, fields) for b in recipe.gin_bindings],
        "train_steps": recipe.train_steps,
        "label_task": label_task,
        "rationale_task": rationale_task,
        "data_subset": recipe.data_subset,
        "initial_checkpoint": initial_checkpoint(cell.model, recipe),
    }


def gin_flags(cell: Cell, recipe: Recipe, model_dir: str) -> list[str]:
    """Trainer/eval flags for a cell: gin files (base, model, method), tasks, fraction, seed."""
    settings = cell_settings(cell, recipe)
    rationale = settings["rationale_task"]
    flags = [f"--gin_file={f}" for f in settings["gin_files"]]
    flags += [
        f"--gin.MODEL_DIR={model_dir!r}",
        f"--gin.MIXTURE_OR_TASK_NAME={settings['label_task']!r}",
        f"--gin.RATIONALE_MIXTURE_NAME={rationale!r}" if rationale
        else "--gin.RATIONALE_MIXTURE_NAME=None",
        f"--gin.DATA_FRACTION={cell.fraction!r}",
        f"--gin.DATA_SUBSET={settings['data_subset']!r}",
        f"--gin.RANDOM_SEED={cell.seed}",
    ]
    if recipe.train_steps is not None:
        flags.append(f"--gin.TRAIN_STEPS={recipe.train_steps}")
    checkpoint = settings["initial_checkpoint"]
    if checkpoint is not None:
        flags += [f"--gin.INITIAL_CHECKPOINT_PATH={checkpoint!r}",
                  ("--gin_bindings=tasks.data_config.vocabulary_path="
                   f"{os.path.join(checkpoint, 'spiece.model')!r}")]
    flags += [f"--gin_bindings={b}" for b in settings["gin_bindings"]]
    return flags
