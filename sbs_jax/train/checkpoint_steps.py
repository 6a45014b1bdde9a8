"""The step folders of MODEL_DIR/checkpoints/: which there are, which can be used, which is best.

A finalised step folder can still be incomplete: keep-last-K deletion interrupted by a kill
leaves e.g. only `_CHECKPOINT_METADATA` and `commit_success.txt`. Readers (`all_steps`,
`latest_step`, `best_step`, `load_params`) treat such a step as not there and say so once on
stderr; a writer (`checkpoints.Checkpointer`) removes it when it opens the folder, so the step
can be written again.

A complete step can be damaged later (a truncated or overwritten file): every step records the
checksums of its files (`sbs_jax.train.checksums`), and whatever reads a step verifies the files
it reads. `first_good` is the one place that picks a step (newest or best first), reporting each
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

import jax
import orbax.checkpoint as ocp
from etils import epath

from sbs_jax.runtime import distributed
from sbs_jax.train import checksums

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged_checkpoints"
ITEMS = ("params", "opt_state", "data")
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


def steps_folder(path: str) -> epath.Path:
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
    return {step: missing for step, missing in _scan(steps_folder(model_dir)) if missing}


def _warn_incomplete(step_dir: epath.Path, missing: list[str]) -> None:
    """Says once per folder and process that a step is skipped, and why."""
    if str(step_dir) in _warned_incomplete:
        return
    _warned_incomplete.add(str(step_dir))
    print(f"sbs_jax.train.checkpoint_steps: skipping incomplete checkpoint {step_dir} (missing "
          f"{', '.join(missing)}: an interrupted deletion or write)", file=sys.stderr, flush=True)


def all_steps(model_dir: str) -> list[int]:
    """Complete finalised checkpoint steps, ascending; [] when there are none. Never writes.

    A step whose items are missing (an interrupted deletion) is skipped with a note on stderr.
    """
    directory = steps_folder(model_dir)
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
    path = steps_folder(model_dir) / str(step) / "metrics" / "metrics"
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


def first_good(model_dir: str, candidates: Iterable[int], items: tuple[str, ...] = ITEMS,
               set_aside: bool = False) -> int | None:
    """The first of `candidates` whose `items` match their checksums (None if none does).

    Each damaged candidate before it is reported in one line on stderr and, with `set_aside`
    (writers only), moved to MODEL_DIR/damaged_checkpoints/. On several processes process 0
    verifies and every process gets its answer (all of them must call this).
    """
    directory = steps_folder(model_dir)
    chosen = -1
    if jax.process_index() == 0:
        for step in candidates:
            problem = checksums.damage(directory / str(step), items)
            if problem is None:
                chosen = step
                break
            where = f"; moved to {move_aside(directory, step)}" if set_aside else ""
            if set_aside or str(directory / str(step)) not in _warned_damaged:
                _warned_damaged.add(str(directory / str(step)))
                print(f"sbs_jax.train.checkpoint_steps: skipping damaged checkpoint "
                      f"{directory / str(step)}: {problem}{where}", file=sys.stderr, flush=True)
    chosen = distributed.value_of_process_0(chosen)
    return None if chosen < 0 else chosen


def latest_good_step(model_dir: str, items: tuple[str, ...] = ITEMS,
                     set_aside: bool = False) -> int | None:
    """The newest step whose `items` match their checksums (see `first_good`; `set_aside` moves
    the damaged steps after it away, so that a resumed run writes them afresh). Reads the files:
    use `latest_step` where only the folder listing matters."""
    return first_good(model_dir, reversed(all_steps(model_dir)), items, set_aside)


def move_aside(directory: epath.Path, step: int) -> epath.Path:
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


def check_usable(directory: epath.Path, step: int, items: tuple[str, ...]) -> None:
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
    directory = steps_folder(model_dir)
    removed = []
    for step, missing in sorted(incomplete_steps(str(directory)).items()):
        print(f"sbs_jax.train.checkpoint_steps: removing incomplete checkpoint "
              f"{directory / str(step)} (missing {', '.join(missing)})", file=sys.stderr,
              flush=True)
        (directory / str(step)).rmtree()
        removed.append(step)
    return removed


def is_our_checkpoint(path: str) -> bool:
    """True for a MODEL_DIR (or its checkpoints/ folder) holding at least one finalised step."""
    return latest_step(path) is not None
