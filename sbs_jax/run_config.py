"""The settings of one training run: a plain dataclass that gin fills from the macros.

`gin/base.gin` binds every field of `RunConfig` to the macros of DESIGN.md (MODEL_DIR,
TRAIN_STEPS, BATCH_SIZE, ...), so train, eval and infer read the same gin files and agree on the
model, tasks and MODEL_DIR. Library code receives the resolved dataclass, never gin.
The resolved config is saved as `MODEL_DIR/run_config.json`; a restart whose settings differ in
anything that would change the result (model, data, objective, optimizer, mesh) is refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath

import gin

CONFIG_FILE = "run_config.json"
# Every eval's metrics per split, one JSON object a line: {"step", "split", "accuracy", ...}.
EVAL_HISTORY_FILE = "eval_history.jsonl"
# Settings a restarted run may change without making its checkpoints mean something else.
RESUMABLE_CHANGES = frozenset({
    "model_dir", "train_steps", "checkpoint_period", "eval_period", "log_period",
    "keep_checkpoints", "eval_split", "eval_batch_size", "eval_max_examples", "max_decode_len",
    "async_checkpointing", "initial_checkpoint_path", "best_metric", "pack", "test_every_eval",
    "fixed_batch_shapes",
})


DATA_SUBSETS = ("per_seed", "nested")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; field names follow the gin macros (lower case)."""

    model_dir: str
    mixture_or_task_name: str
    rationale_mixture_name: str | None = None
    model_name: str = "t5_1_1_small"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    train_steps: int = 10_000
    batch_size: int = 64
    task_feature_lengths: dict = dataclasses.field(
        default_factory=lambda: {"inputs": 1024, "targets": 256})
    alpha: float = 0.5
    data_fraction: float = 1.0
    data_subset: str = "nested"  # which examples a fraction keeps: pipeline.fraction_seed
    random_seed: int = 0
    mesh_shape: tuple = (-1, 1, 1)
    fsdp: bool = True
    num_microbatches: int = 1
    pack: bool = False  # seqio/T5X packing of each view's examples (same objective, fewer rows)
    # Every batch padded to TASK_FEATURE_LENGTHS (one shape per view): one compile, never a
    # recompile, at the cost of the padding that length buckets save.
    fixed_batch_shapes: bool = False
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    # Optimizer (sbs_jax.optim): the reference recipe by default.
    optimizer: str = "adamw"
    learning_rate: float = 5e-5
    schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    # Checkpoints, evaluation, logging.
    initial_checkpoint_path: str | None = None
    checkpoint_period: int = 1000
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    eval_period: int = 250
    eval_split: str = "valid"
    eval_batch_size: int = 64
    eval_max_examples: int | None = None
    test_every_eval: bool = False  # also decode the whole test split at each eval (logged only)
    max_decode_len: int = 64
    best_metric: str | None = "accuracy"
    log_period: int = 10

    def __post_init__(self):
        if not self.model_dir:
            raise ValueError("MODEL_DIR is not set; pass --gin.MODEL_DIR=\"'/path/to/run'\"")
        for name in ("train_steps", "batch_size", "checkpoint_period", "num_microbatches",
                     "log_period", "eval_batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name.upper()}={getattr(self, name)} must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"ALPHA={self.alpha} must be in [0, 1]")
        if self.data_subset not in DATA_SUBSETS:
            raise ValueError(f"DATA_SUBSET={self.data_subset!r} must be one of {DATA_SUBSETS}")
        if self.pack and self.fixed_batch_shapes:
            raise ValueError("RunConfig.pack and RunConfig.fixed_batch_shapes exclude each other: "
                             "packed steps vary their number of rows")
        missing = {"inputs", "targets"} - set(self.task_feature_lengths)
        if missing:
            raise ValueError(f"TASK_FEATURE_LENGTHS={self.task_feature_lengths} lacks {missing}")
        object.__setattr__(self, "mesh_shape", tuple(int(x) for x in self.mesh_shape))
        object.__setattr__(self, "task_feature_lengths", dict(self.task_feature_lengths))
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mesh_shape"] = list(self.mesh_shape)
        return out


_GIN_RUN_CONFIG = gin.external_configurable(RunConfig, name="RunConfig")


def from_gin() -> RunConfig:
    """The RunConfig that the parsed gin files and bindings describe."""
    return _GIN_RUN_CONFIG()


def check_against_saved(config: RunConfig) -> None:
    """Refuses to continue a MODEL_DIR whose saved settings conflict; names each setting."""
    path = epath.Path(config.model_dir) / CONFIG_FILE
    if not path.exists():
        return
    # A setting added after the run was saved had its default's effect.
    saved = {**_field_defaults(), **json.loads(path.read_text())}
    current = json.loads(json.dumps(config.to_json()))
    conflicts = [
        f"{key.upper()}: saved {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    ]
    if conflicts:
        raise ValueError(
            f"MODEL_DIR={config.model_dir} holds a run with different settings ({path}): "
            + "; ".join(conflicts)
            + ". Use a new MODEL_DIR, or restore the saved settings."
        )


def _field_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(RunConfig)
            if f.default is not dataclasses.MISSING}


def save(config: RunConfig) -> None:
    """Writes run_config.json into MODEL_DIR (local or gs://)."""
    write_text(epath.Path(config.model_dir) / CONFIG_FILE,
               json.dumps(config.to_json(), indent=1, sort_keys=True) + "\n")


def write_text(path: epath.Path, text: str) -> None:
    """Writes via a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
