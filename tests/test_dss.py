"""Readers of the paper's released data (../shared/dss_data; skipped when absent) and the
stats/build jobs. Each real split is read once per session."""

import json
import os
import re

import pytest

from sbs_jax.cli import build_data, data_stats
from sbs_jax.data import build, dss, records, stats
from sbs_jax.data.dss import DataError


def _first_record(path) -> dict:
    """The first line of a JSON-lines file, parsed."""
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def stats_rows(dss_data_dir):
    return {(r["dataset"], r["split"]): r for r in stats.collect(str(dss_data_dir))}


@pytest.fixture(scope="session")
def cqa_train(dss_data_dir):
    return dss.read_split(str(dss_data_dir), "cqa", "train")


def test_stats_match_the_reference_figures(stats_rows):
    expected_rows = {("esnli", "valid"): 9842, ("esnli", "test"): 9824, ("anli1", "valid"): 1000,
                     ("anli1", "test"): 1000, ("cqa", "train"): 9741, ("cqa", "test"): 1221,
                     ("svamp", "train"): 800, ("svamp", "test"): 200}
    for key, rows in expected_rows.items():
        assert stats_rows[key]["rows"] == stats_rows[key]["completions"] == rows, key
    accuracy = {ds: stats_rows[(ds, "test")]["teacher_accuracy"] for ds in dss.DSS_DATASETS}
    assert {ds: round(a, 1) for ds, a in accuracy.items()} == {
        "esnli": 73.0, "anli1": 65.6, "cqa": 77.2, "svamp": 74.0}
    # The reference's compute_equation_acc on the released svamp train teacher labels.
    assert stats_rows[("svamp", "train")]["teacher_accuracy"] == 73.5
    assert stats_rows[("anli1", "train")]["parse_failures"] == 123
    assert stats_rows[("anli1", "train")]["completions"] == 16946
    assert stats_rows[("svamp", "train")]["empty_rationales"] == 11
    assert stats_rows[("cqa", "train")]["carved_train_valid"] == [8766, 975]
    assert stats_rows[("svamp", "train")]["carved_train_valid"] == [720, 80]
    for ds in ("esnli", "anli1"):
        assert f"{ds}_train.json" in stats_rows[(ds, "train")]["warning"]
    assert "train_r1" in stats_rows[("anli1", "train")]["warning"]


def test_stats_cli_prints_table_and_warns(dss_data_dir, capsys):
    assert data_stats.main(["--data_dir", str(dss_data_dir), "--dataset", "svamp", "--dataset",
                            "anli1"]) == 0
    captured = capsys.readouterr()
    assert "svamp    test   200   200" in captured.out and "74.0" in captured.out
    assert captured.out.startswith("dataset  split")  # the table is data: no time prefix
    # the warning line starts with the local time, as every CLI's status lines
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d warning: anli1 train inputs are not in the "
                    "released data", captured.err)


def test_formatted_examples_match_their_source_records(dss_data_dir, cqa_train):
    root = str(dss_data_dir)
    gold = _first_record(dss.gold_path(root, "cqa", "train"))
    first = cqa_train.records[0]
    assert first.id == f"cqa-{gold['id']}" and first.label == gold["answer"]
    assert first.input == (gold["question"] + "\nAnswer Choices:\n" + "\n".join(
        f"({letter}) {choice}" for letter, choice in zip("abcde", gold["choices"])))
    completion = _json(dss.completion_paths(root, "cqa", "train")[0])[0]
    assert first.raw_completion == completion
    assert first.rationale in completion and first.llm_label in completion

    nli = dss.read_split(root, "anli1", "test").records
    row = _first_record(dss.gold_path(root, "anli1", "test"))
    assert dss.split_nli_input(nli[0].input) == (row["premise"], row["hypothesis"])
    assert nli[0].label == dss.NLI_LABELS[row["label"]] and nli[0].id == f"anli1-{row['uid']}"

    svamp = dss.read_split(root, "svamp", "test").records
    row = _first_record(dss.gold_path(root, "svamp", "test"))
    assert (svamp[0].input, svamp[0].label) == (row["input"], row["label"])


def test_valid_carve_is_fixed_and_disjoint(cqa_train):
    train, valid = dss.carve_valid(cqa_train.records)
    _, again_valid = dss.carve_valid(list(cqa_train.records))
    assert [r.id for r in valid] == [r.id for r in again_valid]
    assert not {r.id for r in train} & {r.id for r in valid}
    assert len(train) + len(valid) == len(cqa_train.records)


def test_build_writes_shards_and_info_with_checksums(dss_data_dir, tmp_path):
    info_path = build.build(str(dss_data_dir), str(tmp_path), "svamp", records_per_shard=300)
    info = _json(info_path)
    assert {s: info["splits"][s]["num_records"] for s in records.SPLITS} == {
        "train": 720, "valid": 80, "test": 200}
    assert [s["name"] for s in info["splits"]["train"]["shards"]] == [
        "train-00000.tfrecord", "train-00001.tfrecord", "train-00002.tfrecord"]
    shard = info["splits"]["train"]["shards"][0]
    assert records.file_sha256(str(tmp_path / "svamp" / shard["name"])) == shard["sha256"]
    test = records.read_split(str(tmp_path / "svamp"), "test")
    assert test == dss.read_split(str(dss_data_dir), "svamp", "test").records


