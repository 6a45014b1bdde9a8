"""HF T5 directory <-> MODEL_DIR (our orbax checkpoint), the library half of `sbs-convert`.

An export carries the run's pinned vocabulary as the HF tokenizer and the architecture
MODEL_DIR records (`run_files.base_config`, sizes from the parameter shapes); an import writes
step 0 (params plus the fresh AdamW state that step 0 of training starts from),
model_config.json and the HF folder's spiece.model, pinned as in training.
"""

from __future__ import annotations

import sys

import optax
from etils import epath

from sbs_jax import models
from sbs_jax.models import T5Config
from sbs_jax.runtime import console
from sbs_jax.train import checkpoint_steps, checkpoints, optim, run_files


def export_vocabulary(model_dir: str, vocab: str | None) -> str | None:
    """The vocabulary to ship with an export: the run's pinned one (--vocab must have its
    bytes), else --vocab, else None (a warning says the export has no tokenizer)."""
    pinned = run_files.run_vocabulary(model_dir)
    if pinned and vocab:
        run_files.check_same_vocabulary((f"MODEL_DIR={model_dir} was trained with", pinned),
                                        ("--vocab", vocab))
    if not (pinned or vocab):
        console.say(f"sbs-convert: warning: {model_dir} records no vocabulary "
                    f"({run_files.VOCAB_FILE}) and no --vocab was given: the export has no "
                    "tokenizer", file=sys.stderr)
    return pinned or vocab


def export_to_hf(model_dir: str, hf_dir: str, step: int | None = None,
                 model_name: str | None = None, vocab: str | None = None,
                 overwrite: bool = False) -> T5Config:
    """Our checkpoint (a step, default the latest) -> HF directory with the run's tokenizer;
    returns the config."""
    target = epath.Path(hf_dir)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"--hf_dir {hf_dir} is not empty; pass --overwrite to write into "
                              "it, or choose an empty folder")
    vocab = export_vocabulary(model_dir, vocab)
    params = checkpoints.load_params(model_dir, step)
    config = models.config_from_params(params, run_files.base_config(model_dir, model_name))
    models.save_hf(config, params, hf_dir, vocab=vocab)
    return config


def import_from_hf(hf_dir: str, model_dir: str) -> T5Config:
    """HF directory -> step 0 of our checkpoint plus model_config.json and the folder's
    vocabulary; returns the config."""
    if checkpoint_steps.latest_step(model_dir) is not None:
        raise FileExistsError(f"{model_dir} already holds checkpoints; choose an empty MODEL_DIR")
    config, params = models.load_hf(hf_dir)
    opt_state = optim.make_optimizer(optax.constant_schedule(0.0)).init(params)
    checkpointer = checkpoints.Checkpointer(model_dir, async_save=False)
    try:
        checkpointer.save(0, params, opt_state, {})
    finally:
        checkpointer.close()
    (epath.Path(model_dir) / run_files.MODEL_CONFIG_FILE).write_text(
        models.config_to_json(config))
    run_files.pin(model_dir, run_files.checkpoint_vocabulary(hf_dir), None)
    return config
