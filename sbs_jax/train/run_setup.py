"""What a run builds from its RunConfig before its first step: the checked tasks and splits, the
mesh and Partitioner, the model config (fresh or from INITIAL_CHECKPOINT_PATH), the optimizer,
the step's options, this process's paired batches and the eval sets. No files are written here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# isort: split
# First, so TF loads quietly and with GPUs hidden before seqio imports it.
from sbs_jax.runtime.tf_setup import tf  # noqa: F401

# isort: split
import seqio

from sbs_jax import models
from sbs_jax.data import packing, pipeline
from sbs_jax.infer import evaluation
from sbs_jax.runtime import distributed
from sbs_jax.train import initial_checkpoint, optim, partitioning, run_config, run_files
from sbs_jax.train import step as step_lib


def task_vocab_size(task: seqio.Task | seqio.Mixture) -> int:
    """The size of the task's target vocabulary (the model's, before padding)."""
    return int(task.output_features["targets"].vocabulary.vocab_size)


def optimizer(cfg: run_config.RunConfig) -> tuple[Any, Any]:
    """(optax transformation, learning-rate schedule) of a run."""
    schedule = optim.make_schedule(cfg.schedule, cfg.learning_rate, cfg.train_steps,
                                   cfg.warmup_steps)
    return optim.make_optimizer(schedule, cfg.optimizer, cfg.weight_decay, cfg.clip_norm), schedule


def step_options(cfg: run_config.RunConfig) -> step_lib.StepOptions:
    """What a run's step computes besides the model."""
    return step_lib.StepOptions(alpha=cfg.alpha, num_microbatches=cfg.num_microbatches,
                                label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                                seed=cfg.random_seed)


@dataclasses.dataclass
class RunSetup:
    """What a run builds from its RunConfig before the first step."""

    model_config: models.T5Config
    partitioner: partitioning.Partitioner
    tx: Any
    schedule: Any
    batches: pipeline.PairedBatches
    num_shards: int
    vocabulary_path: str | None  # the task vocabulary's file, pinned into MODEL_DIR
    initial: initial_checkpoint.Initial | None


def _vocabulary_file(task: seqio.Task | seqio.Mixture) -> str | None:
    return getattr(task.output_features["targets"].vocabulary, "sentencepiece_model_file", None)


def build(cfg: run_config.RunConfig, from_checkpoint: bool) -> tuple[RunSetup, Any]:
    """The run's setup and, when it starts from INITIAL_CHECKPOINT_PATH (not from one of its
    own checkpoints), the initial parameters (else None). Raises ValueError or
    FileNotFoundError naming the setting that cannot run."""
    _, initial_vocabulary = run_files.choose_training_vocabulary(cfg.model_dir,
                                                                 cfg.initial_checkpoint_path)
    label_task = pipeline.check_task(cfg.mixture_or_task_name, "MIXTURE_OR_TASK_NAME")
    if cfg.rationale_mixture_name is not None:
        pipeline.check_task(cfg.rationale_mixture_name, "RATIONALE_MIXTURE_NAME")
    check_splits(cfg)
    mesh = partitioning.make_mesh(cfg.mesh_shape)
    step_lib.check_batch_size(cfg.batch_size, mesh, cfg.num_microbatches)
    vocab_size = task_vocab_size(label_task)
    initial_params = None
    if cfg.initial_checkpoint_path and not from_checkpoint:
        model_config, initial_params, initial = initial_checkpoint.load(cfg, vocab_size)
    else:
        initial = initial_checkpoint.origin(cfg)
        model_config = initial_checkpoint.model_config(cfg, vocab_size)
    partitioner = partitioning.Partitioner(
        mesh, partitioning.logical_axis_rules(cfg.fsdp), model_config)
    if initial_params is not None:
        initial_checkpoint.check_params_match(initial_params, partitioner.abstract_params,
                                              model_config, cfg)
    tx, schedule = optimizer(cfg)
    shard_id, num_shards = distributed.process_batch_shard(mesh)
    # Packed steps have a varying number of rows: a multiple of what the mesh and the
    # micro-batches split (and of BATCH_SIZE / 8, to keep the compiled shapes few).
    batches = pipeline.PairedBatches(
        cfg.mixture_or_task_name, cfg.rationale_mixture_name, "train", cfg.batch_size,
        cfg.task_feature_lengths, seed=cfg.random_seed, shard_id=shard_id,
        num_shards=num_shards, data_fraction=cfg.data_fraction,
        fraction_seed=pipeline.fraction_seed(cfg.data_subset, cfg.random_seed), pack=cfg.pack,
        length_buckets=packing.length_buckets(cfg.task_feature_lengths, cfg.fixed_batch_shapes),
        use_cached=cfg.use_cached_tasks,
        pack_row_multiple=math.lcm(max(1, cfg.batch_size // 8),
                                   partitioner.num_data_shards * cfg.num_microbatches))
    vocabulary_path = _vocabulary_file(label_task)
    if initial is not None:
        initial = initial_checkpoint.with_vocabulary(initial, vocabulary_path,
                                                     initial_vocabulary)
    return RunSetup(model_config, partitioner, tx, schedule, batches, num_shards,
                    vocabulary_path, initial), initial_params


def eval_splits(cfg: run_config.RunConfig) -> list[str]:
    """The splits each eval decodes: EVAL_SPLIT (first EVAL_MAX_EXAMPLES; it picks the best
    checkpoint) and, with `test_every_eval`, the whole test split, as the reference logs it."""
    return [cfg.eval_split] + (["test"] if cfg.test_every_eval and cfg.eval_split != "test"
                               else [])


def eval_sets(cfg: run_config.RunConfig) -> dict[str, pipeline.EvalSet]:
    """The examples each periodic eval decodes, per split (see `eval_splits`)."""
    sets = {}
    for split in eval_splits(cfg):
        examples = pipeline.eval_set(cfg.mixture_or_task_name, split,
                                     cfg.task_feature_lengths["inputs"],
                                     cfg.task_feature_lengths["targets"], cfg.use_cached_tasks)
        sets[split] = (evaluation.subset(examples, cfg.eval_max_examples)
                       if split == cfg.eval_split else examples)
    return sets


def check_splits(cfg: run_config.RunConfig) -> None:
    """Every split the run will read has examples (a look at shard listings or the seqio
    cache's stats, nothing read), so a missing eval split stops the run before it compiles or
    trains, not at its first evaluation with nothing saved."""
    reads = {(cfg.mixture_or_task_name, "train"): ("MIXTURE_OR_TASK_NAME", "trained on")}
    if cfg.rationale_mixture_name is not None:
        reads[(cfg.rationale_mixture_name, "train")] = ("RATIONALE_MIXTURE_NAME", "trained on")
    if cfg.eval_period > 0:
        for split in eval_splits(cfg):
            reads.setdefault((cfg.mixture_or_task_name, split), (
                "MIXTURE_OR_TASK_NAME", f"evaluated every EVAL_PERIOD={cfg.eval_period} steps"))
    for (name, split), (setting, purpose) in reads.items():
        try:
            pipeline.count_examples(name, split, cfg.use_cached_tasks)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"{setting}={name!r}: split {split!r} ({purpose}): {exc}") from None
