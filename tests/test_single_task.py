"""The paper's single-task baseline: tasks (rationale then label in one target), label
extraction at eval, nested fractions, and one tiny grid cell trained and evaluated end to end."""

import json
import os
import re

import pytest
import seqio

import tasks
from sbs_jax.cli import experiments as experiments_cli
from sbs_jax.data import pipeline, records, synthetic
from sbs_jax.data.parse import parse_completion
from sbs_jax.data.records import Record
from sbs_jax.experiments import report

DATASETS = ("esnli", "anli1", "cqa", "svamp", "synthetic")
LENGTHS = {"inputs": 128, "targets": 128}
SMALL_SYNTHETIC = {"train": 64, "valid": 16, "test": 16}


def _read(task_name, split):
    task = seqio.get_mixture_or_task(task_name)
    return list(task.get_dataset(LENGTHS, split=split, shuffle=False).as_numpy_iterator())


def _write(data_dir, dataset, split, recs):
    records.write_split(recs, os.path.join(data_dir, dataset), split)
    records.write_info(os.path.join(data_dir, dataset), dataset)


def _cqa(split, label="cupboard", llm_label="table"):
    return Record(id=f"cqa-{split}-0", input="Where?\nAnswer Choices:\n(a) cupboard\n(b) table",
                  label=label, llm_label=llm_label, rationale="Plates go there.",
                  source=f"cqa/{split}")


def test_single_task_names_are_registered_for_every_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("SBS_DATA_DIR", str(tmp_path / "never_created"))
    tasks.register_all()
    tasks.register_all()
    assert not (tmp_path / "never_created").exists()
    for ds in DATASETS:
        for name in (f"{ds}_single_task", f"{ds}_single_task_gt"):
            task = seqio.get_mixture_or_task(name)
            label_task = seqio.get_mixture_or_task(f"{ds}_label_gt")
            assert task.name == name and list(task.metric_fns) == list(label_task.metric_fns)


def test_target_is_rationale_then_label_teacher_labels_on_train_only(toy_dir):
    for split in ("train", "test"):
        _write(toy_dir, "cqa", split, [_cqa(split)])
    train = _read("cqa_single_task", "train")[0]
    assert train["inputs_pretokenized"].startswith(b"Where?")  # one task: no prefix
    assert train["targets_pretokenized"] == b"Plates go there. So the answer is table."
    assert _read("cqa_single_task", "test")[0]["targets_pretokenized"] == \
        b"Plates go there. So the answer is cupboard."
    assert _read("cqa_single_task_gt", "train")[0]["targets_pretokenized"] == \
        b"Plates go there. So the answer is cupboard."
    # The format is the rule-based teacher's, so its parser splits it back exactly.
    parsed = parse_completion("synthetic", train["targets_pretokenized"].decode())
    assert (parsed.rationale, parsed.label) == ("Plates go there.", "table")


def test_eval_scores_the_extracted_label_against_the_gold_label(toy_dir):
    _write(toy_dir, "cqa", "test", [_cqa("test"), _cqa("test", label="washington d.c.").replace(
        id="cqa-test-1")])
    examples = pipeline.eval_set("cqa_single_task", "test", 128, 128)
    assert examples.targets == ["cupboard", "washington d.c."]
    predictions = ["Plates go there. So the answer is cupboard.",
                   "It is the capital. So the answer is washington d.c.."]
    assert examples.score(predictions) == {"accuracy": 100.0}
    assert examples.score(["So the answer is table.", "washington d.c."]) == {"accuracy": 0.0}
    post = seqio.get_mixture_or_task("cqa_single_task").postprocess_fn
    assert post("no marker at all", example=None, is_target=False) == ""
    with pytest.raises(ValueError, match="single-task target without"):
        post("cupboard", example=None, is_target=True)


def test_svamp_single_task_compares_expression_values(toy_dir):
    _write(toy_dir, "svamp", "test", [Record(
        id="svamp-test-0000", input="Tom has 84 cards and halves them. How many?",
        label="( 84.0 / 2.0 )", llm_label="( 84.0 / 2.0 )", rationale="Half of 84.",
        source="svamp/test")])
    examples = pipeline.eval_set("svamp_single_task", "test", 128, 128)
    assert examples.score(["Half of 84. So the answer is (84 / 2)."]) == {"accuracy": 100.0}
    assert examples.score(["Half of 84. So the answer is (84 / 3)."]) == {"accuracy": 0.0}


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory, tiny_vocab_path):
    """A small synthetic data folder (info.json written, so the tasks read it as it is)."""
    data_dir = tmp_path_factory.mktemp("data")
    synthetic.write_dataset(str(data_dir / "synthetic"), SMALL_SYNTHETIC)
    return data_dir


def test_fractions_nest_as_for_the_label_task(small_synthetic, tiny_vocab_path):
    tasks.set_data_dir(str(small_synthetic))
    tasks.set_vocabulary_path(tiny_vocab_path)
    try:
        ids = {}
        for task in ("synthetic_single_task", "synthetic_label_gt"):
            ids[task] = [pipeline.PairedBatches(task, None, "train", 8, LENGTHS,
                                                data_fraction=f).ids for f in (0.25, 0.5)]
    finally:
        tasks.set_data_dir(None)
        tasks.set_vocabulary_path(None)
    quarter, half = ids["synthetic_single_task"]
    assert ids["synthetic_single_task"] == ids["synthetic_label_gt"]
    assert len(quarter) == 16 and set(quarter) < set(half)


def test_tiny_single_task_cell_trains_evaluates_and_reports(small_synthetic, tiny_vocab_path,
                                                            tmp_path, monkeypatch, capsys):
    """2 steps of a tiny T5 on the small synthetic folder: train, eval on test, results, table.

    Batch 32 = the whole 50% fraction, so both steps have one padded shape (one compile)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("SBS_VOCAB", tiny_vocab_path)
    grid_dir = tmp_path / "grid"
    argv = ["--preset", "cpu", "--methods", "single_task", "--fractions", "0.5", "--seeds", "0",
            "--train_steps", "2", "--output_dir", str(grid_dir),
            "--data_dir", str(small_synthetic), "--gin_bindings", "BATCH_SIZE = 32",
            "--gin_bindings", "EVAL_PERIOD = 0", "--gin_bindings", "RunConfig.warmup_steps = 0",
            "--gin_bindings", "RunConfig.max_decode_len = 24"]
    assert experiments_cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert re.search(r"\[synthetic/t5_1_1_tiny/single_task/50pct/seed0 train\] [\d :-]+ step 2/2",
                     out)

    cell_dir = grid_dir / "synthetic" / "t5_1_1_tiny" / "single_task" / "50pct" / "seed0"
    record = json.loads((cell_dir / report.RESULTS_FILE).read_text())
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    assert record["accuracy"] == metrics["accuracy"] and 0.0 <= record["accuracy"] <= 100.0
    assert metrics["num_examples"] == SMALL_SYNTHETIC["test"]
    assert record["settings"]["label_task"] == "synthetic_single_task"
    run = json.loads((cell_dir / "model" / "run_config.json").read_text())
    assert (run["mixture_or_task_name"], run["rationale_mixture_name"]) == \
        ("synthetic_single_task", None)
    assert run["alpha"] == 1.0 and run["task_feature_lengths"]["targets"] == 256
    assert run["max_decode_len"] == 24  # the grid's bindings come after the method's gin file
    markdown = (grid_dir / "results.md").read_text()
    assert (f"| {report.METHOD_TITLES['single_task']} | {record['accuracy']:.2f} (n=1) |"
            in markdown)
