"""Orbax checkpoints of the train state plus the data-iterator state.

A checkpoint step directory `MODEL_DIR/checkpoints/<step>/` holds three items:
`params` and `opt_state` (sharded arrays, restored straight onto the current mesh) and `data`
(the paired pipeline's `state()` as JSON), so a resumed run continues from the exact batch it
would have seen. Steps are finalised atomically by orbax (a step killed mid-write stays a
temporary directory that `latest_step` ignores). Retention keeps the last K steps plus the best
step by an eval metric. Works with local and gs:// paths (orbax / etils.epath).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as preservation

CHECKPOINT_SUBDIR = "checkpoints"
_ITEMS = ("params", "opt_state", "data")


def checkpoint_dir(model_dir: str) -> epath.Path:
    """Where a run's step directories live."""
    return epath.Path(model_dir) / CHECKPOINT_SUBDIR


def _resolve(path: str) -> epath.Path:
    """Accepts MODEL_DIR or MODEL_DIR/checkpoints."""
    path = epath.Path(path)
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).exists() else path


def all_steps(model_dir: str) -> list[int]:
    """Finalised checkpoint steps, ascending; [] when there are none. Never writes anything."""
    directory = _resolve(model_dir)
    if not directory.exists():
        return []
    return sorted(ocp.path.step.checkpoint_steps(directory))


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
    elif step not in all_steps(model_dir):
        raise FileNotFoundError(
            f"checkpoint step {step} not found under {directory}; have {all_steps(model_dir)}"
        )
    path = directory / str(step) / "params"
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


class Checkpointer:
    """Saves and restores (params, opt_state, data state) for one MODEL_DIR.

    Only the lead process writes metadata; orbax coordinates array writes across hosts.
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
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=_ITEMS,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation.AnyPreservationPolicy(policies),
                enable_async_checkpointing=async_save,
                save_interval_steps=1,
                cleanup_tmp_directories=True,
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
