"""INITIAL_CHECKPOINT_PATH: the model config and parameters a run starts from.

A HF T5 folder (config.json + weights, via `models.hf.load_hf`) brings its own architecture;
one of our MODEL_DIRs is read with the run's model gin. Parameters of another shape are refused
before any step, naming the first tensor that differs, both shapes, and the model gin file
whose sizes the checkpoint has. A checkpoint without a vocabulary (a HF folder with no
spiece.model, a MODEL_DIR that pinned none) starts on the task's, and the console says so.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from etils import epath

from sbs_jax import models
from sbs_jax.data.vocab import padded_vocab_size
from sbs_jax.models import config as model_configs
from sbs_jax.train import checkpoint_steps, checkpoints, run_config, run_files

# T5Config fields that change how a model runs, not what it is: these model_overrides apply on
# top of a HF checkpoint's own config; any other override must agree with the checkpoint.
RUNTIME_FIELDS = frozenset({"dropout_rate", "dtype", "scan_layers", "remat_policy"})
# What a model gin file fixes (gin/models/<name>.gin); vocab_size comes from the vocabulary.
SIZE_FIELDS = ("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
               "num_decoder_layers", "mlp_activations", "logits_via_embedding")


@dataclasses.dataclass(frozen=True)
class Initial:
    """Where a run's first parameters came from (what run_summary.json records)."""

    path: str
    format: str  # "HF" or "sbs-jax"
    step: int | None = None  # of an sbs-jax MODEL_DIR
    vocabulary: str | None = None  # the file the run tokenises with
    vocabulary_from: str | None = None  # "checkpoint", or "task" when the checkpoint has none

    def describe(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.path} ({self.format}{step})"

    def vocabulary_note(self) -> str | None:
        """The line that says a checkpoint without a vocabulary runs on the task's."""
        if self.vocabulary_from != "task":
            return None
        lacks = (f"has no {run_files.VOCAB_FILE}" if self.format == "HF"
                 else f"records no vocabulary ({run_files.DATA_CONFIG_FILE})")
        return (f"INITIAL_CHECKPOINT_PATH={self.path} {lacks}: using the task vocabulary "
                f"{self.vocabulary}; it must be the one the checkpoint was trained with")


def with_vocabulary(initial: Initial, vocabulary_path: str | None,
                    checkpoint_vocabulary: str | None) -> Initial:
    """`initial` recording the run's vocabulary file and whether the checkpoint brought it
    (`checkpoint_vocabulary`: `run_files.checkpoint_vocabulary(initial.path)`)."""
    return dataclasses.replace(initial, vocabulary=vocabulary_path,
                               vocabulary_from="task" if checkpoint_vocabulary is None
                               else "checkpoint")


def is_hf_folder(path: str) -> bool:
    return (epath.Path(path) / "config.json").exists()


def hf_config(path: str, cfg: run_config.RunConfig) -> models.T5Config:
    """A HF folder's T5Config with the run's runtime overrides; refuses conflicting sizes."""
    from sbs_jax.models.hf import config_from_hf

    config_file = epath.Path(path) / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    config = config_from_hf(hf, str(config_file))
    conflicts = {k: (v, getattr(config, k, None)) for k, v in cfg.model_overrides.items()
                 if k not in RUNTIME_FIELDS and getattr(config, k, None) != v}
    if conflicts:
        raise ValueError(
            f"RunConfig.model_overrides {sorted(conflicts)} disagree with "
            f"INITIAL_CHECKPOINT_PATH={path!r}: "
            + ", ".join(f"{k}={v!r} vs {c!r}" for k, (v, c) in conflicts.items())
            + f"; {_gin_hint(config)}")
    runtime = {k: v for k, v in cfg.model_overrides.items() if k in RUNTIME_FIELDS}
    return dataclasses.replace(config, **runtime)


def model_config(cfg: run_config.RunConfig, vocab_size: int) -> models.T5Config:
    """The run's model: INITIAL_CHECKPOINT_PATH's when it is a HF folder, else the model gin's
    (RunConfig.model_name + overrides) with the task vocabulary padded to a multiple of 128."""
    if cfg.initial_checkpoint_path and is_hf_folder(cfg.initial_checkpoint_path):
        return hf_config(cfg.initial_checkpoint_path, cfg)
    return models.get_config(
        cfg.model_name, **{"vocab_size": padded_vocab_size(vocab_size), **cfg.model_overrides})


