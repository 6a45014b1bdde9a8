"""Running the grid (sbs_jax.experiments.runner, `sbs-experiments`): resumability, settings
checks, shards, presets and their checkpoints, and one real-data cell trained and evaluated
through the public CLIs."""

import csv
import json
import random
import re
import shlex

import pytest
from conftest import write_finished_cells

from sbs_jax.cli import experiments as experiments_cli
from sbs_jax.experiments import grid, report, runner
from sbs_jax.experiments.grid import Cell, Recipe


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


def test_help_lists_the_grid_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments_cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "--report_only" in capsys.readouterr().out


def test_a_dry_run_lists_every_cell_of_the_paper_grid(tmp_path, capsys):
    assert experiments_cli.main(["--output_dir", str(tmp_path), "--preset", "paper",
                                 "--from_scratch", "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 * 6 * 4 * 3 * 4


def test_an_unknown_method_is_refused(tmp_path, capsys):
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
    write_finished_cells(grid_dir, [first], recipe, random.Random(4), wall_s=120.0)
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


def test_paper_preset_starts_each_cell_from_its_hf_checkpoint_and_vocabulary(
        dss_data_dir, tmp_path, monkeypatch, capsys):
    """--checkpoint_dir: a cell starts from the folder named for its model, reads the folder's
    spiece.model (the grid trains no vocabulary) and records where it started."""
    import hashlib

    import jax

    from sbs_jax import models
    from sbs_jax.vocab import train_vocab

    for name in ("XLA_FLAGS", "SBS_DATA_DIR", "SBS_VOCAB"):
        monkeypatch.delenv(name, raising=False)
    texts = [json.loads(line)["input"]
             for line in (dss_data_dir / "svamp" / "svamp_train.json").read_text().splitlines()]
    vocab = train_vocab(texts, str(tmp_path / "vocab"), 600)
    checkpoint = tmp_path / "models" / grid.hf_checkpoint_name("t5_1_1_tiny")
    config = models.get_config("t5_1_1_tiny")
    models.save_hf(config, models.init_params(config, jax.random.PRNGKey(0)), checkpoint, vocab)
    grid_dir = tmp_path / "grid"
    argv = ["--preset", "paper", "--checkpoint_dir", str(checkpoint.parent), "--datasets",
            "svamp", "--methods", "sbs_llm", "--fractions", "0.125", "--models", "t5_1_1_tiny",
            "--seeds", "0", "--train_steps", "4", "--gin_file", "gin/quickstart.gin",
            "--output_dir", str(grid_dir), "--source_dir", str(dss_data_dir),
            # The checkpoint's sizes, not the quickstart's.
            "--gin_bindings", "RunConfig.model_overrides = {}",
            "--gin_bindings", "BATCH_SIZE = 16", "--gin_bindings", "EVAL_PERIOD = 4",
            "--gin_bindings", "RunConfig.max_decode_len = 8",
            "--gin_bindings", "RunConfig.warmup_steps = 0",
            "--gin_bindings", 'TASK_FEATURE_LENGTHS = {"inputs": 48, "targets": 16}']
    assert experiments_cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    assert not (grid_dir / "data" / "spiece.model").exists()
    model_dir = grid_dir / "svamp/t5_1_1_tiny/sbs_llm/12.5pct/seed0" / "model"
    record = json.loads((model_dir.parent / report.RESULTS_FILE).read_text())
    assert record["initial_checkpoint"] == str(checkpoint)
    summary = json.loads((model_dir / "run_summary.json").read_text())
    assert summary["initialised_from"]["path"] == str(checkpoint)
    assert summary["initialised_from"]["vocabulary_from"] == "checkpoint"
    assert summary["step"] == 4

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert sha(model_dir / "spiece.model") == sha(checkpoint / "spiece.model")


def test_dry_run_shows_the_train_command_under_its_launcher(tmp_path, capsys):
    assert experiments_cli.main(["--output_dir", str(tmp_path), "--preset", "ci", "--dry_run",
                                 "--train_prefix", "srun --ntasks-per-node=8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    name, command = lines[0].split(" :: ")
    assert name == "svamp/t5_1_1_tiny/standard_ft/12.5pct/seed0"
    assert command.startswith("srun --ntasks-per-node=8 ") and " -m sbs_jax.train " in command
    assert "--gin.DATA_FRACTION=0.125" in command
