"""The experiment grid: cells, resumability, aggregation over seeds, tables and plots.

Results are generated here from seeded random accuracies (no expected accuracy is hard-coded);
the real-data cell at the end trains and evaluates through the public CLIs.
"""

import csv
import json
import pathlib
import random
import re
import shlex
import statistics

import matplotlib.image
import pytest

from sbs_jax.cli import experiments as experiments_cli
from sbs_jax.experiments import grid, report, runner
from sbs_jax.experiments.grid import Cell, Recipe

RECIPE = Recipe(gin_files=("gin/quickstart.gin",), train_steps=7)


def _write_finished(grid_dir, cells, recipe, rng, wall_s=1.0):
    """Writes a results.json for every cell as run_cell would (random init, test scored at
    best valid only); returns accuracy by cell."""
    accuracies = {}
    for cell in cells:
        cell_dir = grid_dir / cell.name
        cell_dir.mkdir(parents=True)
        accuracy = rng.uniform(0, 100)
        accuracies[cell] = accuracy
        record = {**vars(cell), "accuracy": accuracy, "metrics": {"accuracy": accuracy},
                  **report.test_statistics(cell_dir / "no_history.jsonl"),
                  "initial_checkpoint": None,
                  "settings": grid.cell_settings(cell, recipe), "wall_s": wall_s}
        runner.write_json_atomic(cell_dir / report.RESULTS_FILE, record)
    return accuracies


def test_grid_is_the_cross_product_with_unique_folders():
    cells = grid.make_cells(["svamp", "cqa"], list(grid.METHODS), grid.PAPER_FRACTIONS,
                            ["t5_1_1_small", "t5_1_1_base"], [0, 1, 2, 3])
    assert len(cells) == 2 * 6 * 4 * 2 * 4
    assert len({c.name for c in cells}) == len(cells)
    assert Cell("svamp", "sbs_llm", 0.125, "t5_1_1_base", 3).name == \
        "svamp/t5_1_1_base/sbs_llm/12.5pct/seed3"


