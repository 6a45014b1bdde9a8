"""Orbax checkpoints of the train state plus the data-iterator state.

A checkpoint step directory `MODEL_DIR/checkpoints/<step>/` holds three items:
`params` and `opt_state` (sharded arrays, restored straight onto the current mesh) and `data`
(the paired pipeline's `state()` as JSON), so a resumed run continues from the exact batch it
would have seen. Steps are finalised atomically by orbax (a step killed mid-write stays a
temporary directory that `latest_step` ignores). Retention keeps the last K steps plus the best
step by an eval metric. Works with local and gs:// paths (orbax / etils.epath).

A finalised step folder can still be incomplete: keep-last-K deletion interrupted by a kill
leaves e.g. only `_CHECKPOINT_METADATA` and `commit_success.txt`. Readers (`all_steps`,
`latest_step`, `best_step`, `load_params`) treat such a step as not there and say so once on
stderr; a `Checkpointer` (the writer) removes it when it opens the folder, so the step can be
written again. `close()` waits for pending saves and deletions.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as preservation

CHECKPOINT_SUBDIR = "checkpoints"
_ITEMS = ("params", "opt_state", "data")
# The metadata file each item writes; an item folder without it cannot be read (orbax then
# fails with "'NoneType' object has no attribute 'tree'").
_ITEM_MARKERS = {"params": "_METADATA", "opt_state": "_METADATA", "data": "metadata"}
_warned_incomplete: set[str] = set()


class IncompleteCheckpointError(FileNotFoundError):
    """A finalised step folder lacks some of its items; the message names folder and items."""


def checkpoint_dir(model_dir: str) -> epath.Path:
    """Where a run's step directories live."""
    return epath.Path(model_dir) / CHECKPOINT_SUBDIR


def _resolve(path: str) -> epath.Path:
    """Accepts MODEL_DIR or MODEL_DIR/checkpoints."""
    path = epath.Path(path)
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).exists() else path


def missing_items(step_dir: epath.Path) -> list[str]:
    """The items of a step folder that are absent or lack their metadata file ([]: complete)."""
    return [item for item, marker in _ITEM_MARKERS.items()
            if not (step_dir / item / marker).exists()]


def _finalised_steps(directory: epath.Path) -> list[int]:
    return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.exists() else []


def _scan(directory: epath.Path) -> list[tuple[int, list[str]]]:
    """(step, missing items) of every finalised step, ascending."""
    return [(step, missing_items(directory / str(step))) for step in _finalised_steps(directory)]


def incomplete_steps(model_dir: str) -> dict[int, list[str]]:
    """Finalised steps whose items are (partly) gone -> the missing items. Read-only."""
    return {step: missing for step, missing in _scan(_resolve(model_dir)) if missing}


def _warn_incomplete(step_dir: epath.Path, missing: list[str]) -> None:
    """Says once per folder and process that a step is skipped, and why."""
    if str(step_dir) in _warned_incomplete:
        return
    _warned_incomplete.add(str(step_dir))
    print(f"sbs_jax.checkpoints: skipping incomplete checkpoint {step_dir} (missing "
          f"{', '.join(missing)}: an interrupted deletion or write)", file=sys.stderr, flush=True)


def all_steps(model_dir: str) -> list[int]:
    """Complete finalised checkpoint steps, ascending; [] when there are none. Never writes.

    A step whose items are missing (an interrupted deletion) is skipped with a note on stderr.
    """
    directory = _resolve(model_dir)
    complete = []
    for step, missing in _scan(directory):
        if missing:
            _warn_incomplete(directory / str(step), missing)
        else:
            complete.append(step)
    return complete


def latest_step(model_dir: str) -> int | None:
    """The newest finalised step in MODEL_DIR, or None. Read-only: safe while a run writes."""
    steps = all_steps(model_dir)
    return steps[-1] if steps else None


def step_metrics(model_dir: str, step: int) -> dict[str, float] | None:
    """The eval metrics saved with a step (None when it was saved without). Read-only."""
    path = _resolve(model_dir) / str(step) / "metrics" / "metrics"
    return json.loads(path.read_text()) if path.exists() else None


def best_step(model_dir: str, metric: str, mode: str = "max") -> int | None:
    """The kept step with the best `metric` (None if no step has it). Read-only."""
    sign = 1.0 if mode == "max" else -1.0
    scored = []
    for step in all_steps(model_dir):
        metrics = step_metrics(model_dir, step)
        if metrics and metric in metrics:
            scored.append((sign * float(metrics[metric]), step))
    return max(scored)[1] if scored else None


