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

A complete step can be damaged later (a truncated or overwritten file): every step records the
checksums of its files (`sbs_jax.train.checksums`), and whatever reads a step verifies the files it
reads. `first_good` is the one place that picks a step (newest or best first), reporting each
damaged one in one line and skipping it; `latest_good_step`, `load_params`, `restore` and eval's
step choice go through it. A writer moves damaged steps newer than the newest good one to
`MODEL_DIR/damaged_checkpoints/`. `latest_step` / `all_steps` read only the folder listing: safe
while a trainer writes, and they may name a damaged step. A step without a checksum manifest
loads unverified, with one line saying so.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sbs_jax.runtime import distributed
from sbs_jax.train import checksums

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged_checkpoints"
_ITEMS = ("params", "opt_state", "data")
# The metadata file each item writes; an item folder without it cannot be read (orbax then
# fails with "'NoneType' object has no attribute 'tree'").
_ITEM_MARKERS = {"params": "_METADATA", "opt_state": "_METADATA", "data": "metadata"}
_warned_incomplete: set[str] = set()
_warned_damaged: set[str] = set()


class IncompleteCheckpointError(FileNotFoundError):
    """A finalised step folder lacks some of its items; the message names folder and items."""


class DamagedCheckpointError(IncompleteCheckpointError):
    """A step's files differ from their checksums or cannot be read; the message says which."""


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
    print(f"sbs_jax.train.checkpoints: skipping incomplete checkpoint {step_dir} (missing "
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
    """The newest finalised step in MODEL_DIR, or None. Read-only: safe while a run writes.

    Reads only the folder listing, so it may name a damaged step: `latest_good_step` verifies.
    """
    steps = all_steps(model_dir)
    return steps[-1] if steps else None


def step_metrics(model_dir: str, step: int) -> dict[str, float] | None:
    """The eval metrics saved with a step (None when it was saved without). Read-only."""
    path = _resolve(model_dir) / str(step) / "metrics" / "metrics"
    return json.loads(path.read_text()) if path.exists() else None


def steps_by_metric(model_dir: str, metric: str, mode: str = "max") -> list[int]:
    """The kept steps saved with `metric`, best first (ties: the newer first). Read-only."""
    sign = 1.0 if mode == "max" else -1.0
    scored = []
    for step in all_steps(model_dir):
        metrics = step_metrics(model_dir, step)
        if metrics and metric in metrics:
            scored.append((sign * float(metrics[metric]), step))
    return [step for _, step in sorted(scored, reverse=True)]


def best_step(model_dir: str, metric: str, mode: str = "max") -> int | None:
    """The kept step with the best `metric` (None if no step has it). Read-only."""
    ranked = steps_by_metric(model_dir, metric, mode)
    return ranked[0] if ranked else None


def first_good(model_dir: str, candidates: Iterable[int], items: tuple[str, ...] = _ITEMS,
               set_aside: bool = False) -> int | None:
    """The first of `candidates` whose `items` match their checksums (None if none does).

    Each damaged candidate before it is reported in one line on stderr and, with `set_aside`
    (writers only), moved to MODEL_DIR/damaged_checkpoints/. On several processes process 0
    verifies and every process gets its answer (all of them must call this).
    """
    directory = _resolve(model_dir)
    chosen = -1
    if jax.process_index() == 0:
        for step in candidates:
            problem = checksums.damage(directory / str(step), items)
            if problem is None:
                chosen = step
                break
            where = f"; moved to {_move_aside(directory, step)}" if set_aside else ""
            if set_aside or str(directory / str(step)) not in _warned_damaged:
                _warned_damaged.add(str(directory / str(step)))
                print(f"sbs_jax.train.checkpoints: skipping damaged checkpoint "
                      f"{directory / str(step)}: {problem}{where}", file=sys.stderr, flush=True)
    chosen = distributed.value_of_process_0(chosen)
    return None if chosen < 0 else chosen


def latest_good_step(model_dir: str, items: tuple[str, ...] = _ITEMS,
                     set_aside: bool = False) -> int | None:
    """The newest step whose `items` match their checksums (see `first_good`; `set_aside` moves
    the damaged steps after it away, so that a resumed run writes them afresh). Reads the files:
    use `latest_step` where only the folder listing matters."""
    return first_good(model_dir, reversed(all_steps(model_dir)), items, set_aside)


def _move_aside(directory: epath.Path, step: int) -> epath.Path:
    """Moves a damaged step folder to MODEL_DIR/damaged_checkpoints/ (kept for a look)."""
    target = directory.parent / DAMAGED_SUBDIR / str(step)
    suffix = 0
    while target.exists():
        suffix += 1
        target = directory.parent / DAMAGED_SUBDIR / f"{step}.{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        (directory / str(step)).rename(target)
    except (OSError, NotImplementedError) as exc:
        raise DamagedCheckpointError(
            f"checkpoint step {step} in {directory / str(step)} is damaged and cannot be moved "
            f"to {target} ({exc}); move or delete it, then start again") from exc
    return target


def load_params(model_dir: str, step: int | None = None) -> Any:
    """The parameters of `step` (default: the latest) as host numpy arrays.

    Needs no mesh and no knowledge of the optimizer, so eval/infer/convert and any number of
    devices can read a checkpoint written on any mesh.
    """
    directory = _resolve(model_dir)
    if step is None:
        step = latest_good_step(model_dir, ("params",))
        if step is None:
            damaged = " that is undamaged" if all_steps(str(directory)) else ""
            raise FileNotFoundError(f"no finalised checkpoint under {directory}{damaged}")
    else:
        _check_usable(directory, step, ("params",))
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


def _unreadable(directory: epath.Path, step: int, exc: Exception) -> DamagedCheckpointError:
    """A one-line error for a step that orbax could not read."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return DamagedCheckpointError(
        f"checkpoint step {step} in {directory / str(step)} cannot be read ({reason}); "
        f"complete steps: {all_steps(str(directory))}; move the step aside to use another")


def _check_usable(directory: epath.Path, step: int, items: tuple[str, ...]) -> None:
    """Raises unless `step` is a finalised step with all its items (FileNotFoundError,
    IncompleteCheckpointError) whose `items` match their checksums (DamagedCheckpointError)."""
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
    problem = checksums.damage(step_dir, items) if jax.process_index() == 0 else None
    if distributed.value_of_process_0(int(problem is not None)):
        raise DamagedCheckpointError(
            f"checkpoint step {step} in {step_dir} is damaged: {problem or 'see process 0'}; "
            "without a step number the newest good step is read")


def remove_incomplete_steps(model_dir: str) -> list[int]:
    """Deletes finalised step folders whose items are gone; returns their steps.

    Only a writer of MODEL_DIR should call this (the Checkpointer does, on the lead process).
    """
    directory = _resolve(model_dir)
    removed = []
    for step, missing in sorted(incomplete_steps(str(directory)).items()):
        print(f"sbs_jax.train.checkpoints: removing incomplete checkpoint {directory / str(step)} "
              f"(missing {', '.join(missing)})", file=sys.stderr, flush=True)
        (directory / str(step)).rmtree()
        removed.append(step)
    return removed


class Checkpointer:
    """Saves and restores (params, opt_state, data state) for one MODEL_DIR.

    Only the lead process writes metadata and checksum manifests; orbax coordinates array
    writes across hosts. On opening, the lead removes incomplete steps (see
    `remove_incomplete_steps`) and moves damaged ones newer than the newest good one aside
    (`latest_good_step(set_aside=True)`) before orbax lists the folder, so they are neither
    restored nor mistaken for already-saved steps.
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
        self.directory = checkpoint_dir(model_dir)
        self._async = async_save
        self._saving: int | None = None
        if jax.process_index() == 0:
            remove_incomplete_steps(str(self.directory))
        latest_good_step(str(self.directory), set_aside=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sbs_jax.train.checkpoints.prepare_steps")
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=_ITEMS,
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
        _check_usable(self.directory, step, _ITEMS)
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


def is_our_checkpoint(path: str) -> bool:
    """True for a MODEL_DIR (or its checkpoints/ folder) holding at least one finalised step."""
    return latest_step(path) is not None
