"""The paper's experiment grid: datasets x methods x data fractions x model sizes x seeds.

    python -m sbs_jax.experiments --preset cpu --output_dir runs/grid
    python -m sbs_jax.experiments --preset paper --checkpoint_dir /models --output_dir /nfs/grid \
        --shard_index $SLURM_ARRAY_TASK_ID --num_shards $SLURM_ARRAY_TASK_COUNT   # GPU / TPU
    python -m sbs_jax.experiments --output_dir runs/grid --report_only

The paper preset starts every cell from its HF T5 checkpoint, `--checkpoint_dir` holding one
folder per size named as on the hub (t5-v1_1-small, t5-v1_1-base, t5-v1_1-large: config.json,
weights, spiece.model; that spiece.model is the cell's vocabulary); `--from_scratch` runs it
from random init instead (a vocabulary trained on the data, unless SBS_VOCAB names one).
It follows the reference's protocol: a data subset drawn per seed (`--data_subset per_seed`;
`nested` keeps one subset for every seed) and test decoded at every eval, so results.md gives
test at the best-valid checkpoint, at the last step and its maximum over evals.

`--output_dir` is a local or shared (NFS/Filestore) folder; machines given disjoint shards of
the cells can share it, and `--report_only` then tables everything that has finished.

Methods: standard_ft, standard_distill, single_task_gt, single_task (rationale and label in one
target; gold / teacher labels), sbs_gt, sbs_llm. What each cell runs (methods, presets, gin
flags) is defined in `sbs_jax.experiments.grid`. Every cell trains through the public trainer CLI
(`python -m sbs_jax.train`, gin flags) and is scored by `python -m sbs_jax.eval`; this module
runs the cells and collects their results.
A cell is finished when `results.json` exists in its folder: re-running the same command skips
finished cells and lets an interrupted cell resume from its last checkpoint (the trainer's exact
resume). A finished cell whose recorded settings differ from the current ones is an error, so a
table never silently mixes two recipes. Tables and plots come from `sbs_jax.experiments.report`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys
from collections.abc import Callable, Sequence

from sbs_jax.experiments import report, runner
from sbs_jax.experiments.grid import (
    METHODS,
    PRESETS,
    Recipe,
    hf_checkpoint_name,
    make_cells,
    missing_checkpoint_files,
)
from sbs_jax.runtime import console
from sbs_jax.train.run_config import DATA_SUBSETS


def _csv_list(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item.strip()]
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sbs-experiments", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="grid folder: one subfolder per cell")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="axes and recipe to start from; the flags below override them")
    parser.add_argument("--datasets", type=_csv_list(str), help="e.g. svamp,cqa")
    parser.add_argument("--methods", type=_csv_list(str), help=f"from {','.join(METHODS)}")
    parser.add_argument("--fractions", type=_csv_list(float), help="e.g. 0.125,0.25,0.5,1")
    parser.add_argument("--models", type=_csv_list(str), help="gin/models/<name>.gin for each")
    parser.add_argument("--seeds", type=_csv_list(int), help="e.g. 0,1,2,3")
    parser.add_argument("--train_steps", type=int, help="TRAIN_STEPS of every cell")
    parser.add_argument("--gin_file", action="append", default=None,
                        help="base gin file(s) of every cell (replace the preset's)")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="extra gin binding for every cell, e.g. BATCH_SIZE=32")
    parser.add_argument("--data_dir", help="record folders (SBS_DATA_DIR); default: "
                        "$SBS_DATA_DIR, else OUTPUT_DIR/data")
    parser.add_argument("--source_dir", help="the released data (dss_data layout), to build "
                        "missing record folders from, e.g. ../shared/dss_data")
    parser.add_argument("--vocab_size", type=int, default=2000,
                        help="size of the vocabulary trained when SBS_VOCAB is not set")
    parser.add_argument("--checkpoint_dir", help="folder of HF T5 checkpoints, one per model, "
                        "named as on the hub (t5_1_1_base -> DIR/t5-v1_1-base): every cell "
                        "starts from it and reads its spiece.model")
    parser.add_argument("--from_scratch", action="store_true",
                        help="let a preset that needs --checkpoint_dir (paper) train from "
                        "random init")
    parser.add_argument("--data_subset", choices=DATA_SUBSETS,
                        help="which examples a fraction keeps: per_seed (each seed draws its "
                        "own, as the reference; paper preset) or nested (one subset for every "
                        "seed; other presets)")
    parser.add_argument("--shard_index", type=int, default=0,
                        help="run only cells i, i + n, i + 2n, ... (e.g. a SLURM array task)")
    parser.add_argument("--num_shards", type=int, default=1, help="n for --shard_index")
    parser.add_argument("--train_prefix", help="launcher the train command runs under, e.g. "
                        "'srun --ntasks-per-node=8' inside a SLURM allocation")
    parser.add_argument("--keep_going", action="store_true", help="continue after a failed cell")
    parser.add_argument("--dry_run", action="store_true", help="list cells and commands only")
    parser.add_argument("--report_only", action="store_true",
                        help="only rebuild tables and plots from finished cells")
    return parser.parse_args(argv)


def checkpoint_problem(args: argparse.Namespace, models: Sequence[str]) -> str | None:
    """Why the cells cannot start as asked (checkpoints missing or contradicting), else None."""
    names = ", ".join(hf_checkpoint_name(m) for m in dict.fromkeys(models))
    if args.checkpoint_dir and args.from_scratch:
        return "--checkpoint_dir and --from_scratch exclude each other"
    if args.checkpoint_dir:
        missing = missing_checkpoint_files(models, args.checkpoint_dir)
        if missing:
            return (f"--checkpoint_dir {args.checkpoint_dir} lacks {', '.join(missing)} (each "
                    f"model needs a HF folder named as on the hub: {names})")
    elif PRESETS[args.preset].needs_checkpoints and not args.from_scratch:
        return (f"the {args.preset} preset starts every cell from pretrained T5, as the paper "
                f"does, and --checkpoint_dir is missing: give a folder holding {names} (HF "
                "folders with config.json, model.safetensors or pytorch_model.bin and "
                "spiece.model, e.g. `huggingface-cli download google/t5-v1_1-base --local-dir "
                "DIR/t5-v1_1-base`), or --from_scratch to train from random init")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    args.output_dir = os.path.abspath(args.output_dir)  # cells run with the repo as cwd
    recipe = Recipe(
        gin_files=tuple(args.gin_file) if args.gin_file else preset.recipe.gin_files,
        train_steps=args.train_steps or preset.recipe.train_steps,
        gin_bindings=preset.recipe.gin_bindings + tuple(args.gin_bindings),
        data_subset=args.data_subset or preset.recipe.data_subset,
        checkpoint_dir=os.path.abspath(args.checkpoint_dir) if args.checkpoint_dir else None)
    try:
        cells = make_cells(args.datasets or preset.datasets, args.methods or preset.methods,
                           args.fractions or preset.fractions, args.models or preset.models,
                           args.seeds or preset.seeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not 0 <= args.shard_index < args.num_shards:
        print(f"error: --shard_index={args.shard_index} is not in [0, --num_shards="
              f"{args.num_shards})", file=sys.stderr)
        return 2
    cells = cells[args.shard_index::args.num_shards]
    problem = None if args.report_only else checkpoint_problem(args, [c.model for c in cells])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    data_dir = pathlib.Path(args.data_dir or env.get("SBS_DATA_DIR")
                            or os.path.join(args.output_dir, "data")).resolve()
    env["SBS_DATA_DIR"] = str(data_dir)
    if args.dry_run:
        for cell in cells:
            model_dir = os.path.join(args.output_dir, cell.name, "model")
            print(cell.name, "::", shlex.join(runner.train_command(
                cell, recipe, model_dir, shlex.split(args.train_prefix or ""))))
        return 0
    failures = []
    if not args.report_only:
        try:
            _, todo = runner.split_finished(cells, recipe, pathlib.Path(args.output_dir))
            runner.prepare_data(sorted({c.dataset for c in todo}), data_dir, args.source_dir, env,
                                pathlib.Path(args.output_dir) / "prepare.log", args.vocab_size,
                                train_vocabulary=recipe.checkpoint_dir is None)
            _, failures = runner.run_grid(cells, recipe, args.output_dir, env, args.keep_going,
                                          shlex.split(args.train_prefix or ""))
        except (ValueError, runner.CellFailed) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        paths = report.write_report(args.output_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(pathlib.Path(paths["markdown"]).read_text(encoding="utf-8"))
    for kind, path in paths.items():
        console.say(f"[grid] wrote {kind}: {path}")
    for cell, message in failures:
        console.say(f"[grid] failed: {cell.name}: {message}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
