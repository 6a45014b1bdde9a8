"""SeqIO task registrations: names, lazy data/vocabulary resolution, formats, metrics."""

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest
import seqio
from conftest import REPO_ROOT

import tasks
from sbs_jax.data import records, synthetic
from sbs_jax.data.dss import join_nli_input
from sbs_jax.data.records import Record

DATASETS = ("esnli", "anli1", "cqa", "svamp", "synthetic")
LENGTHS = {"inputs": 128, "targets": 128}


def _read(task_name, split, lengths=LENGTHS):
    task = seqio.get_mixture_or_task(task_name)
    return list(task.get_dataset(lengths, split=split, shuffle=False).as_numpy_iterator())


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """A fresh data folder: the synthetic tasks create data and vocabulary on first read."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    tasks.set_data_dir(data_dir)
    tasks.set_vocabulary_path(None)
    yield data_dir
    tasks.set_data_dir(None)


def test_every_name_is_registered_and_registration_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("SBS_DATA_DIR", str(tmp_path / "never_created"))
    tasks.register_all()
    tasks.register_all()
    assert not (tmp_path / "never_created").exists()
    for ds in DATASETS:
        for suffix in ("label_gt", "label_llm", "rationale", "standard_gt", "standard_llm",
                       "label_mixture", "rationale_mixture"):
            assert seqio.get_mixture_or_task(f"{ds}_{suffix}").name == f"{ds}_{suffix}"


def test_synthetic_tasks_create_their_data_and_vocabulary_on_first_read(synthetic_dir):
    label = _read("synthetic_label_gt", "test")
    rationale = _read("synthetic_rationale", "test")
    assert os.path.exists(os.path.join(synthetic_dir, "spiece.model"))
    with open(os.path.join(synthetic_dir, "synthetic", "info.json")) as f:
        info = json.load(f)
    assert info["splits"]["test"]["num_records"] == len(label) == synthetic.DEFAULT_SIZES["test"]
    assert [e["id"] for e in label] == [e["id"] for e in rationale]
    vocab = tasks.get_vocabulary(for_synthetic=True)
    first = label[0]
    text = first["inputs_pretokenized"].decode()
    assert text.startswith("predict: ")
    rationale_text, answer = synthetic.solve(text[len("predict: "):])
    assert first["targets_pretokenized"].decode() == answer
    assert vocab.decode(first["targets"].tolist()) == answer
    assert first["targets"][-1] == 1 and first["inputs"][-1] == 1
    assert rationale[0]["inputs_pretokenized"].decode() == "explain: " + text[9:]
    assert vocab.decode(rationale[0]["targets"].tolist()) == rationale_text


def test_concurrent_first_use_creates_one_complete_dataset(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(synthetic.ensure_dataset, str(tmp_path)) for _ in range(2)]
    for call in calls:
        call.result()  # raises what the call raised
    directory = tmp_path / "synthetic"
    assert sorted(os.listdir(directory)) == [
        "info.json", "test-00000.tfrecord", "train-00000.tfrecord", "valid-00000.tfrecord"]
    assert len(records.read_split(str(directory), "train")) == synthetic.DEFAULT_SIZES["train"]


def _write(data_dir, dataset, split, recs):
    records.write_split(recs, os.path.join(data_dir, dataset), split)
    records.write_info(os.path.join(data_dir, dataset), dataset)


def test_llm_variants_use_teacher_labels_on_train_only(toy_dir, tiny_vocab_path):
    for split in ("train", "test"):
        _write(toy_dir, "cqa", split, [Record(
            id=f"cqa-{split}-0", input="Where?\nAnswer Choices:\n(a) cupboard\n(b) table",
            label="cupboard", llm_label="table", rationale="Plates go there.",
            source=f"cqa/{split}")])
    assert _read("cqa_label_llm", "train")[0]["targets_pretokenized"] == b"table"
    assert _read("cqa_label_llm", "test")[0]["targets_pretokenized"] == b"cupboard"
    assert _read("cqa_label_gt", "train")[0]["targets_pretokenized"] == b"cupboard"
    standard = _read("cqa_standard_llm", "train")[0]
    assert standard["inputs_pretokenized"].startswith(b"Where?")
    assert standard["targets_pretokenized"] == b"table"


def test_nli_inputs_put_the_eos_token_between_premise_and_hypothesis(toy_dir, tiny_vocab_path):
    premise, hypothesis = "A man plays a guitar.", "A person performs music."
    _write(toy_dir, "esnli", "valid", [Record(
        id="esnli-valid-0", input=join_nli_input(premise, hypothesis), label="entailment",
        llm_label="entailment", rationale="Playing guitar is music.", source="esnli/valid")])
    example = _read("esnli_label_gt", "valid")[0]
    vocab = seqio.SentencePieceVocabulary(tiny_vocab_path)
    expected = vocab.encode("predict: " + premise) + [1] + vocab.encode(hypothesis) + [1]
    assert example["inputs"].tolist() == expected
    assert example["inputs_pretokenized"].decode() == f"predict: {premise}</s>{hypothesis}"


def test_label_metrics_accuracy_and_svamp_arithmetic(toy_dir):
    cqa = seqio.get_mixture_or_task("cqa_label_gt")
    target = cqa.postprocess_fn("cupboard", example={}, is_target=True)
    assert cqa.metric_fns[0]([target, target], ["cupboard", "table"]) == {"accuracy": 50.0}
    svamp = seqio.get_mixture_or_task("svamp_label_gt")
    assert svamp.metric_fns[0](["( 84.0 / 2.0 )", "( 7.0 * 30.0 )"],
                               ["(84 / 2)", "(7 * 36)"]) == {"accuracy": 50.0}
    assert seqio.get_mixture_or_task("svamp_rationale").metric_fns == []


def test_safe_arithmetic_evaluates_numbers_only():
    from sbs_jax.infer.metrics import safe_arithmetic

    assert safe_arithmetic("( ( 17.0 + 15.0 ) + 2.0 )") == 34.0
    assert safe_arithmetic("-(3 - 5) / 4") == 0.5
    for bad in ["__import__('os').system('true')", "(175, 5)", "9 ** 9 ** 9", "1 / 0", "x + 1",
                "", "(1 +", "1" * 600]:
        assert safe_arithmetic(bad) is None, bad


def test_missing_shards_and_vocabulary_errors_name_what_to_do(toy_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'train' record shards for 'anli1'.*"
                                                r"sbs-build-data"):
        _read("anli1_label_gt", "train")
    tasks.set_vocabulary_path(str(tmp_path / "missing.model"))
    _write(toy_dir, "svamp", "test", [Record(id="s", input="x", label="( 1.0 )",
                                            source="svamp/test")])
    with pytest.raises(Exception, match=r"missing\.model.*SBS_VOCAB"):
        _read("svamp_label_gt", "test")


def test_gin_binding_names_the_data_folder_and_vocabulary(monkeypatch, tmp_path):
    import gin

    monkeypatch.setenv("SBS_DATA_DIR", "/from/env")
    monkeypatch.delenv("SBS_VOCAB", raising=False)
    assert tasks.data_dir() == "/from/env"
    gin.parse_config([f"tasks.data_config.data_dir = '{tmp_path}'",
                      "tasks.data_config.vocabulary_path = '/gin/spiece.model'"])
    try:
        assert tasks.data_dir() == str(tmp_path)
        with pytest.raises(FileNotFoundError, match="/gin/spiece.model"):
            tasks.get_vocabulary()
        tasks.set_data_dir("/explicit")
        assert tasks.data_dir() == "/explicit"
    finally:
        tasks.set_data_dir(None)
        # Back to the defaults without clearing other tests' bindings.
        gin.bind_parameter("tasks.data_config.data_dir", None)
        gin.bind_parameter("tasks.data_config.vocabulary_path", None)


def test_list_prints_every_task_and_mixture_once(capsys):
    from tasks.__main__ import main

    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    registered = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
    assert sorted(names) == sorted(registered) and len(set(names)) == len(names)
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["cqa_label_llm"].split()[1] == "task"
    assert "'predict: <input>' -> teacher label on train" in by_name["cqa_label_llm"]
    assert "the same as cqa_rationale" in by_name["cqa_rationale_mixture"]
    assert by_name["cqa_label_gt"].endswith("[accuracy]")


def test_sbs_jax_tasks_lists_the_names_matching_a_pattern():
    listed = subprocess.run([sys.executable, "-m", "sbs_jax.tasks", "--list", "^svamp_label"],
                            capture_output=True, text=True, timeout=300, check=False,
                            cwd=REPO_ROOT)
    assert listed.returncode == 0, listed.stderr[-2000:]
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [
        "svamp_label_gt", "svamp_label_llm", "svamp_label_mixture"]
    assert lines[0].endswith("[arithmetic_accuracy]")
