"""The settings of one training run: a plain dataclass that gin fills from the macros.

`gin/base.gin` binds the fields of `RunConfig` to T5X-style macros of the same name in upper
case (MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, ...; the rest as `RunConfig.<field>`), so train,
eval and infer read the same gin files and agree on the model, tasks and MODEL_DIR. Library
code receives the resolved dataclass, never gin.
Every field is type- and range-checked when the dataclass is made (`check_settings`, driven by
the field annotations and the `_ALLOWED` table); a refusal names the setting and its value.
The resolved config is saved as `MODEL_DIR/run_config.json`; a restart whose settings differ in
anything that would change the result (model, data, objective, optimizer, mesh) is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath

import gin
from sbs_jax.runtime import gin_utils

CONFIG_FILE = "run_config.json"
# Every eval's metrics per split, one JSON object a line: {"step", "split", "accuracy", ...}.
EVAL_HISTORY_FILE = "eval_history.jsonl"
# Settings a restarted run may change without making its checkpoints mean something else.
RESUMABLE_CHANGES = frozenset({
    "model_dir", "train_steps", "checkpoint_period", "eval_period", "log_period",
    "keep_checkpoints", "eval_split", "eval_batch_size", "eval_max_examples", "max_decode_len",
    "async_checkpointing", "initial_checkpoint_path", "best_metric", "pack", "test_every_eval",
    "fixed_batch_shapes", "use_cached_tasks",
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
    # Read the tasks from the seqio cache (launch/seqio_cache.sh; --seqio_additional_cache_dirs)
    use_cached_tasks: bool = False
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
    # Optimizer (sbs_jax.train.optim): the reference recipe by default.
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
        check_settings(self)
        if self.pack and self.fixed_batch_shapes:
            raise SettingError("RunConfig.pack and RunConfig.fixed_batch_shapes exclude each "
                               "other: packed steps vary their number of rows")
        object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))
        object.__setattr__(self, "task_feature_lengths", dict(self.task_feature_lengths))
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mesh_shape"] = list(self.mesh_shape)
        return out


class SettingError(ValueError):
    """A RunConfig value of the wrong type or out of range; the message names the setting."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@functools.cache
def _macro_bound_fields() -> frozenset[str]:
    """Fields that gin/base.gin binds to a macro of their own name (RunConfig.x = %X)."""
    base = epath.Path(gin_utils.CONFIG_ROOT) / "gin" / "base.gin"
    text = base.read_text() if base.exists() else ""
    return frozenset(field for field, macro in _MACRO_BINDING.findall(text)
                     if macro == field.upper())


_MACRO_BINDING = re.compile(r"^RunConfig\.(\w+)\s*=\s*%(\w+)", re.MULTILINE)


def setting_name(field: str) -> str:
    """What a user sets: the gin macro (BATCH_SIZE) where base.gin binds one, else
    RunConfig.field."""
    return field.upper() if field in _macro_bound_fields() else f"RunConfig.{field}"


_EXAMPLE_DIR = "\"'/path/to/run'\""


@dataclasses.dataclass(frozen=True)
class _Allowed:
    """What a field's value must be beyond its type: `holds(value)`, and the refusal's words
    (a callable where they are known only when a config is checked)."""

    holds: Callable[[Any], bool]
    requirement: str | Callable[[], str]

    def says(self) -> str:
        return self.requirement() if callable(self.requirement) else self.requirement


def _interval(low: float, high: float = math.inf, *, open_low: bool = False,
              open_high: bool = False, note: str = "") -> _Allowed:
    """A number between `low` and `high`; the words follow from the bounds ("must be
    positive", "must be >= 0", "must be in (0, 1]"), plus `note` in parentheses."""
    def holds(v) -> bool:
        return ((v > low if open_low else v >= low)
                and (v < high if open_high else v <= high))
    if high == math.inf:
        words = "must be positive" if (low == 0 and open_low) else (
            f"must be {'>' if open_low else '>='} {low:g}")
    else:
        words = (f"must be in {'(' if open_low else '['}{low:g}, {high:g}"
                 f"{')' if open_high else ']'}")
    return _Allowed(holds, f"{words} ({note})" if note else words)


def _one_of(choices: tuple | Callable[[], tuple]) -> _Allowed:
    """One of `choices` (a callable: looked up when a config is checked)."""
    def current() -> tuple:
        return choices() if callable(choices) else choices
    return _Allowed(lambda v: v in current(), lambda: f"must be one of {current()}")


def _named(what: str) -> _Allowed:
    """A non-empty string."""
    return _Allowed(bool, f"must name {what}")


def _optim_names(kind: str) -> Callable[[], tuple[str, ...]]:
    """optim.OPTIMIZERS / SCHEDULES, imported when a config is checked (optim imports optax)."""
    def names() -> tuple[str, ...]:
        from sbs_jax.train import optim

        return getattr(optim, kind)
    return names


