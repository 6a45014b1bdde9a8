"""Grid results: test statistics from eval histories, aggregation over seeds, tables and plots
(sbs_jax.experiments.report). Results are generated from seeded random accuracies (no expected
accuracy is hard-coded)."""

import csv
import json
import pathlib
import random
import statistics

import matplotlib.image
import pytest
from conftest import GRID_RECIPE, write_finished_cells

from sbs_jax.experiments import grid, report, runner
from sbs_jax.experiments.grid import Cell


def test_mean_and_stderr_match_statistics():
    values = [random.Random(3).uniform(0, 100) for _ in range(4)]
    mean, stderr = report.mean_and_stderr(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / 2)
    assert report.mean_and_stderr([42.0]) == (42.0, None)


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
    write_finished_cells(tmp_path, cells, GRID_RECIPE, random.Random(1))
    rows = report.aggregate(report.load_results(tmp_path))
    assert [r["test_at_best_valid_stderr"] for r in rows] == [None, None]
    markdown = report.markdown_table(rows)
    assert "| standard fine-tuning (gold labels) | " in markdown
    assert " — |" in markdown and "(n=1)" in markdown


def test_unreadable_results_file_is_named(tmp_path):
    cell_dir = tmp_path / "svamp" / "x"
    cell_dir.mkdir(parents=True)
    (cell_dir / report.RESULTS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable results file .*svamp/x/results.json"):
        report.load_results(tmp_path)
    (cell_dir / report.RESULTS_FILE).write_text(json.dumps({"dataset": "svamp"}))
    with pytest.raises(ValueError, match="lacks"):
        report.load_results(tmp_path)


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
                      ("Maximum test accuracy over the evals (what the reference's test logs "
                       "allow):")]
    # The paper's numbers (from its test logs) sit under the maximum over evals.
    last_table = sections[sections.index(titles[-1]) + 1]
    assert "| paper, T5-Base: standard fine-tuning [1] | — | 62.19 |" in last_table
