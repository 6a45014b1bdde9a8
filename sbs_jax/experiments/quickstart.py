"""The offline end-to-end demo behind the README's first command (`sbs-quickstart`): synthetic
data, a trained vocabulary, the teacher job, step-by-step against standard fine-tuning on the
same examples, the held-out test accuracy of each, a table and a plot.

Every stage runs the public commands (`python -m sbs_jax.teacher`, `.train`, `.eval`) through
`sbs_jax.experiments.runner`, and a re-run resumes: finished stages are not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from sbs_jax.data import records
from sbs_jax.experiments import report, runner
from sbs_jax.experiments.grid import Cell, Recipe
from sbs_jax.runtime import console

DATASET = "synthetic"
# Step-by-step on the teacher's labels and rationales, against fine-tuning on the gold labels.
METHODS = ("sbs_llm", "standard_ft")
SETTINGS_FILE = "quickstart_settings.json"
MODEL = "t5_1_1_tiny"  # gin/quickstart.gin widens it (d_model 64, d_ff 256)
SAME_BUDGET_NOTE = (
    "Both methods saw the same training examples for the same number of steps, as the paper "
    "compares them. A step-by-step step also trains on the rationale (far longer than the "
    "label), so it costs several fine-tuning steps (see the time column): at equal wall time "
    "fine-tuning could run more steps.")


def check_same_data(path: pathlib.Path, settings: dict) -> None:
    """Records the data settings of a run folder; refuses to reuse it with other ones."""
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if saved.get(k) != settings[k])
        if changed:
            raise ValueError(f"{path.parent} holds a quickstart with other data settings "
                             f"({', '.join(changed)}); use another --output_dir")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    runner.write_json_atomic(path, settings)


class Progress:
    """Numbered, time-stamped stage lines (with the time since the start) so a user always sees
    where the run is."""

    def __init__(self, num_stages: int):
        self.num_stages, self.stage, self.start = num_stages, 0, time.time()

    def __call__(self, message: str) -> None:
        self.stage += 1
        elapsed = time.time() - self.start
        console.say(f"[quickstart {self.stage}/{self.num_stages} +{elapsed:5.0f}s] {message}")

    def elapsed(self) -> float:
        return time.time() - self.start


def write_teacher_inputs(input_dir: pathlib.Path, sizes: dict[str, int], seed: int) -> list[str]:
    """Gold problems as the teacher job's JSONL input ({"id", "input", "label"}).

    Returns the texts a vocabulary is trained on (the gold rationales stand in for the teacher's:
    the vocabulary must exist before the tasks read anything).
    """
    from sbs_jax.data import synthetic

    input_dir.mkdir(parents=True, exist_ok=True)
    texts = []
    for split, size in sizes.items():
        problems = synthetic.generate(size, seed, split)
        path = input_dir / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": p.id, "input": p.input, "label": p.label}) + "\n"
                         for p in problems)
        os.replace(tmp, path)
        texts += synthetic.vocabulary_texts(problems)
    return texts


def teacher_command(args: argparse.Namespace, input_path: pathlib.Path, split: str,
                    output_dir: pathlib.Path) -> list[str]:
    command = [sys.executable, "-m", "sbs_jax.teacher", f"--input={input_path}",
               f"--dataset={DATASET}", f"--split={split}", f"--backend={args.teacher_backend}",
               f"--output_dir={output_dir}"]
    if args.base_url:
        command.append(f"--base_url={args.base_url}")
    if args.teacher_model:
        command.append(f"--model={args.teacher_model}")
    if args.api_key_env:
        command.append(f"--api_key_env={args.api_key_env}")
    return command


def teacher_shortfall(stats_path: pathlib.Path, split: str) -> str | None:
    """Why the teacher's records of `split` cannot be trained on, or None when they can.

    The teacher job exits 0 even when examples failed (they are listed in stats.json); training
    on a split with missing records would silently compare the methods on other data.
    """
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    split_stats = stats.get("splits", {}).get(split, stats)
    missing = split_stats["examples"] - split_stats["records"]
    if missing == 0:
        return None
    reasons = sorted({f["reason"] for f in stats.get("failures", [])})[:3]
    return (f"the teacher wrote {split_stats['records']} of {split_stats['examples']} {split} "
            f"records ({'; '.join(reasons) or 'see the log'}); details in {stats_path}")


def comparison_table(records: dict[str, dict], train_examples: int, train_steps: int) -> str:
    """Markdown table of the two methods, plus the same-data-and-steps note."""
    lines = ["| method | test accuracy (%) | train examples | steps | train + eval time (s) |",
             "|---|---|---|---|---|"]
    for method in METHODS:
        record = records[method]
        lines.append(f"| {report.METHOD_TITLES[method]} | {record['accuracy']:.1f} | "
                     f"{train_examples} | {train_steps} | {record['wall_s']:.0f} |")
    return "\n".join(lines) + "\n\n" + SAME_BUDGET_NOTE + "\n"


def training_curve(model_dir: pathlib.Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar the trainer logged to TensorBoard in `model_dir`."""
    from sbs_jax.runtime.tf_setup import tf

    points = []
    for path in sorted(model_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    points.append((event.step, float(tf.make_ndarray(value.tensor))))
    return sorted(points)


def plot_comparison(records: dict[str, dict], model_dirs: dict[str, pathlib.Path],
                    path: pathlib.Path, train_steps: int) -> None:
    """Test accuracy per method (left) and the training losses against step (right)."""
    plt = report.pyplot()
    fig, (bars_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"sbs_llm": "tab:red", "standard_ft": "tab:blue"}
    titles = [report.METHOD_TITLES[m].replace(" (", "\n(") for m in METHODS]
    bars = bars_ax.bar(titles, [records[m]["accuracy"] for m in METHODS],
                       color=[colors[m] for m in METHODS])
    bars_ax.bar_label(bars, fmt="%.1f%%")
    bars_ax.set_ylim(0, 105)
    bars_ax.set_ylabel("test accuracy (%)")
    bars_ax.set_title(f"synthetic addition, tiny T5, {train_steps} steps each", fontsize=10)
    for method in METHODS:
        title = report.METHOD_TITLES[method]
        for tag, style in (("label_loss", "-"), ("rationale_loss", "--")):
            curve = training_curve(model_dirs[method], tag)
            if curve:
                loss_ax.plot(*zip(*curve), style, color=colors[method],
                             label=f"{title}: {tag.replace('_', ' ')}")
    loss_ax.set_yscale("log")
    report.finish_axis(loss_ax, "training step (same examples, same steps)", "training loss")
    report.save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    """The demo's stages for `sbs-quickstart`'s flags; the exit status (0 done, 1 a stage
    failed, 2 the run folder holds other data settings)."""
    out = pathlib.Path(args.output_dir).resolve()
    data_dir = out / "data"
    progress = Progress(6)
    env = {**os.environ, "SBS_DATA_DIR": str(data_dir)}
    sizes = {"train": args.num_train, "valid": args.num_valid, "test": args.num_test}

    data_settings = {"sizes": sizes, "seed": args.seed, "teacher_backend": args.teacher_backend,
                     "teacher_model": args.teacher_model, "base_url": args.base_url}
    try:
        check_same_data(out / SETTINGS_FILE, data_settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    progress(f"generating the synthetic dataset {sizes} under {out / 'inputs'}")
    texts = write_teacher_inputs(out / "inputs", sizes, args.seed)

    vocab_path = data_dir / "spiece.model"
    progress(f"training a SentencePiece vocabulary: {vocab_path}")
    if not vocab_path.exists():
        from sbs_jax.data import synthetic
        from sbs_jax.data.vocab import train_vocab

        train_vocab(texts, str(vocab_path.with_suffix("")), vocab_size=synthetic.VOCAB_SIZE)

    info_path = data_dir / DATASET / "info.json"
    progress(f"teacher job ({args.teacher_backend} backend) writing TFRecords to "
             f"{info_path.parent}")
    if info_path.exists():
        console.say(f"[teacher] already done: {info_path}")
    else:
        for split in sizes:
            try:
                runner.run_logged(
                    teacher_command(args, out / "inputs" / f"{split}.jsonl", split,
                                    info_path.parent),
                    out / "logs" / "teacher.log", f"[teacher {split}]", env)
            except runner.CellFailed as e:
                print(f"error: the teacher job on the {split} split failed: {e}. Records "
                      "committed so far are kept; re-run the same command to resume.",
                      file=sys.stderr)
                return 1
            problem = teacher_shortfall(info_path.parent / "stats.json", split)
            if problem:
                print(f"error: {problem}. Fix the teacher and re-run the same command: "
                      "only the missing examples are asked again.", file=sys.stderr)
                return 1
        # info.json (shard checksums) marks the folder complete, so the synthetic tasks read the
        # teacher's records instead of generating their own.
        records.write_info(str(info_path.parent), DATASET, {**data_settings,
                                                           "written_by": __name__})

    bindings = (f"EVAL_PERIOD = {args.eval_period}",
                f"CHECKPOINT_PERIOD = {max(args.train_steps // 4, 1)}", *args.gin_bindings)
    recipe = Recipe(gin_files=tuple(args.gin_file or ("gin/quickstart.gin",)),
                    train_steps=args.train_steps, gin_bindings=bindings)
    cells = [Cell(DATASET, method, 1.0, MODEL, args.seed) for method in METHODS]
    progress(f"training + evaluating step-by-step and standard fine-tuning on the same "
             f"{args.num_train} examples for {args.train_steps} steps each (step-by-step is the "
             "slower one: it also trains on the rationales)")
    try:
        finished, failures = runner.run_grid(cells, recipe, out / "runs", env)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failures:
        for cell, message in failures:
            print(f"error: {cell.name}: {message}", file=sys.stderr)
        return 1
    by_method = {r["method"]: r for r in finished}

    progress("writing the comparison")
    table = comparison_table(by_method, args.num_train, args.train_steps)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    model_dirs = {m: out / "runs" / Cell(DATASET, m, 1.0, MODEL, args.seed).name / "model"
                  for m in METHODS}
    plot_comparison(by_method, model_dirs, out / "comparison.png", args.train_steps)
    summary = {
        "dataset": DATASET, "train_examples": args.num_train, "test_examples": args.num_test,
        "train_steps": args.train_steps, "seed": args.seed,
        "teacher_backend": args.teacher_backend,
        "methods": {m: {"accuracy": by_method[m]["accuracy"], "wall_s": by_method[m]["wall_s"],
                        "model_dir": str(model_dirs[m])} for m in METHODS},
        "this_run_wall_s": round(progress.elapsed(), 1),
    }
    runner.write_json_atomic(out / "quickstart_results.json", summary)

    progress(f"done in {progress.elapsed():.0f}s")
    print("\n" + table)
    print(f"table: {out / 'comparison.md'}\nplot: {out / 'comparison.png'}\n"
          f"results: {out / 'quickstart_results.json'}")
    return 0