def load_params(model_dir: str, step: int | None = None) -> Any:
    """The parameters of `step` (default: the latest) as host numpy arrays.

    Needs no mesh and no knowledge of the optimizer, so eval/infer/convert and any number of
    devices can read a checkpoint written on any mesh.
    """
    directory = _resolve(model_dir)
    if step is None:
        step = latest_step(model_dir)
        if step is None:
            raise FileNotFoundError(f"no finalised checkpoint under {directory}")
    else:
        _check_complete(directory, step)
    path = directory / str(step) / "params"
    try:
        # The item handler's metadata: the checkpointer's would also look for step metadata
        # inside the item folder and warn that it is missing.
        handler = ocp.PyTreeCheckpointHandler()
        try:
            metadata = handler.metadata(path).tree
        finally:
            handler.close()
        with ocp.PyTreeCheckpointer() as checkpointer:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        metadata)
            return checkpointer.restore(
                path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as exc:  # orbax/tensorstore raise many types for a damaged folder
        raise IncompleteCheckpointError(
            f"checkpoint step {step} in {directory / str(step)} cannot be read ({exc}); "
            f"complete steps: {all_steps(str(directory))}") from exc


def _check_complete(directory: epath.Path, step: int) -> None:
    """Raises (FileNotFoundError) unless `step` is a finalised step with all its items."""
    step_dir = directory / str(step)
    if step not in _finalised_steps(directory):
        raise FileNotFoundError(
            f"checkpoint step {step} not found under {directory}; have {all_steps(str(directory))}"
        )
    missing = missing_items(step_dir)
    if missing:
        raise IncompleteCheckpointError(
            f"checkpoint step {step} in {step_dir} is incomplete: {', '.join(missing)} missing "
            f"(an interrupted deletion or write); complete steps: {all_steps(str(directory))}")


def remove_incomplete_steps(model_dir: str) -> list[int]:
    """Deletes finalised step folders whose items are gone; returns their steps.

    Only a writer of MODEL_DIR should call this (the Checkpointer does, on the lead process).
    """
    directory = _resolve(model_dir)
    removed = []
    for step, missing in sorted(incomplete_steps(str(directory)).items()):
        print(f"sbs_jax.checkpoints: removing incomplete checkpoint {directory / str(step)} "
              f"(missing {', '.join(missing)})", file=sys.stderr, flush=True)
        (directory / str(step)).rmtree()
        removed.append(step)
    return removed


class Checkpointer:
    """Saves and restores (params, opt_state, data state) for one MODEL_DIR.

    Only the lead process writes metadata; orbax coordinates array writes across hosts. On
    opening, the lead removes incomplete steps (see `remove_incomplete_steps`) before orbax
    lists the folder, so they are neither restored nor mistaken for already-saved steps.
    """

    def __init__(
        self,
        model_dir: str,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpointer.best_mode={best_mode!r} must be 'max' or 'min'")
        policies: list[preservation.PreservationPolicy] = [preservation.LatestN(n=keep_last)]
        sign = self._sign = 1.0 if best_mode == "max" else -1.0
        if best_metric is not None:
            policies.append(
                preservation.BestN(
                    get_metric_fn=lambda metrics: sign * float(metrics[best_metric]),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self.best_metric = best_metric
        self.directory = checkpoint_dir(model_dir)
        if jax.process_index() == 0:
            remove_incomplete_steps(str(self.directory))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sbs_jax.checkpoints.remove_incomplete_steps")
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=_ITEMS,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation.AnyPreservationPolicy(policies),
                enable_async_checkpointing=async_save,
                save_interval_steps=1,
                cleanup_tmp_directories=True,
                # Old steps are deleted in the save's finalize thread, which wait()/close() join:
                # a clean exit never leaves a half-deleted step.
                enable_background_delete=False,
                # Only with a best_fn does orbax persist the metrics that best_step() reads.
                best_fn=(lambda metrics: float(metrics[best_metric])) if best_metric else None,
                best_mode=best_mode,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best metric (None without a best metric or any metrics)."""
        if self.best_metric is None:
            return None
        return best_step(str(self.directory), self.best_metric, "max" if self._sign > 0 else "min")

    def save(
        self,
        step: int,
        params: Any,
        opt_state: Any,
        data_state: dict | None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts an (async) save of `step`; a step already saved is left as it is."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state or {}),
            ),
            metrics=metrics,
            force=True,
        )

    def restore(
        self, step: int, abstract_params: Any, abstract_opt_state: Any
    ) -> tuple[Any, Any, dict]:
        """Restores a step onto the shardings of the given abstract (ShapeDtypeStruct) trees."""
        _check_complete(self.directory, step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.params, restored.opt_state, dict(restored.data or {})

    def wait(self) -> None:
        """Blocks until pending async saves are finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and their deletions of old steps, then releases orbax."""
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def is_our_checkpoint(path: str) -> bool:
    """True for a MODEL_DIR (or its checkpoints/ folder) holding at least one finalised step."""
    return latest_step(path) is not None