@pytest.mark.parametrize("axes, message", [
    ((["mnli"], ["sbs_llm"], [1.0], ["m"], [0]), "unknown dataset"),
    ((["svamp"], ["distill"], [1.0], ["m"], [0]), "unknown method"),
    ((["svamp"], ["sbs_llm"], [0.0], ["m"], [0]), "fractions must be in (0, 1]"),
    ((["svamp"], ["sbs_llm"], [1.0], ["m"], []), "grid is empty"),
])
def test_bad_grid_axes_are_named(axes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid.make_cells(*axes)


def test_methods_pick_label_and_rationale_tasks():
    flags = grid.gin_flags(Cell("cqa", "sbs_gt", 0.5, "t5_1_1_tiny", 2), RECIPE, "/m")
    assert "--gin.MIXTURE_OR_TASK_NAME='cqa_label_gt'" in flags
    assert "--gin.RATIONALE_MIXTURE_NAME='cqa_rationale'" in flags
    assert "--gin.RANDOM_SEED=2" in flags and "--gin.TRAIN_STEPS=7" in flags
    flags = grid.gin_flags(Cell("cqa", "standard_distill", 1.0, "t5_1_1_tiny", 0),
                           RECIPE, "/m")
    assert "--gin.MIXTURE_OR_TASK_NAME='cqa_standard_llm'" in flags
    assert "--gin.RATIONALE_MIXTURE_NAME=None" in flags
    assert flags[:3] == ["--gin_file=gin/quickstart.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
                         "--gin_file=gin/standard_distill.gin"]
    # The single-task baseline: one task (rationale then label), its own gin file, recipe
    # bindings after it (so they may still override its target cap).
    recipe = Recipe(gin_files=("gin/quickstart.gin",), gin_bindings=("BATCH_SIZE = 8",))
    for method, task in (("single_task", "cqa_single_task"),
                         ("single_task_gt", "cqa_single_task_gt")):
        flags = grid.gin_flags(Cell("cqa", method, 1.0, "t5_1_1_tiny", 0), recipe, "/m")
        assert f"--gin.MIXTURE_OR_TASK_NAME={task!r}" in flags
        assert "--gin.RATIONALE_MIXTURE_NAME=None" in flags
        assert flags.index("--gin_file=gin/single_task.gin") < flags.index(
            "--gin_bindings=BATCH_SIZE = 8")


def test_recipe_placeholders_follow_the_model():
    recipe = Recipe(gin_files=("gin/sbs_{size}.gin",),
                    gin_bindings=("INITIAL_CHECKPOINT_PATH='/ckpt/{model}'",))
    flags = grid.gin_flags(Cell("svamp", "sbs_llm", 1.0, "t5_1_1_large", 0), recipe, "/m")
    assert flags[:2] == ["--gin_file=gin/sbs_large.gin", "--gin_file=gin/models/t5_1_1_large.gin"]
    assert "--gin_bindings=INITIAL_CHECKPOINT_PATH='/ckpt/t5_1_1_large'" in flags
    assert not any(f.startswith("--gin.TRAIN_STEPS") for f in flags)


def test_mean_and_stderr_match_statistics():
    values = [random.Random(3).uniform(0, 100) for _ in range(4)]
    mean, stderr = report.mean_and_stderr(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / 2)
    assert report.mean_and_stderr([42.0]) == (42.0, None)


@pytest.fixture()
def finished_grid(tmp_path):
    cells = grid.make_cells(["svamp", "synthetic"], ["standard_ft", "sbs_llm"],
                                   [0.25, 1.0], ["t5_1_1_tiny", "t5_1_1_small"], [0, 1, 2])
    accuracies = _write_finished(tmp_path, cells, RECIPE, random.Random(0))
    return tmp_path, cells, accuracies


def test_report_aggregates_seeds_into_csv_markdown_and_plots(finished_grid):
    grid_dir, cells, accuracies = finished_grid
    paths = report.write_report(grid_dir)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cells) // 3
    for row in rows:
        seeds = [a for c, a in accuracies.items()
                 if (c.dataset, c.model, c.method, c.fraction)
                 == (row["dataset"], row["model"], row["method"], float(row["fraction"]))]
        assert row["num_seeds"] == "3" and row["seeds"] == "0 1 2"
        assert row["init"] == "random init" and row["test_at_best_valid_n"] == "3"
        assert float(row["test_at_best_valid_mean"]) == pytest.approx(statistics.mean(seeds),
                                                                      abs=1e-4)
        assert float(row["test_at_best_valid_stderr"]) == pytest.approx(
            statistics.stdev(seeds) / 3 ** 0.5, abs=1e-4)
        assert (row["test_at_last_step_mean"], row["max_test_over_evals_n"]) == ("", "0")
    markdown = pathlib.Path(paths["markdown"]).read_text()
    assert markdown.startswith("# Grid results: T5 from random init\n")
    assert "### svamp, t5_1_1_small" in markdown and "### synthetic, t5_1_1_tiny" in markdown
    assert markdown.count("Test accuracy at the best-valid checkpoint (ours, the default):") == 4
    assert "Test accuracy at the last step:" not in markdown
    assert markdown.count("RunConfig.test_every_eval is off") == 4
    # Published reference rows only where the paper has the dataset, with the source named.
    assert markdown.count("paper, T5-Base: standard fine-tuning [1] | — | 62.63 |") == 2
    assert "arXiv:2305.02301" in markdown
    for kind in ("fraction_plot", "model_size_plot"):
        image = matplotlib.image.imread(paths[kind])
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


def test_single_seed_has_no_stderr_and_missing_cells_show_a_dash(tmp_path):
    cells = [Cell("cqa", "sbs_llm", 1.0, "t5_1_1_tiny", 0),
             Cell("cqa", "standard_ft", 0.5, "t5_1_1_tiny", 0)]
    _write_finished(tmp_path, cells, RECIPE, random.Random(1))
    rows = report.aggregate(report.load_results(tmp_path))
    assert [r["test_at_best_valid_stderr"] for r in rows] == [None, None]
    markdown = report.markdown_table(rows)
    assert "| standard fine-tuning (gold labels) | " in markdown
    assert " — |" in markdown and "(n=1)" in markdown


def test_finished_cells_are_not_rerun(finished_grid, capsys):
    grid_dir, cells, _ = finished_grid
    before = {c: (grid_dir / c.name / report.RESULTS_FILE).stat().st_mtime_ns for c in cells}
    argv = ["--output_dir", str(grid_dir), "--datasets", "svamp,synthetic",
            "--methods", "standard_ft,sbs_llm", "--fractions", "0.25,1", "--models",
            "t5_1_1_tiny,t5_1_1_small", "--seeds", "0,1,2", "--train_steps", "7",
            "--gin_file", "gin/quickstart.gin"]
    assert experiments_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"{len(cells)} cells: {len(cells)} finished, 0 to run" in out
    assert "cell 1/" not in out
    assert before == {c: (grid_dir / c.name / report.RESULTS_FILE).stat().st_mtime_ns
                      for c in cells}
    assert (grid_dir / "results.csv").exists()


