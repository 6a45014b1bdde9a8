"""Runs the experiment grid's cells (`sbs-experiments`): each trains through `python -m
sbs_jax.train` and is scored by `python -m sbs_jax.eval` on the cell's gin flags
(`sbs_jax.experiments.grid`), its output streamed to the console and to the cell's logs.

A cell is finished when `results.json` exists in its folder: a re-run skips finished cells and
an interrupted cell resumes from its last checkpoint (the trainer's exact resume). A finished
cell whose recorded settings differ from the current ones is an error, so a table never
silently mixes two recipes (`sbs_jax.experiments.report` makes the tables).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

from sbs_jax.experiments import report
from sbs_jax.experiments.grid import Cell, Recipe, cell_settings, gin_flags
from sbs_jax.runtime import console
from sbs_jax.train.run_config import CONFIG_FILE, EVAL_HISTORY_FILE

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


# Start-up chatter of TF / XLA / SentencePiece / orbax on a CPU machine: kept in the logs only.
CONSOLE_NOISE = (
    "cudart_stub.cc", "cuda_platform.cc", "cuda_executor.cc", "absl::InitializeLog()",
    "precompiled_charsmap is empty", "Metadata file does not exist",
)


class CellFailed(RuntimeError):
    """A cell's training or evaluation exited non-zero; the message names the log."""


def run_logged(command: Sequence[str], log_path: pathlib.Path, prefix: str,
               env: dict | None = None) -> None:
    """Runs a command, streaming its output to the console (prefixed) and to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, cwd=REPO_ROOT, bufsize=1)
        assert process.stdout is not None
        start = time.time()
        for line in process.stdout:
            log.write(f"[{time.time() - start:7.1f}s] {line}")
            if not any(noise in line for noise in CONSOLE_NOISE):
                print(f"{prefix} {line}", end="", flush=True)
        code = process.wait()
    if code != 0:
        program = next((command[i + 1] for i, part in enumerate(command[:-1]) if part == "-m"),
                       command[0])
        raise CellFailed(f"`{program}` exited {code}; full log: {log_path}")


def read_accuracy(metrics_path: pathlib.Path) -> tuple[float, dict]:
    """Accuracy (%) and all metrics from the evaluator's JSON."""
    with open(metrics_path, encoding="utf-8") as f:
        metrics = json.load(f)
    if "accuracy" not in metrics:
        raise CellFailed(f"{metrics_path} has no 'accuracy' (keys: {sorted(metrics)})")
    return float(metrics["accuracy"]), metrics


def train_command(cell: Cell, recipe: Recipe, model_dir: str,
                  train_prefix: Sequence[str] = ()) -> list[str]:
    return [*train_prefix, sys.executable, "-m", "sbs_jax.train",
            *gin_flags(cell, recipe, model_dir)]


def run_cell(cell: Cell, recipe: Recipe, cell_dir: pathlib.Path, env: dict,
             train_prefix: Sequence[str] = ()) -> dict:
    """Trains and evaluates one cell through the public CLIs; returns its results record.

    `train_prefix` runs the trainer through a launcher, e.g. `srun --ntasks-per-node=8` inside
    a SLURM allocation (one JAX process per GPU); evaluation runs as one process.
    """
    model_dir = cell_dir / "model"
    flags = gin_flags(cell, recipe, str(model_dir))
    start = time.time()
    run_logged(train_command(cell, recipe, str(model_dir), train_prefix), cell_dir / "train.log",
               f"[{cell.name} train]", env)
    metrics_path = cell_dir / "metrics.json"
    # An unfinished cell (no results.json) re-scores its run: the metrics file is replaced.
    run_logged([sys.executable, "-m", "sbs_jax.eval", *flags, "--split=test", "--step=best",
                f"--output={metrics_path}", "--overwrite"], cell_dir / "eval.log",
               f"[{cell.name} eval]", env)
    accuracy, metrics = read_accuracy(metrics_path)
    with open(model_dir / CONFIG_FILE, encoding="utf-8") as f:
        initial_checkpoint = json.load(f).get("initial_checkpoint_path")
    return {**dataclasses.asdict(cell), "accuracy": accuracy, "best_step": metrics.get("step"),
            **report.test_statistics(model_dir / EVAL_HISTORY_FILE),
            "initial_checkpoint": initial_checkpoint, "metrics": metrics,
            "settings": cell_settings(cell, recipe), "wall_s": round(time.time() - start, 1)}


def finished_record(cell: Cell, recipe: Recipe, cell_dir: pathlib.Path) -> dict | None:
    """The cell's results if it finished with the same settings; error if with others."""
    path = cell_dir / report.RESULTS_FILE
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    recorded, current = record.get("settings"), cell_settings(cell, recipe)
    if recorded != current:
        changed = sorted(k for k in current if (recorded or {}).get(k) != current[k])
        raise ValueError(
            f"{path} was produced with other settings ({', '.join(changed)} differ); use another "
            "--output_dir or delete that cell folder to re-run it")
    return record


