"""Validation by decoding: the label task's inputs -> greedy decode -> the task's metric_fns.

Only the label is decoded at test time (the paper's method). Batches are padded to a fixed
number of rows and to bucketed lengths so `sbs_jax.infer.decoding.generate` compiles a handful of
shapes once per process. Inputs shown to people come from the records' text
(`EvalSet.inputs_text`), never from decoding tokens: decoding stops at the first EOS, which
NLI inputs use as the premise/hypothesis separator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from sbs_jax import models
from sbs_jax.data import pipeline
from sbs_jax.data.pipeline import EvalSet
from sbs_jax.infer import decoding
from sbs_jax.models import T5Config
from sbs_jax.runtime import console
from sbs_jax.train import checkpoint_steps, checkpoints, partitioning, run_files
from sbs_jax.train.run_config import RunConfig


def decode_texts(
    config: T5Config, params: Any, eval_set: EvalSet, batch_size: int, max_decode_len: int = 64,
    input_cap: int | None = None, method: str = "greedy", mesh: Mesh | None = None,
    axis_rules: Sequence[tuple[str, Any]] | None = None,
) -> list[str]:
    """Decoded strings for every example of `eval_set`, in its order.

    With the run's `mesh` and `axis_rules` decoding runs on the mesh as training does (params
    sharded as trained, each device decoding its share of the rows over the data axes); without
    them every device would decode the whole batch. Every process must pass the same `eval_set`
    (they do: eval sets are read whole on each host). Process 0 shows the progress.
    """
    rows_per_batch = batch_size
    batch_sharding = None if mesh is None else partitioning.batch_sharding(mesh)
    if batch_sharding is not None:
        shards = _batch_shards(batch_sharding)
        rows_per_batch = -(-batch_size // shards) * shards
    texts: list[str] = [""] * len(eval_set.ids)
    progress = console.Progress(len(eval_set.ids), f"decoding {eval_set.task_name}",
                                enabled=jax.process_index() == 0)
    for rows, tokens in progress.track(eval_set.batches(batch_size, input_cap=input_cap),
                                       lambda batch: len(batch[0])):
        padded = np.zeros((rows_per_batch, tokens.shape[1]), np.int32)
        padded[: len(rows)] = tokens
        if batch_sharding is None:
            decoded = np.asarray(
                decoding.generate(config, params, padded, max_decode_len, method=method))
        else:
            placed = jax.make_array_from_callback(
                padded.shape, batch_sharding, lambda index, rows=padded: rows[index])
            decoded = np.asarray(multihost_utils.process_allgather(
                decoding.generate(config, params, placed, max_decode_len, method=method,
                                  mesh=mesh, axis_rules=axis_rules),
                tiled=True))
        for row, ids in zip(rows, decoded[: len(rows)]):
            texts[row] = eval_set.vocabulary.decode([int(t) for t in ids if t != 0])
    return texts


def _batch_shards(sharding: NamedSharding) -> int:
    """How many pieces the batch dimension is cut into by `sharding`."""
    rows = sharding.mesh.size  # divisible by any product of mesh axes
    return rows // sharding.shard_shape((rows, 1))[0]


def subset(eval_set: EvalSet, max_examples: int | None) -> EvalSet:
    """The first `max_examples` examples (ids are sorted, so the subset is stable)."""
    if max_examples is None or max_examples >= len(eval_set.ids):
        return eval_set
    return subset_rows(eval_set, list(range(int(max_examples))))


def subset_rows(eval_set: EvalSet, rows: list[int]) -> EvalSet:
    """The examples at `rows`, in that order (to align another task's examples by id)."""
    return dataclasses.replace(
        eval_set, ids=[eval_set.ids[r] for r in rows], inputs=[eval_set.inputs[r] for r in rows],
        inputs_text=[eval_set.inputs_text[r] for r in rows],
        targets=[eval_set.targets[r] for r in rows])


def evaluate(
    config: T5Config, params: Any, eval_set: EvalSet, batch_size: int, max_decode_len: int = 64,
    input_cap: int | None = None, mesh: Mesh | None = None,
    axis_rules: Sequence[tuple[str, Any]] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """(metrics from the task's metric_fns, raw decoded predictions); `mesh`/`axis_rules` as
    for `decode_texts`."""
    predictions = decode_texts(config, params, eval_set, batch_size, max_decode_len, input_cap,
                               mesh=mesh, axis_rules=axis_rules)
    metrics = {k: float(v) for k, v in eval_set.score(predictions).items()}
    metrics["num_examples"] = float(len(predictions))
    return metrics, predictions


def choose_step(model_dir: str, step: str | int, best_metric: str | None = "accuracy") -> int:
    """`latest`, `best` (by the eval metric saved with checkpoints; the latest when no step has
    one) or a step number, checked to exist. `latest` and `best` skip damaged steps (one line
    each, see checkpoint_steps.first_good); a damaged step number is refused when it is loaded."""
    params = ("params",)
    chosen = None
    if str(step) == "best" and best_metric is not None:
        ranked = checkpoint_steps.steps_by_metric(model_dir, best_metric)
        chosen = checkpoint_steps.first_good(model_dir, ranked, params) if ranked else None
    elif str(step) not in ("latest", "best"):
        chosen = int(step)
    if chosen is None and str(step) in ("latest", "best"):
        chosen = checkpoint_steps.latest_good_step(model_dir, params)
    if chosen is None:
        raise FileNotFoundError(f"MODEL_DIR={model_dir} has no finalised, undamaged checkpoint")
    return chosen


def place_on_mesh(config: T5Config, params: Any, mesh_shape: Sequence[int], fsdp: bool
                  ) -> tuple[Any, Mesh, tuple]:
    """(host params sharded over the run's mesh the way the trainer shards them, the mesh, its
    logical axis rules) to decode with: a model that needed a mesh to train is also evaluated
    on one."""
    mesh = partitioning.make_mesh(mesh_shape)
    rules = partitioning.logical_axis_rules(fsdp)
    shardings = partitioning.params_shardings(models.abstract_params(config), mesh, rules)
    # As step.init_state places host params (every process holds the same values).
    return jax.device_put(params, shardings), mesh, rules


def load_trained(model_dir: str, step: int) -> tuple[T5Config, Any]:
    """Host params of a step and the architecture that fits them (model_config.json /
    run_config.json, sizes read from the parameter shapes)."""
    params = checkpoints.load_params(model_dir, step)
    return models.config_from_params(params, run_files.base_config(model_dir, None)), params


def load_for_decoding(cfg: RunConfig, step: str | int) -> tuple[int, T5Config, Any, Mesh, tuple]:
    """(the chosen step, its T5Config, its params on the run's mesh, the mesh, its logical axis
    rules): what eval and infer decode with (ValueError / FileNotFoundError name the problem)."""
    pipeline.check_task(cfg.mixture_or_task_name, "MIXTURE_OR_TASK_NAME")
    chosen = choose_step(cfg.model_dir, step, cfg.best_metric)
    config, params = load_trained(cfg.model_dir, chosen)
    params, mesh, rules = place_on_mesh(config, params, cfg.mesh_shape, cfg.fsdp)
    return chosen, config, params, mesh, rules
