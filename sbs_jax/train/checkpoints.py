"""Orbax checkpoints of the train state plus the data-iterator state.

A checkpoint step directory `MODEL_DIR/checkpoints/<step>/` holds three items:
`params` and `opt_state` (sharded arrays, restored straight onto the current mesh) and `data`
(the paired pipeline's `state()` as JSON), so a resumed run continues from the exact batch it
would have seen. Steps are finalised atomically by orbax (a step killed mid-write stays a
temporary directory that `latest_step` ignores). Retention keeps the last K steps plus the best
step by an eval metric. Works with local and gs:// paths (orbax / etils.epath). Which steps are
there and which can be used (complete, undamaged) is `checkpoint_steps`'s job; every step read
here is checked by it first. `close()` waits for pending saves and deletions.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sbs_jax.train import checkpoint_steps, checksums


def load_params(model_dir: str, step: int | None = None) -> Any:
    """The parameters of `step` (default: the latest) as host numpy arrays.

    Needs no mesh and no knowledge of the optimizer, so eval/infer/convert and any number of
    devices can read a checkpoint written on any mesh.
    """
    directory = checkpoint_steps.steps_folder(model_dir)
    if step is None:
        step = checkpoint_steps.latest_good_step(model_dir, ("params",))
        if step is None:
            damaged = " that is undamaged" if checkpoint_steps.all_steps(str(directory)) else ""
            raise FileNotFoundError(f"no finalised checkpoint under {directory}{damaged}")
    else:
        checkpoint_steps.check_usable(directory, step, ("params",))
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
        raise _unreadable(directory, step, exc) from exc


def _unreadable(directory: epath.Path, step: int,
                exc: Exception) -> checkpoint_steps.DamagedCheckpointError:
    """A one-line error for a step that orbax could not read."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return checkpoint_steps.DamagedCheckpointError(
        f"checkpoint step {step} in {directory / str(step)} cannot be read ({reason}); "
        f"complete steps: {checkpoint_steps.all_steps(str(directory))}; move the step aside to "
        "use another")


class Checkpointer:
    """Saves and restores (params, opt_state, data state) for one MODEL_DIR.

    Only the lead process writes metadata and checksum manifests; orbax coordinates array
    writes across hosts. On opening, the lead removes incomplete steps (see
    `checkpoint_steps.remove_incomplete_steps`) and moves damaged ones newer than the newest
    good one aside (`latest_good_step(set_aside=True)`) before orbax lists the folder, so they
    are neither restored nor mistaken for already-saved steps; `swept=True` says the caller
    has just done that itself (on every process), so the steps are not verified twice.
    Saves always run through orbax's async path (its post-finalisation callback writes the
    manifest); `async_save=False` waits for each save to finish.
    """

    def __init__(
        self,
        model_dir: str,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        swept: bool = False,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpointer.best_mode={best_mode!r} must be 'max' or 'min'")
        policies: list[ocp.checkpoint_managers.PreservationPolicy] = [
            ocp.checkpoint_managers.LatestN(n=keep_last)]
        sign = self._sign = 1.0 if best_mode == "max" else -1.0
        if best_metric is not None:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: sign * float(metrics[best_metric]),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self.best_metric = best_metric
        self.directory = checkpoint_steps.checkpoint_dir(model_dir)
        self._async = async_save
        self._saving: int | None = None
        if jax.process_index() == 0:
            checkpoint_steps.remove_incomplete_steps(str(self.directory))
        if not swept:
            checkpoint_steps.latest_good_step(str(self.directory), set_aside=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sbs_jax.train.checkpoints.prepare_steps")
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=checkpoint_steps.ITEMS,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
                enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(
                    post_finalization_callback=self._write_manifest),
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

    def _write_manifest(self) -> None:
        """orbax's post-finalisation callback (lead process, all writes merged, not committed
        yet): checksums into the step's temporary folder, so they commit with it."""
        pending = sorted(self.directory.glob(f"{self._saving}{ocp.path.step.TMP_DIR_SUFFIX}*"),
                         key=lambda path: path.stat().mtime)
        checksums.write_manifest(pending[-1] if pending else self.directory / str(self._saving))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best metric (None without a best metric or any metrics)."""
        if self.best_metric is None:
            return None
        return checkpoint_steps.best_step(str(self.directory), self.best_metric,
                                          "max" if self._sign > 0 else "min")

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
        self._manager.wait_until_finished()  # as save() would: the manifest callback's step
        self._saving = step
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
        if not self._async:
            self._manager.wait_until_finished()

    def restore(
        self, step: int, abstract_params: Any, abstract_opt_state: Any
    ) -> tuple[Any, Any, dict]:
        """Restores a step onto the shardings of the given abstract (ShapeDtypeStruct) trees;
        a damaged or unreadable step is a one-line DamagedCheckpointError."""
        checkpoint_steps.check_usable(self.directory, step, checkpoint_steps.ITEMS)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as exc:  # orbax/tensorstore raise many types for a damaged folder
            raise _unreadable(self.directory, step, exc) from exc
        return restored.params, restored.opt_state, dict(restored.data or {})

    def wait(self) -> None:
        """Blocks until pending async saves are finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and their deletions of old steps, then releases orbax."""
        self._manager.wait_until_finished()
        self._manager.close()