def prepare_data(datasets: Iterable[str], data_dir: pathlib.Path, source_dir: str | None,
                 env: dict, log_path: pathlib.Path, vocab_size: int = 2000,
                 train_vocabulary: bool = True) -> None:
    """Builds missing released-data folders and, unless SBS_VOCAB names one, a vocabulary.

    A folder counts as built once its `info.json` exists (written last by the build job). The
    synthetic dataset needs nothing here: its tasks create it on first read. The vocabulary
    `{data_dir}/spiece.model` is trained on the grid's training records when absent (random-init
    runs); cells that start from HF checkpoints read theirs (`train_vocabulary=False`).
    """
    real = [d for d in datasets if d != "synthetic"]
    for dataset in real:
        if (data_dir / dataset / "info.json").exists():
            continue
        if not source_dir:
            raise ValueError(f"{data_dir / dataset} is not built and --source_dir (the released "
                             "data, e.g. ../shared/dss_data) was not given")
        run_logged([sys.executable, "-m", "sbs_jax.data.build", f"--source_dir={source_dir}",
                    f"--data_dir={data_dir}", f"--dataset={dataset}", "--no_vocab"], log_path,
                   f"[build {dataset}]", env)
    if (not (real and train_vocabulary) or env.get("SBS_VOCAB")
            or (data_dir / "spiece.model").exists()):
        return
    from sbs_jax.data import build, records

    console.say(f"[grid] training a vocabulary on {', '.join(real)}")
    build.ensure_vocabulary(str(data_dir), [
        r for dataset in real for r in records.read_split(str(data_dir / dataset), "train")],
        vocab_size=vocab_size)


def write_json_atomic(path: pathlib.Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def split_finished(cells: Sequence[Cell], recipe: Recipe, grid_dir: pathlib.Path
                   ) -> tuple[list[dict], list[Cell]]:
    """(records of finished cells, cells still to run); settings mismatches raise."""
    done = {cell: finished_record(cell, recipe, grid_dir / cell.name) for cell in cells}
    return [r for r in done.values() if r is not None], [c for c in cells if done[c] is None]


def _alike(dataset: str, model: str, method: str) -> tuple[tuple, ...]:
    """What alike cells share, the closest first: (dataset, model, method), the model, nothing."""
    return (dataset, model, method), (model,), ()


def estimate_seconds(finished: Sequence[dict], todo: Sequence[Cell]) -> float | None:
    """Seconds the `todo` cells should take, from the wall time of finished ones: per cell, the
    mean over finished cells of its (dataset, model, method), else of its model, else of all."""
    walls = [(_alike(r["dataset"], r["model"], r["method"]), r["wall_s"])
             for r in finished if r.get("wall_s")]
    if not walls:
        return None
    total = 0.0
    for cell in todo:
        for level, key in enumerate(_alike(cell.dataset, cell.model, cell.method)):
            like = [wall for keys, wall in walls if keys[level] == key]
            if like:
                total += sum(like) / len(like)
                break
    return total


def run_grid(cells: Sequence[Cell], recipe: Recipe, grid_dir: str | os.PathLike, env: dict,
             keep_going: bool = False, train_prefix: Sequence[str] = ()) -> tuple[list[dict], list[tuple[Cell, str]]]:
    """Runs every unfinished cell in order; returns (finished records, failures).

    Finished cells (results.json present) are not re-run. Settings of finished cells are checked
    up front, before anything trains, so a mismatch fails fast. A cell is numbered by its place
    in `cells` (the same on every resume); the ETA comes from the finished cells' wall times.
    """
    grid_dir = pathlib.Path(grid_dir)
    records, todo = split_finished(cells, recipe, grid_dir)
    console.say(f"[grid] {len(cells)} cells: {len(cells) - len(todo)} finished, {len(todo)} to "
                "run")
    number = {cell: index for index, cell in enumerate(cells, 1)}
    failures: list[tuple[Cell, str]] = []
    for position, cell in enumerate(todo):
        eta = estimate_seconds(records, todo[position:])
        console.say(f"[grid] cell {number[cell]}/{len(cells)}: {cell.name} | {len(records)} "
                    f"finished, {len(todo) - position} to run, ETA "
                    f"{'-' if eta is None else console.format_duration(eta)}")
        cell_dir = grid_dir / cell.name
        cell_dir.mkdir(parents=True, exist_ok=True)
        try:
            record = run_cell(cell, recipe, cell_dir, env, train_prefix)
        except CellFailed as e:
            failures.append((cell, str(e)))
            console.say(f"[grid] FAILED {cell.name}: {e}")
            if not keep_going:
                break
            continue
        write_json_atomic(cell_dir / report.RESULTS_FILE, record)
        records.append(record)
        console.say(f"[grid] done {number[cell]}/{len(cells)} {cell.name}: test accuracy "
                    f"{record['accuracy']:.2f}% at best valid, "
                    f"{console.format_duration(record['wall_s'])}")
    return records, failures