def test_build_of_a_missing_train_split_fails_before_writing(dss_data_dir, tmp_path, capsys):
    code = build_data.main(["--source_dir", str(dss_data_dir), "--data_dir", str(tmp_path),
                            "--dataset", "esnli"])
    assert code == 2
    err = capsys.readouterr().err
    assert "esnli_train.json" in err and "--splits valid test" in err
    assert not (tmp_path / "esnli").exists()


def _toy_release(root, dataset, lines, completions=None):
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{dataset}_test.json").write_text("\n".join(lines) + "\n")
    if completions is not None:
        (folder / "llm").mkdir(exist_ok=True)
        (folder / "llm" / "test_CoT_0.json").write_text(json.dumps(completions))


GOOD_CQA = json.dumps({"id": "q1", "question": "Where?", "choices": list("abcde"),
                       "answer": "c"})


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "malformed JSON"),
    (json.dumps({"id": "q2", "question": "Why?", "choices": list("abcde")}),
     r"missing key\(s\) \['answer'\]"),
    (json.dumps({"id": "q2", "question": " ", "choices": list("abcde"), "answer": "a"}),
     "empty question"),
    (json.dumps({"id": "q2", "question": "Why?", "choices": list("abcde"), "answer": "z"}),
     "answer 'z' is not one of the choices"),
])
def test_bad_rows_name_file_and_line_and_can_be_skipped(tmp_path, bad_line, message):
    _toy_release(tmp_path, "cqa", [GOOD_CQA, bad_line, GOOD_CQA.replace("q1", "q3")],
                 ["A. So the answer is (c) c.", "B. So the answer is (a) a.", "C."])
    with pytest.raises(DataError, match=r"cqa_test\.json:2: " + message):
        dss.read_split(str(tmp_path), "cqa", "test")
    data = dss.read_split(str(tmp_path), "cqa", "test", skip_bad=True)
    assert [r.id for r in data.records] == ["cqa-q1", "cqa-q3"]
    assert len(data.skipped) == 1 and "cqa_test.json:2" in data.skipped[0]
    assert data.records[1].raw_completion == "C." and data.parse_failures == 1


def test_gold_labels_outside_the_label_space_are_errors(tmp_path):
    _toy_release(tmp_path, "anli1", [json.dumps({"uid": "u", "premise": "p", "hypothesis": "h",
                                                 "label": 3})])
    with pytest.raises(DataError, match=r"anli1_test\.json:1: label 3"):
        dss.read_split(str(tmp_path), "anli1", "test")
    _toy_release(tmp_path, "svamp", [json.dumps({"input": "x", "label": "import os"})])
    with pytest.raises(DataError, match=r"svamp_test\.json:1: label 'import os'"):
        dss.read_split(str(tmp_path), "svamp", "test")


def test_completion_count_mismatch_is_an_error(tmp_path):
    _toy_release(tmp_path, "cqa", [GOOD_CQA], ["a", "b"])
    with pytest.raises(DataError, match="1 rows but the teacher completions"):
        dss.read_split(str(tmp_path), "cqa", "test")
    assert os.path.exists(tmp_path / "cqa" / "llm" / "test_CoT_0.json")


def test_esnli_inputs_and_labels_follow_the_source(dss_data_dir):
    root = str(dss_data_dir)
    data = dss.read_split(root, "esnli", "test")
    row = _first_record(dss.gold_path(root, "esnli", "test"))
    assert data.records[0].input == f"{row['premise']}</s>{row['hypothesis']}"
    assert data.records[0].label == dss.NLI_LABELS[row["label"]]
    assert data.records[0].id == "esnli-test-000000"


def test_built_tasks_align_label_and_rationale_by_id_with_nested_fractions(
        dss_data_dir, tmp_path, tiny_vocab_path):
    import tasks
    from sbs_jax.data.pipeline import PairedBatches, PairedExamples

    build.build(str(dss_data_dir), str(tmp_path), "svamp")
    tasks.set_data_dir(str(tmp_path))
    tasks.set_vocabulary_path(tiny_vocab_path)
    try:
        examples = PairedExamples.load("svamp_label_llm", "svamp_rationale", "train",
                                       {"inputs": 256, "targets": 64})
    finally:
        tasks.set_data_dir(None)
        tasks.set_vocabulary_path(None)
    assert sorted(examples.label) == sorted(examples.rationale) and len(examples.label) == 720
    subsets = []
    for fraction in (0.125, 0.25, 0.5, 1.0):
        iterator = PairedBatches("svamp_label_llm", "svamp_rationale", "train", 8,
                                 {"inputs": 256, "targets": 64}, data_fraction=fraction,
                                 examples=examples)
        subsets.append(set(iterator.ids))
    assert [len(s) for s in subsets] == [90, 180, 360, 720]
    assert subsets[0] < subsets[1] < subsets[2] < subsets[3]


@pytest.mark.parametrize("main", [build_data.main, data_stats.main])
def test_clis_answer_help(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--data_dir" in capsys.readouterr().out


def test_build_requires_teacher_completions_unless_allowed(tmp_path):
    source = tmp_path / "release"
    _toy_release(source, "cqa", [GOOD_CQA])
    with pytest.raises(FileNotFoundError, match=r"no teacher completions.*--allow_missing_teacher"):
        build.build(str(source), str(tmp_path / "out"), "cqa", ["test"])
    info = _json(build.build(str(source), str(tmp_path / "out"), "cqa", ["test"],
                             allow_missing_teacher=True))
    assert info["splits"]["test"]["num_records"] == 1
    assert records.read_split(str(tmp_path / "out" / "cqa"), "test")[0].rationale == ""