def test_finished_cell_with_other_settings_is_an_error(finished_grid, capsys):
    grid_dir, _, _ = finished_grid
    argv = ["--output_dir", str(grid_dir), "--datasets", "svamp", "--methods", "sbs_llm",
            "--fractions", "1", "--models", "t5_1_1_tiny", "--seeds", "0",
            "--train_steps", "8", "--gin_file", "gin/quickstart.gin"]
    assert experiments_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "svamp/t5_1_1_tiny/sbs_llm/100pct/seed0/results.json" in err
    assert "train_steps" in err


def test_unreadable_results_file_is_named(tmp_path):
    cell_dir = tmp_path / "svamp" / "x"
    cell_dir.mkdir(parents=True)
    (cell_dir / report.RESULTS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable results file .*svamp/x/results.json"):
        report.load_results(tmp_path)
    (cell_dir / report.RESULTS_FILE).write_text(json.dumps({"dataset": "svamp"}))
    with pytest.raises(ValueError, match="lacks"):
        report.load_results(tmp_path)


def test_cli_help_dry_run_and_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments_cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "--report_only" in capsys.readouterr().out
    assert experiments_cli.main(["--output_dir", str(tmp_path), "--preset", "paper",
                                 "--from_scratch", "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 * 6 * 4 * 3 * 4
    assert experiments_cli.main(["--output_dir", str(tmp_path), "--methods", "sbs"]) == 2
    assert "unknown method(s) ['sbs']" in capsys.readouterr().err


def test_shards_split_the_grid_disjointly(tmp_path, capsys):
    names = []
    for index in range(3):
        assert experiments_cli.main(["--output_dir", str(tmp_path), "--preset", "paper",
                                     "--dry_run", "--from_scratch", "--num_shards", "3",
                                     "--shard_index", str(index)]) == 0
        names.append([line.split(" ::")[0] for line in capsys.readouterr().out.splitlines()])
    assert sum(len(n) for n in names) == 4 * 6 * 4 * 3 * 4
    assert len(set().union(*names)) == 4 * 6 * 4 * 3 * 4
    assert experiments_cli.main(["--output_dir", str(tmp_path), "--num_shards", "2",
                                 "--shard_index", "2"]) == 2
    assert "--shard_index=2 is not in [0, --num_shards=2)" in capsys.readouterr().err


def _history(path, test_by_step):
    path.write_text("".join(
        json.dumps({"step": step, "split": split, "accuracy": accuracy}) + "\n"
        for step, accuracy in test_by_step for split in ("valid", "test")))
    return path


def test_test_statistics_read_the_eval_history(tmp_path):
    # A resume re-ran step 4: its last line counts. The maximum's earliest step is kept.
    path = _history(tmp_path / "h.jsonl", [(2, 10.0), (4, 50.0), (6, 50.0), (4, 40.0),
                                           (6, 50.0), (8, 30.0)])
    assert report.test_statistics(path) == {
        "test_at_last_step": 30.0, "last_step": 8, "max_test_over_evals": 50.0,
        "max_test_step": 6}
    assert report.test_statistics(tmp_path / "absent.jsonl")["test_at_last_step"] is None


def test_report_labels_the_three_test_statistics(tmp_path):
    cells = grid.make_cells(["cqa"], ["sbs_llm"], [0.5, 1.0], ["t5_1_1_base"], [0, 1])
    rng = random.Random(2)
    expected = {}
    for cell in cells:
        cell_dir = tmp_path / cell.name
        cell_dir.mkdir(parents=True)
        tests = [(step, rng.uniform(0, 100)) for step in (250, 500, 750)]
        stats = report.test_statistics(_history(cell_dir / "eval_history.jsonl", tests))
        record = {**vars(cell), "accuracy": tests[1][1], **stats,
                  "initial_checkpoint": "/models/t5-v1_1-base", "wall_s": 1.0}
        runner.write_json_atomic(cell_dir / report.RESULTS_FILE, record)
        expected.setdefault(cell.fraction, []).append(
            (tests[1][1], tests[-1][1], max(a for _, a in tests)))
    paths = report.write_report(tmp_path)
    with open(paths["csv"], newline="") as f:
        rows = {float(r["fraction"]): r for r in csv.DictReader(f)}
    for fraction, values in expected.items():
        row = rows[fraction]
        assert row["init"] == "pretrained"
        for index, column in enumerate(("test_at_best_valid", "test_at_last_step",
                                        "max_test_over_evals")):
            seeds = [v[index] for v in values]
            assert float(row[f"{column}_mean"]) == pytest.approx(statistics.mean(seeds), abs=1e-4)
            assert row[f"{column}_n"] == "2"
    markdown = pathlib.Path(paths["markdown"]).read_text()
    assert markdown.startswith("# Grid results: T5 from pretrained checkpoints\n")
    sections = markdown.split("\n\n")
    titles = [s for s in sections if s.endswith(":")]
    assert titles == ["Test accuracy at the best-valid checkpoint (ours, the default):",
                      "Test accuracy at the last step:",
                      "Maximum test accuracy over the evals (what the reference's test logs "
                      "allow):"]
    # The paper's numbers (from its test logs) sit under the maximum over evals.
    last_table = sections[sections.index(titles[-1]) + 1]
    assert "| paper, T5-Base: standard fine-tuning [1] | — | 62.19 |" in last_table


def test_eta_comes_from_finished_cells_of_the_same_kind():
    done = [{"dataset": "cqa", "model": "t5_1_1_base", "method": "sbs_llm", "wall_s": 100.0},
            {"dataset": "cqa", "model": "t5_1_1_base", "method": "standard_ft", "wall_s": 40.0},
            {"dataset": "svamp", "model": "t5_1_1_large", "method": "sbs_llm", "wall_s": 300.0}]
    todo = [Cell("cqa", "sbs_llm", 1.0, "t5_1_1_base", 1),       # same kind: 100
            Cell("svamp", "sbs_gt", 1.0, "t5_1_1_base", 0),      # same model: 70
            Cell("esnli", "sbs_llm", 1.0, "t5_1_1_small", 0)]    # all: 440 / 3
    assert runner.estimate_seconds(done, todo) == pytest.approx(100 + 70 + 440 / 3)
    assert runner.estimate_seconds([], todo) is None


def _fake_checkpoints(root, names, files=("config.json", "spiece.model", "model.safetensors")):
    for name in names:
        (root / name).mkdir(parents=True)
        for file in files:
            (root / name / file).write_text("")
    return root


def test_paper_preset_refuses_without_checkpoints_and_names_what_is_missing(tmp_path, capsys):
    grid_dir = tmp_path / "grid"
    assert experiments_cli.main(["--output_dir", str(grid_dir), "--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint_dir is missing" in err and "--from_scratch" in err
    assert "t5-v1_1-small, t5-v1_1-base, t5-v1_1-large" in err
    ckpt = _fake_checkpoints(tmp_path / "ckpt", ["t5-v1_1-small"])
    _fake_checkpoints(ckpt, ["t5-v1_1-base"], files=("config.json",))
    assert experiments_cli.main(["--output_dir", str(grid_dir), "--preset", "paper",
                                 "--checkpoint_dir", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert (f"lacks {ckpt}/t5-v1_1-base/spiece.model, {ckpt}/t5-v1_1-base/model.safetensors|"
            f"model.safetensors.index.json|pytorch_model.bin, {ckpt}/t5-v1_1-large/ ") in err
    assert experiments_cli.main(["--output_dir", str(grid_dir), "--preset", "paper",
                                 "--checkpoint_dir", str(ckpt), "--from_scratch"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert not grid_dir.exists()  # nothing built, trained or written


def test_paper_preset_starts_each_size_from_its_checkpoint_and_vocabulary(tmp_path, capsys):
    ckpt = _fake_checkpoints(tmp_path / "ckpt", ["t5-v1_1-small", "t5-v1_1-base",
                                                 "t5-v1_1-large"])
    assert experiments_cli.main(["--output_dir", str(tmp_path / "grid"), "--preset", "paper",
                                 "--checkpoint_dir", str(ckpt), "--dry_run", "--methods", "sbs_llm",
                                 "--fractions", "0.5", "--seeds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 * 3
    for line in lines:
        name, command = line.split(" :: ")
        flags = shlex.split(command)
        folder = f"{ckpt}/t5-v1_1-{name.split('/')[1].rsplit('_', 1)[1]}"
        assert f"--gin.INITIAL_CHECKPOINT_PATH='{folder}'" in flags
        assert f"--gin_bindings=tasks.data_config.vocabulary_path='{folder}/spiece.model'" in flags
        assert "--gin.DATA_SUBSET='per_seed'" in flags and "--gin.RANDOM_SEED=2" in flags
        assert "--gin_bindings=RunConfig.test_every_eval = True" in flags
    assert grid.hf_checkpoint_name("flan_t5_xl") == "flan-t5-xl"


def test_paper_preset_from_scratch_on_real_data(dss_data_dir, tmp_path, monkeypatch, capsys):
    """The paper preset from random init on a tiny model: SVAMP, 12.5% of the released train
    split, 10 steps with test decoded at steps 5 and 10; a finished cell before it keeps its
    number and times the ETA. The report's three test statistics come from these runs."""
    for name in ("XLA_FLAGS", "SBS_DATA_DIR", "SBS_VOCAB"):
        monkeypatch.delenv(name, raising=False)
    grid_dir = tmp_path / "grid"
    argv = ["--preset", "paper", "--from_scratch", "--datasets", "svamp",
            "--methods", "standard_ft,sbs_llm", "--fractions", "0.125", "--models",
            "t5_1_1_tiny", "--seeds", "0", "--train_steps", "10", "--gin_file",
            "gin/quickstart.gin", "--output_dir", str(grid_dir), "--source_dir",
            str(dss_data_dir), "--gin_bindings", "BATCH_SIZE = 16", "--gin_bindings",
            "EVAL_PERIOD = 5", "--gin_bindings", "RunConfig.max_decode_len = 8",
            "--gin_bindings", "RunConfig.warmup_steps = 0",
            # Caps every batch exceeds: one padded shape, so the train step compiles once.
            "--gin_bindings", 'TASK_FEATURE_LENGTHS = {"inputs": 48, "targets": 16}']
    recipe = Recipe(("gin/quickstart.gin",), 10, grid.PRESETS["paper"].recipe.gin_bindings
                    + tuple(a for i, a in enumerate(argv) if argv[i - 1] == "--gin_bindings"),
                    data_subset="per_seed")
    first = Cell("svamp", "standard_ft", 0.125, "t5_1_1_tiny", 0)
    _write_finished(grid_dir, [first], recipe, random.Random(4), wall_s=120.0)
    assert experiments_cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    name = "svamp/t5_1_1_tiny/sbs_llm/12.5pct/seed0"
    assert f"[grid] cell 2/2: {name} | 1 finished, 1 to run, ETA 2m00s" in out
    assert re.search(rf"\[{name} train\] \S+ \S+ step 10/10", out)
    assert f"[grid] done 2/2 {name}" in out

    cell_dir = grid_dir / name
    record = json.loads((cell_dir / report.RESULTS_FILE).read_text())
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    assert record["accuracy"] == metrics["accuracy"] and metrics["split"] == "test"
    assert record["initial_checkpoint"] is None
    assert record["settings"]["data_subset"] == "per_seed"
    run = json.loads((cell_dir / "model" / "run_config.json").read_text())
    assert (run["data_subset"], run["test_every_eval"], run["data_fraction"]) == (
        "per_seed", True, 0.125)
    history = [json.loads(line)
               for line in (cell_dir / "model" / "eval_history.jsonl").read_text().splitlines()]
    test = {h["step"]: h for h in history if h["split"] == "test"}
    assert sorted(test) == [5, 10] and {h["num_examples"] for h in test.values()} == {200}
    assert record["test_at_last_step"] == test[10]["accuracy"] and record["last_step"] == 10
    assert record["max_test_over_evals"] == max(h["accuracy"] for h in test.values())
    # The eval CLI at the best-valid step decodes what the train loop decoded at that step.
    assert record["accuracy"] == test[record["best_step"]]["accuracy"]

    with open(grid_dir / "results.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["method"] == "sbs_llm")
    for column, field in (("test_at_best_valid", "accuracy"),
                          ("test_at_last_step", "test_at_last_step"),
                          ("max_test_over_evals", "max_test_over_evals")):
        assert float(row[f"{column}_mean"]) == pytest.approx(record[field], abs=1e-4)
    markdown = (grid_dir / "results.md").read_text()
    assert markdown.startswith("# Grid results: T5 from random init\n")
    assert f"| step-by-step (teacher labels) | {record['max_test_over_evals']:.2f} (n=1) |" \
        in markdown
    assert "| paper, T5-Base: standard fine-tuning [1] | 62.63 (at 100%) |" in markdown

    assert experiments_cli.main(argv) == 0
    assert "2 cells: 2 finished, 0 to run" in capsys.readouterr().out


def test_dry_run_shows_the_train_command_under_its_launcher(tmp_path, capsys):
    assert experiments_cli.main(["--output_dir", str(tmp_path), "--preset", "ci", "--dry_run",
                                 "--train_prefix", "srun --ntasks-per-node=8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    name, command = lines[0].split(" :: ")
    assert name == "svamp/t5_1_1_tiny/standard_ft/12.5pct/seed0"
    assert command.startswith("srun --ntasks-per-node=8 ") and " -m sbs_jax.train " in command
    assert "--gin.DATA_FRACTION=0.125" in command
