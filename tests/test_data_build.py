"""The build job checks every row before it writes anything, publishes a dataset folder whole (a
SIGKILL at any moment leaves the old folder or the new one, never a mix), and makes or takes the
vocabulary. Readers (records, the SeqIO tasks, pipeline.eval_set) refuse partial and mixed
folders; teacher output folders are checked against their ledgers. Real processes, real files."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest

from sbs_jax.cli import build_data, data_stats
from sbs_jax.cli import teacher as teacher_cli
from sbs_jax.data import build, dss, publish, records
from sbs_jax.teacher.inputs import read_inputs


def _svamp_row(i: int) -> dict:
    return {"input": f"Tom has {i} apples.\nHow many now?", "label": f"( {i}.0 + 1.0 )"}


def _svamp_release(root, n_train=60, n_test=20, raw_lines=None):
    """A svamp-shaped release; `raw_lines` {(split, line_number): bytes} replaces rows."""
    folder = root / "svamp"
    (folder / "llm").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = [json.dumps(_svamp_row(i)).encode() for i in range(n)]
        for (bad_split, number), raw in (raw_lines or {}).items():
            if bad_split == split:
                lines[number - 1] = raw
        (folder / f"svamp_{split}.json").write_bytes(b"\n".join(lines) + b"\n")
        (folder / "llm" / f"{split}_CoT_0.json").write_text(json.dumps(
            [f"He had {i} and got 1. The answer is ({i} + 1)." for i in range(n)]))
    return root


def test_every_bad_row_is_named_before_anything_is_written(tmp_path, capsys):
    source = _svamp_release(tmp_path / "release", raw_lines={
        ("train", 3): json.dumps({"input": "x has 3", "label": 450}).encode(),
        ("train", 7): b'{"input": "caf\xe9 \xff", "label": "( 1.0 + 2.0 )"}',
        ("test", 2): json.dumps({"input": 5, "label": "( 1.0 )"}).encode()})
    out = tmp_path / "data"
    code = build_data.main(["--source_dir", str(source), "--data_dir", str(out),
                            "--dataset", "svamp"])
    err = capsys.readouterr().err
    assert code == 2
    assert "svamp_train.json:3: 'label' is int 450, expected str" in err
    assert "svamp_train.json:7: not valid UTF-8 (byte 0xe9 at column 15)" in err
    assert "svamp_test.json:2: 'input' is int 5, expected str" in err
    assert "3 bad rows" in err and "Nothing was published" in err
    assert not out.exists()

    # The stats job applies the same checks: every bad row listed, the figures without them.
    assert data_stats.main(["--data_dir", str(source)]) == 2
    captured = capsys.readouterr()
    assert "svamp_train.json:3: 'label' is int 450" in captured.err
    assert "svamp    train  58" in captured.out and "bad rows left out" in captured.out

    code = build_data.main(["--source_dir", str(source), "--data_dir", str(out),
                            "--dataset", "svamp", "--skip_bad", "--no_vocab"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "svamp" / "info.json").read_text())
    assert len(info["released"]["train"]["skipped"]) == 2
    assert info["splits"]["test"]["num_records"] == 19


def test_repeated_ids_and_unicode_line_breaks(tmp_path):
    row = {"id": "q1", "question": "Where\u2028now?", "choices": list("abcde"), "answer": "c"}
    lines = [json.dumps(row, ensure_ascii=False), json.dumps({**row, "id": "q2"}),
             json.dumps(row)]
    (tmp_path / "cqa").mkdir()
    (tmp_path / "cqa" / "cqa_test.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(dss.DataError, match=r"cqa_test\.json:3: id 'cqa-q1' already at line 1"):
        dss.read_split(str(tmp_path), "cqa", "test")
    data = dss.read_split(str(tmp_path), "cqa", "test", skip_bad=True)
    assert [r.id for r in data.records] == ["cqa-q1", "cqa-q2"]  # U+2028 broke no row
    assert data.records[0].input.startswith("Where\u2028now?\nAnswer Choices:")

    jsonl = tmp_path / "inputs.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "input": "1\u20282"}, ensure_ascii=False) + "\n"
                     + json.dumps({"id": "b", "input": "3 + 4"}) + "\r\n", encoding="utf-8")
    assert [e.input for e in read_inputs(str(jsonl), "synthetic", "train")] == ["1\u20282",
                                                                                 "3 + 4"]
    jsonl.write_bytes(b'{"id": "a", "input": "1"}\n{"id": "b", "input": "\xc3("}\n')
    with pytest.raises(ValueError, match=r"inputs\.jsonl:2: not valid UTF-8 \(byte 0xc3"):
        read_inputs(str(jsonl), "synthetic", "train")


def _split_contents(directory):
    return {split: [r.id for r in records.read_split(directory, split)]
            for split in records.SPLITS}


def test_sigkill_during_a_rebuild_never_shows_a_partial_dataset(tmp_path):
    source = _svamp_release(tmp_path / "release")
    data = tmp_path / "data"
    directory = str(data / "svamp")
    build.build(str(source), str(data), "svamp", records_per_shard=50)
    expected = _split_contents(directory)
    assert [len(expected[s]) for s in records.SPLITS] == [54, 6, 20]

    # A rebuild with another shard layout, killed: first as soon as its staging folder holds
    # info.json (the publish step is next), then at random moments of a build, until one kill
    # has landed before the build finished (a fast build can end first: at most 5 builds).
    rng = random.Random(0)
    kills = []
    to_publish = None
    for attempt in range(5):
        if attempt >= 2 and any(kills):
            break
        start = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "sbs_jax.data.build", "--source_dir", str(source),
             "--data_dir", str(data), "--dataset", "svamp", "--no_vocab",
             "--records_per_shard", "7"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = start + 240
        if attempt == 0:
            while process.poll() is None and time.monotonic() < deadline and not any(
                    name.startswith(".svamp.staging-") and os.path.exists(data / name / "info.json")
                    for name in os.listdir(data)):
                time.sleep(0.001)
            to_publish = time.monotonic() - start
        else:
            time.sleep(rng.uniform(0.3, 1.0) * to_publish)
        kills.append(process.poll() is None)
        process.kill()
        process.wait()
        # Whatever the moment: every split reads whole (the old layout or the new), never mixed.
        assert _split_contents(directory) == expected
        info = json.loads((data / "svamp" / "info.json").read_text())
        assert sorted(n for n in os.listdir(directory) if ".tfrecord" in n) == sorted(
            s["name"] for split in info["splits"].values() for s in split["shards"])
    assert any(kills), "every build finished before it could be killed"

    build.build(str(source), str(data), "svamp", records_per_shard=7)
    assert _split_contents(directory) == expected
    info = json.loads((data / "svamp" / "info.json").read_text())
    assert len(info["splits"]["train"]["shards"]) == 8  # ceil(54 / 7): the new layout
    assert not [n for n in os.listdir(data) if ".staging-" in n or ".previous-" in n]
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_readers_refuse_partial_and_mixed_folders_with_a_rebuild_hint(tmp_path, toy_dir):
    from sbs_jax.data import pipeline

    source = _svamp_release(tmp_path / "release")
    build.build(str(source), str(toy_dir), "svamp", records_per_shard=2)
    evaluation = pipeline.eval_set("svamp_label_llm", "valid")
    assert len(evaluation.ids) == 6
    os.remove(toy_dir / "svamp" / "valid-00001.tfrecord")
    with pytest.raises(records.DatasetError, match=r"incomplete: 2 of 3 shards.*Rebuild it"):
        pipeline.eval_set("svamp_label_llm", "valid")
    records.write_shard([records.Record(id="svamp-x", input="x", label="( 1.0 )")],
                        str(toy_dir / "svamp"), "train", 27)
    with pytest.raises(records.DatasetError, match="train-00027.tfrecord not listed"):
        pipeline.PairedBatches("svamp_label_llm", "svamp_rationale", "train", 8,
                               {"inputs": 64, "targets": 32})


def test_readers_refuse_a_vocabulary_other_than_the_pinned_one(tmp_path, tiny_vocab_path):
    import tasks
    from sbs_jax.data import pipeline

    source = _svamp_release(tmp_path / "release")
    data = tmp_path / "data"
    build.build(str(source), str(data), "svamp", vocab=tiny_vocab_path)
    other = build.ensure_vocabulary(str(tmp_path / "other"), records.read_split(
        str(data / "svamp"), "test"), vocab_size=600)
    info_path = data / "svamp" / "info.json"
    pinned, other_sha = records.file_sha256(tiny_vocab_path), records.file_sha256(other)
    tasks.set_data_dir(str(data))
    try:
        assert len(pipeline.eval_set("svamp_label_gt", "test").ids) == 20  # the folder's own
        tasks.set_vocabulary_path(tiny_vocab_path)  # named elsewhere, the same bytes
        assert pipeline.count_examples("svamp_label_gt", "test") == 20
        tasks.set_vocabulary_path(other)
        with pytest.raises(records.DatasetError) as error:
            pipeline.count_examples("svamp_label_gt", "test")
        for name in (other, other_sha[:12], str(info_path), pinned[:12],
                     str(data / "spiece.model")):
            assert name in str(error.value)
        # The folder's own spiece.model replaced after the build is refused too.
        tasks.set_vocabulary_path(None)
        shutil.copyfile(other, data / "spiece.model")
        with pytest.raises(records.DatasetError, match=rf"the task vocabulary {data}/spiece.model "
                           rf"\(sha256 {other_sha[:12]}\) is not the one {info_path} pins"):
            pipeline.eval_set("svamp_label_gt", "test")
    finally:
        tasks.set_data_dir(None)
        tasks.set_vocabulary_path(None)


def _teacher(*args):
    return teacher_cli.main(["--dataset", "synthetic", "--log_level", "WARNING", *map(str, args)])


def test_teacher_folders_are_read_against_their_ledgers(tmp_path, capsys):
    out = tmp_path / "teacher_data" / "synthetic"
    assert _teacher("--input", "synthetic:7", "--output_dir", out, "--shard_size", "3") == 0
    assert len(records.read_split(str(out), "train")) == 7
    ledger = json.loads((out / "train-00000.ledger.json").read_text())
    assert ledger["sha256"] == records.file_sha256(str(out / "train-00000.tfrecord"))

    (out / "train-00002.tfrecord").rename(tmp_path / "aside")
    with pytest.raises(records.DatasetError, match=r"train-00002.ledger.json list records "
                                                   r"whose shard was never committed.*Re-run"):
        records.read_split(str(out), "train")
    (tmp_path / "aside").rename(out / "train-00002.tfrecord")
    built = tmp_path / "built"
    publish.publish(str(built), "synthetic", {"train": [records.Record(id="z", input="1 + 1")]})
    os.link(built / "train-00000.tfrecord", out / "train-00005.tfrecord")
    with pytest.raises(records.DatasetError, match="train-00005.tfrecord have no teacher ledger"):
        records.shard_paths(str(out), "train")
    os.remove(out / "train-00005.tfrecord")

    # A job that could not finish: its split is refused until a re-run finishes it.
    assert _teacher("--input", "synthetic:4", "--split", "test", "--output_dir", out,
                    "--backend", "openai", "--base_url", "http://127.0.0.1:9/v1",
                    "--max_retries", "0", "--concurrency", "1",
                    "--max_consecutive_failures", "2") == 2
    with pytest.raises(records.DatasetError, match=r"teacher job on split 'test' has not "
                                                   r"finished \(2 examples not attempted"):
        records.read_split(str(out), "test")
    assert len(records.read_split(str(out), "train")) == 7

    # Teacher output never lands among built shards, and a build never replaces teacher output.
    capsys.readouterr()
    assert _teacher("--input", "synthetic:2", "--output_dir", built) == 2
    assert "is a published dataset" in capsys.readouterr().err
    os.remove(built / "info.json")
    assert _teacher("--input", "synthetic:2", "--output_dir", built) == 2
    assert "no teacher ledger lists" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="holds files a build does not write"):
        build.build(None, str(tmp_path / "teacher_data"), "synthetic")


def test_the_build_makes_or_takes_the_vocabulary_and_keeps_other_splits(tmp_path, capsys):
    source = _svamp_release(tmp_path / "release")
    data = tmp_path / "data"
    args = ["--source_dir", str(source), "--data_dir", str(data), "--dataset", "svamp"]
    assert build_data.main(args) == 0, capsys.readouterr().err
    vocab = data / "spiece.model"
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 3)[2] for line in lines] == ["training", "wrote", "vocabulary:"]
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines)
    info = json.loads((data / "svamp" / "info.json").read_text())
    assert info["vocabulary"] == {"path": "../spiece.model", "sha256": records.file_sha256(
        str(vocab))}
    from sbs_jax.data.vocab import load_vocab

    text = "Tom has 12 apples.\nHow many now?"
    assert load_vocab(str(vocab)).decode(load_vocab(str(vocab)).encode(text)) == text

    other = tmp_path / "other"
    other_model = build.ensure_vocabulary(str(other), records.read_split(
        str(data / "svamp"), "test"), vocab_size=600)
    capsys.readouterr()
    assert build_data.main(args + ["--vocab", other_model]) == 2
    assert "differs from --vocab" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert build_data.main(["--source_dir", str(source), "--data_dir", str(fresh), "--dataset",
                            "svamp", "--vocab", other_model, "--splits", "test"]) == 0
    assert records.file_sha256(str(fresh / "spiece.model")) == records.file_sha256(other_model)

    before = {s: records.shard_paths(str(data / "svamp"), s) for s in ("train", "valid")}
    checksums = {s: [records.file_sha256(p) for p in paths] for s, paths in before.items()}
    assert build_data.main(args + ["--splits", "test", "--records_per_shard", "5"]) == 0
    info = json.loads((data / "svamp" / "info.json").read_text())
    assert len(info["splits"]["test"]["shards"]) == 4
    for split in before:
        assert [records.file_sha256(p) for p in records.shard_paths(
            str(data / "svamp"), split)] == checksums[split]
    assert set(info["released"]) == {"train", "test"} and "valid_carve" in info


def test_a_build_killed_between_two_renames_gets_the_old_folder_back(tmp_path, capsys):
    # Where a filesystem cannot swap folders, publishing renames the old one aside first; a
    # build killed right then leaves this state, which the next build repairs before anything.
    data = tmp_path / "data"
    old = [records.Record(id=f"t{i}", input=f"{i} + 1") for i in range(3)]
    publish.publish(str(data / "toy"), "toy", {"train": old, "test": old[:1]})
    os.rename(data / "toy", data / ".toy.previous-4242")
    os.mkdir(data / ".toy.staging-4243")
    (data / ".toy.staging-4243" / "train-00000.tfrecord").write_bytes(b"half")
    new_test = [records.Record(id="n0", input="2 + 2")]
    publish.publish(str(data / "toy"), "toy", {"test": new_test})
    assert [r.id for r in records.read_split(str(data / "toy"), "train")] == ["t0", "t1", "t2"]
    assert records.read_split(str(data / "toy"), "test") == new_test
    assert sorted(os.listdir(data)) == [".toy.publish.lock", "toy"]
    assert "left by an interrupted build" in capsys.readouterr().out