def _mesh_shape(value) -> bool:
    return (len(value) == 3 and all(_is_int(x) and (x > 0 or x == -1) for x in value)
            and list(value).count(-1) <= 1)


def _feature_lengths(value) -> bool:
    return ({"inputs", "targets"} <= set(value)
            and all(isinstance(k, str) and _is_int(v) and v > 0 for k, v in value.items()))


_POSITIVE = _interval(0, open_low=True)
_NOT_NEGATIVE = _interval(0)

# What each field allows beyond its type. Every field is also type-checked against its
# annotation, so a new field needs an entry here only when it has a range.
_ALLOWED: dict[str, _Allowed] = {
    "model_dir": _named("a folder"),
    "mixture_or_task_name": _named("a task or mixture"),
    "model_name": _named("a model config"),
    "train_steps": _POSITIVE,
    "batch_size": _POSITIVE,
    "task_feature_lengths": _Allowed(_feature_lengths, (
        "must map 'inputs' and 'targets' (and optionally 'rationale_targets') to positive "
        "integers")),
    "alpha": _interval(0, 1),
    "data_fraction": _interval(0, 1, open_low=True),
    "data_subset": _one_of(DATA_SUBSETS),
    "random_seed": _NOT_NEGATIVE,
    "mesh_shape": _Allowed(_mesh_shape, (
        "must be 3 integers (data, fsdp, model), each positive or -1 (all remaining devices, "
        "at most once)")),
    "num_microbatches": _POSITIVE,
    "label_smoothing": _interval(0, 1, open_high=True),
    "z_loss": _NOT_NEGATIVE,
    "optimizer": _one_of(_optim_names("OPTIMIZERS")),
    "learning_rate": _POSITIVE,
    "schedule": _one_of(_optim_names("SCHEDULES")),
    "warmup_steps": _NOT_NEGATIVE,
    "weight_decay": _NOT_NEGATIVE,
    "clip_norm": _interval(0, open_low=True, note="or None: no clipping"),
    "checkpoint_period": _POSITIVE,
    "keep_checkpoints": _POSITIVE,
    "eval_period": _interval(0, note="0: no periodic evaluation"),
    "eval_split": _named("a split"),
    "eval_batch_size": _POSITIVE,
    "eval_max_examples": _interval(0, open_low=True, note="or None: the whole split"),
    "max_decode_len": _POSITIVE,
    "log_period": _POSITIVE,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_error(value, kind: type) -> str | None:
    """Why `value` is not a `kind` (None when it is one)."""
    if kind is int:
        return None if _is_int(value) else "must be an integer"
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if kind is bool:
        return None if isinstance(value, bool) else "must be True or False"
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    if kind is dict:
        return None if isinstance(value, Mapping) else "must be a dict"
    if kind is tuple:
        return None if isinstance(value, (tuple, list)) else "must be a tuple"
    return None


def check_settings(config: RunConfig) -> None:
    """Type- and range-checks every field; a SettingError names the setting and its value.

    Integral floats (TRAIN_STEPS=1e4) become ints; anything else where an integer is due is
    refused, as are non-finite numbers.
    """
    for field, annotation in typing.get_type_hints(RunConfig).items():
        value = getattr(config, field)
        optional = isinstance(annotation, types.UnionType) and type(None) in annotation.__args__
        if optional:
            if value is None:
                continue
            annotation = next(a for a in annotation.__args__ if a is not type(None))
        if annotation is int and isinstance(value, float) and value.is_integer():
            value = int(value)
            object.__setattr__(config, field, value)
        problem = _type_error(value, annotation)
        allowed = _ALLOWED.get(field)
        if allowed is not None:
            if problem is None and not allowed.holds(value):
                problem = allowed.says()
            elif problem is not None and annotation in (dict, tuple):
                problem = allowed.says()  # says what the container must hold
        if problem is not None and field == "model_dir" and not value:
            raise SettingError(f"MODEL_DIR is not set; pass --gin.MODEL_DIR={_EXAMPLE_DIR}")
        if problem is not None:
            raise SettingError(f"{setting_name(field)}={value!r} {problem}")


_GIN_RUN_CONFIG = gin.external_configurable(RunConfig, name="RunConfig")


def from_gin() -> RunConfig:
    """The RunConfig that the parsed gin files and bindings describe (SettingError: a value is
    of the wrong type or out of range)."""
    try:
        return _GIN_RUN_CONFIG()
    except SettingError as exc:  # without the call site gin appends to the message
        raise SettingError(exc.message) from None


def check_against_saved(config: RunConfig) -> None:
    """Refuses to continue a MODEL_DIR whose saved settings conflict; names each setting."""
    path = epath.Path(config.model_dir) / CONFIG_FILE
    if not path.exists():
        return
    # A setting added after the run was saved had its default's effect.
    saved = {**_field_defaults(), **json.loads(path.read_text())}
    current = json.loads(json.dumps(config.to_json()))
    conflicts = [
        f"{setting_name(key)}: saved {saved.get(key)!r}, now {current.get(key)!r}"
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
