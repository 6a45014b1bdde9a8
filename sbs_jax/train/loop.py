"""The training loop: steps, eval, checkpoints, logs, preemption (what it runs on: run_setup.py).

Side effects live here (files, signals, the console); the math is in step.py. A run resumes
from the newest good checkpoint in MODEL_DIR (params, optimizer state and the data iterator's
position; damaged steps are skipped, see checkpoint_steps.py), so a run killed at any moment and
restarted reaches the same parameters as one that never stopped. One trainer holds MODEL_DIR at
a time (run_lock.py); a SIGTERM checkpoints after a step that every process agrees on
(preemption.py). Only process 0 writes logs, configs and summaries; orbax coordinates the
checkpoint writes of all processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import numpy as np

# isort: split
# First, so TF loads quietly and with GPUs hidden before seqio imports it.
from sbs_jax.runtime.tf_setup import tf  # noqa: F401

# isort: split
import seqio
from etils import epath

from sbs_jax import models
from sbs_jax.infer import evaluation
from sbs_jax.runtime import console
from sbs_jax.train import (
    checkpoint_steps,
    checkpoints,
    partitioning,
    preemption,
    run_config,
    run_files,
    run_lock,
    run_setup,
)
from sbs_jax.train import (
    step as step_lib,
)
from tasks import config as tasks_config

SUMMARY_FILE = "run_summary.json"
GIN_FILE = "config.gin"
PREEMPTED_EXIT_CODE = 143


class SetupError(ValueError):
    """The configuration cannot run (unknown task, bad BATCH_SIZE, conflicting MODEL_DIR...);
    the message names the setting. Raised before any training step."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the update became NaN/Inf; the message says which step and which checkpoint
    is kept."""


# Step metrics checked before any save: a bad value means the new parameters must not be kept.
_MUST_BE_FINITE = ("loss", "grad_norm", "update_norm")


def _non_finite_advice(model_dir: str, resumed_from: int | None) -> str:
    """What a NaN/Inf says about MODEL_DIR's checkpoints. Steps this run saved passed the finite
    check; a step it restored did not: its bytes may be damaged (or saved without checksums)."""
    kept = checkpoint_steps.latest_step(model_dir)
    where = checkpoint_steps.checkpoint_dir(model_dir)
    if kept is None:
        return (f"No checkpoint was saved in {where}; lower LEARNING_RATE or check the data "
                "before resuming.")
    if kept == resumed_from:
        return (f"Step {kept} was restored from {where / str(kept)}, which may be damaged: move "
                f"it aside (to {checkpoint_steps.DAMAGED_SUBDIR}/) to resume from the step before "
                "it, or start again with a new MODEL_DIR.")
    return (f"The last good checkpoint (step {kept}) is kept in {where}; lower LEARNING_RATE or "
            "check the data before resuming.")


def _batch_tokens(local: dict, num_shards: int) -> int:
    """Real (non-pad) input + target tokens of the global batch, estimated from this shard."""
    total = 0
    for view in step_lib.VIEWS:
        if view in local:
            total += int(np.count_nonzero(local[view]["encoder_input_tokens"]))
            total += int(np.sum(local[view]["decoder_loss_weights"]))
    return total * num_shards


def _progress_line(step: int, total: int, metrics: dict, tokens_per_s: float | None,
                   compile_s: float, eta_s: float | None) -> str:
    """One console line; throughput and ETA show '-' until a step that did not compile is
    timed, and the seconds spent compiling since the last line are shown apart."""
    parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}",
             f"label {metrics['label_loss']:.4f}"]
    if "rationale_loss" in metrics:
        parts.append(f"rationale {metrics['rationale_loss']:.4f}")
    parts.append(f"lr {metrics['learning_rate']:.3g}")
    parts.append(f"{tokens_per_s:,.0f} tok/s" if tokens_per_s is not None else "- tok/s")
    if compile_s:
        parts.append(f"compile {compile_s:.1f}s")
    parts.append(f"ETA {console.format_duration(eta_s)}" if eta_s is not None else "ETA -")
    return " | ".join(parts)


def _read_eval_history(model_dir: str) -> list[dict]:
    """`{step, split, metrics...}` of every eval so far (a resumed run keeps those it reached)."""
    path = epath.Path(model_dir) / run_config.EVAL_HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(cfg: run_config.RunConfig, operative_gin: str | None = None) -> dict:
    """Trains to TRAIN_STEPS (resuming from MODEL_DIR's newest good checkpoint); returns the
    summary. Holds MODEL_DIR's trainer lock throughout: a second trainer is a SetupError."""
    try:
        lock = run_lock.RunLock(cfg.model_dir).acquire()
    except run_lock.ModelDirError as exc:
        raise SetupError(str(exc)) from exc
    with lock, tasks_config.overrides_restored():  # the run's vocabulary, for this run only
        return _train(cfg, operative_gin)


def _train(cfg: run_config.RunConfig, operative_gin: str | None) -> dict:
    is_lead = jax.process_index() == 0
    start_time = time.time()
    try:
        run_config.check_against_saved(cfg)
        resume_step = checkpoint_steps.latest_good_step(cfg.model_dir, set_aside=True)
        setup, initial_params = run_setup.build(cfg, from_checkpoint=resume_step is not None)
    except (ValueError, FileNotFoundError) as exc:
        raise SetupError(str(exc)) from exc
    part = setup.partitioner
    evaluate_now = cfg.eval_period > 0
    # The look for resume_step above has set damaged steps aside (swept).
    checkpointer = checkpoints.Checkpointer(
        cfg.model_dir, keep_last=cfg.keep_checkpoints,
        best_metric=cfg.best_metric if evaluate_now else None,
        async_save=cfg.async_checkpointing, swept=True)
    if resume_step is not None:
        try:
            params, opt_state, data_state = checkpointer.restore(
                resume_step, part.abstract_params, part.abstract_opt_state(setup.tx))
        except checkpoint_steps.DamagedCheckpointError as exc:  # a step saved without checksums
            checkpointer.close()
            raise SetupError(str(exc)) from exc
        state = partitioning.TrainState(
            step=jax.device_put(np.int32(resume_step), part.replicated),
            params=params, opt_state=opt_state)
        if data_state:  # a step written by `sbs-convert --to=ours` has no data position yet
            setup.batches.restore(data_state)
    else:
        state = step_lib.init_state(part, setup.model_config, setup.tx, cfg.random_seed,
                                    params=initial_params)
        if initial_params is not None and is_lead:
            console.say(f"initialised from {setup.initial.describe()}")
            if note := setup.initial.vocabulary_note():
                console.say(note)
    if is_lead:
        run_config.save(cfg)
        run_files.pin(cfg.model_dir, setup.vocabulary_path, tasks_config.data_dir(),
                      seqio.get_global_cache_dirs() if cfg.use_cached_tasks else ())
        run_config.write_text(epath.Path(cfg.model_dir) / run_files.MODEL_CONFIG_FILE,
                              models.config_to_json(setup.model_config))
        if operative_gin is not None:
            run_config.write_text(epath.Path(cfg.model_dir) / GIN_FILE, operative_gin)
    options = run_setup.step_options(cfg)
    step_fn = step_lib.make_train_step(part, models.T5(setup.model_config), setup.tx,
                                       setup.schedule, options)
    eval_examples = None
    from clu import metric_writers  # after tf_setup: clu imports TensorFlow

    writer = metric_writers.create_default_writer(cfg.model_dir, just_logging=not is_lead)
    step = int(resume_step or 0)
    logged: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    eval_history = [h for h in _read_eval_history(cfg.model_dir) if h["step"] <= step]
    pending: list[dict] = []
    timer = console.StepTimer()
    if is_lead:
        console.say(f"training {cfg.model_name} on {cfg.mixture_or_task_name}"
                    f"{' + ' + cfg.rationale_mixture_name if cfg.rationale_mixture_name else ''}"
                    f" | mesh {dict(part.mesh.shape)} | steps {step}->{cfg.train_steps}")

    def flush_metrics(at_step: int) -> dict[str, float]:
        """Fetches pending step metrics, checks they are finite, writes their mean."""
        nonlocal pending
        fetched = jax.device_get(pending)
        pending = []
        first = at_step - len(fetched) + 1
        for offset, values in enumerate(fetched):
            bad = [k for k in _MUST_BE_FINITE
                   if k in values and not math.isfinite(float(values[k]))]
            if bad:
                raise NonFiniteLossError(
                    f"{bad[0]} is {float(values[bad[0]])} at step {first + offset}; stopping. "
                    + _non_finite_advice(cfg.model_dir, resume_step))
        if not fetched:
            return {}
        return {k: float(np.mean([f[k] for f in fetched])) for k in fetched[-1]}

    try:
        with preemption.PreemptionNotice() as notice, timer:
            while step < cfg.train_steps:
                local = next(setup.batches)
                global_batches = {
                    v: step_lib.global_batch(
                        local[v], part.batch_sharding,
                        len(local[v]["encoder_input_tokens"]) * setup.num_shards)
                    for v in step_lib.VIEWS if v in local}
                state, metrics = timer.run(step_fn, state, global_batches,
                                           _batch_tokens(local, setup.num_shards))
                step += 1
                pending.append(metrics)
                final = step == cfg.train_steps
                # Asked once a step, on every process: a signal landing between the save
                # decision and the exit check must not exit without saving this step.
                stop_requested = notice.reached(step)
                eval_due = evaluate_now and (step % cfg.eval_period == 0 or final)
                save_due = (step % cfg.checkpoint_period == 0 or final or stop_requested
                            or (eval_due and cfg.best_metric is not None))
                log_due = step % cfg.log_period == 0 or final or save_due
                if log_due:
                    logged = flush_metrics(step)
                    tokens_per_s, compile_s = timer.window()
                    if tokens_per_s is not None:
                        logged["tokens_per_s"] = tokens_per_s
                    writer.write_scalars(step, logged)
                    if is_lead:
                        console.say(_progress_line(
                            step, cfg.train_steps, logged, tokens_per_s, compile_s,
                            timer.eta_s(step, cfg.train_steps, cfg.eval_period)))
                if eval_due:
                    if eval_examples is None:
                        eval_examples = run_setup.eval_sets(cfg)
                    scores = {}
                    for split, examples in eval_examples.items():
                        with timer.evaluation(step) as took:
                            scores[split] = evaluation.evaluate(
                                setup.model_config, state.params, examples, cfg.eval_batch_size,
                                cfg.max_decode_len, mesh=part.mesh, axis_rules=part.rules)[0]
                        if is_lead:
                            console.say(f"eval step {step} ({split}): "
                                        f"{console.format_metrics(scores[split])} | {took}")
                    eval_metrics = scores[cfg.eval_split]
                    for split, values in scores.items():
                        prefix = "eval" if split == cfg.eval_split else f"eval_{split}"
                        writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in values.items()})
                    eval_history = [*(h for h in eval_history if h["step"] < step),
                                    *({"step": step, "split": split, **values}
                                      for split, values in scores.items())]
                    if is_lead:
                        run_config.write_text(
                            epath.Path(cfg.model_dir) / run_config.EVAL_HISTORY_FILE,
                            "".join(json.dumps(h) + "\n" for h in eval_history))
                if save_due:
                    with timer.saving():
                        checkpointer.save(step, state.params, state.opt_state,
                                          setup.batches.state(),
                                          metrics=eval_metrics if eval_due else None)
                if stop_requested and not final:
                    checkpointer.wait()
                    if is_lead:
                        console.say(f"SIGTERM: checkpoint of step {step} saved; exiting")
                    raise SystemExit(PREEMPTED_EXIT_CODE)
        if pending:
            logged = flush_metrics(step)
        checkpointer.save(step, state.params, state.opt_state, setup.batches.state())
        checkpointer.wait()
        best_step = checkpointer.best_step()
    finally:
        checkpointer.close()
        writer.flush()
    summary = {
        "step": step, "train_steps": cfg.train_steps, "resumed_from": resume_step,
        "initialised_from": dataclasses.asdict(setup.initial) if setup.initial else None,
        "final_train_metrics": logged, "eval_metrics": eval_metrics,
        "best_step": best_step, "best_metric": cfg.best_metric,
        "tokens_per_s": timer.throughput.tokens_per_s,
        "compile_s": round(timer.compile_s, 2), "compiles": timer.compiles,
        "eval_compile_s": round(timer.eval_compile_s, 2),
        "wall_s": round(time.time() - start_time, 2), "mesh": dict(part.mesh.shape),
        "num_devices": jax.device_count(), "num_processes": jax.process_count(),
        "model_config": dataclasses.asdict(setup.model_config),
        "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(part.abstract_params))),
    }
    if is_lead:
        run_config.write_text(epath.Path(cfg.model_dir) / SUMMARY_FILE,
                              json.dumps(summary, indent=1, default=str) + "\n")
    return summary