def load(cfg: run_config.RunConfig, vocab_size: int
         ) -> tuple[models.T5Config, Any, Initial]:
    """Model config, host params and their origin from INITIAL_CHECKPOINT_PATH."""
    path = cfg.initial_checkpoint_path
    if is_hf_folder(path):
        from sbs_jax.models.hf import load_hf

        config = hf_config(path, cfg)
        _, params = load_hf(path, scan_layers=config.scan_layers)
        origin = Initial(path, "HF")
    elif (step := checkpoint_steps.latest_good_step(path, ("params",))) is not None:
        config = model_config(cfg, vocab_size)
        params = checkpoints.load_params(path, step)
        scanned = "layers" in params.get("encoder", {})
        if config.scan_layers != scanned:  # the run's layout, whichever the source had
            params = (models.stack_layers if config.scan_layers else models.unstack_layers)(params)
        origin = Initial(path, "sbs-jax", step)
    else:
        raise FileNotFoundError(
            f"INITIAL_CHECKPOINT_PATH={path!r} is neither a HF T5 folder (config.json) nor a "
            "MODEL_DIR with a finalised checkpoint")
    if config.vocab_size < vocab_size:
        raise ValueError(
            f"INITIAL_CHECKPOINT_PATH={path!r} has vocab_size {config.vocab_size}, smaller than "
            f"the task vocabulary ({vocab_size} pieces)")
    return config, params, origin


def origin(cfg: run_config.RunConfig) -> Initial | None:
    """INITIAL_CHECKPOINT_PATH's description without reading its parameters (for a restart)."""
    path = cfg.initial_checkpoint_path
    if not path:
        return None
    if is_hf_folder(path):
        return Initial(path, "HF")
    return Initial(path, "sbs-jax", checkpoint_steps.latest_step(path))


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
            for path, leaf in flat}


def matching_model_gins(config: models.T5Config) -> list[str]:
    """`gin/models/<name>.gin` of every named config with these sizes."""
    return [f"gin/models/{name}.gin" for name in model_configs.config_names()
            if all(getattr(models.get_config(name), f) == getattr(config, f)
                   for f in SIZE_FIELDS)]


def _gin_hint(config: models.T5Config) -> str:
    gin_files = matching_model_gins(config)
    if gin_files:
        return (f"the checkpoint has the sizes of {' or '.join(gin_files)}: train with "
                f"--gin_file={gin_files[-1]} (and no size model_overrides)")
    sizes = {f: getattr(config, f) for f in SIZE_FIELDS}
    return ("no shipped gin/models/*.gin has the checkpoint's sizes; bind "
            f"RunConfig.model_overrides={sizes}")


def check_params_match(params: Any, abstract_params: Any, config: models.T5Config,
                       cfg: run_config.RunConfig) -> None:
    """Refuses `params` unless they have the model's tree and shapes; names the first tensor
    that differs, both shapes, and the model gin file the checkpoint fits."""
    want, got = _flat_shapes(abstract_params), _flat_shapes(params)
    if want == got:
        return
    problem = None
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            shown = {k: "absent" if s is None else s for k, s in
                     (("checkpoint", got.get(name)), ("model", want.get(name)))}
            problem = (f"tensor {name} is {shown['checkpoint']} in the checkpoint but "
                       f"{shown['model']} in the model (RunConfig.model_name="
                       f"{cfg.model_name!r}, model_overrides={cfg.model_overrides})")
            break
    try:
        found = models.config_from_params(params, config)
    except (KeyError, TypeError, ValueError, AttributeError):
        hint = "it is not a T5 parameter tree of this code"
    else:
        if all(getattr(found, f) == getattr(config, f) for f in SIZE_FIELDS):
            hint = (f"the sizes agree but the embedding has {found.vocab_size} rows where the "
                    f"task vocabulary gives {config.vocab_size}: use the checkpoint's vocabulary")
        else:
            hint = _gin_hint(found)
    raise ValueError(f"INITIAL_CHECKPOINT_PATH={cfg.initial_checkpoint_path}: {problem}; {hint}")
