"""The Beam form of the teacher job on the DirectRunner with the rules backend."""

import json
import os
import pathlib

from sbs_jax.cli import teacher_beam
from sbs_jax.data import records, synthetic


def _shards(output_dir):
    return sorted(n for n in os.listdir(output_dir) if ".tfrecord" in n)


def test_beam_job_writes_each_example_once_and_resumes(tmp_path):
    out = str(tmp_path / "out")
    base = ["--dataset", "synthetic", "--input", "synthetic:40:7", "--output_dir", out]
    assert teacher_beam.main(base + ["--limit", "25"]) == 0
    assert teacher_beam.main(base + ["--limit", "40", "--", "--direct_num_workers", "1"]) == 0

    assert _shards(out) == ["train-00000.tfrecord", "train-00001.tfrecord"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    written = records.read_split(out, "train")
    gold = {r.id: r for r in synthetic.generate(40, seed=7, split="train")}
    assert sorted(r.id for r in written) == sorted(gold)
    for record in written:
        expected = gold[record.id]
        assert (record.input, record.label, record.llm_label, record.rationale) == (
            expected.input, expected.label, expected.label, expected.rationale)
        assert record.source == "synthetic/train" and record.teacher == "rules"
    stats = json.loads(pathlib.Path(out, "stats.json").read_text())
    assert stats["records"] == 40 and stats["failed"] == 0 and stats["new_shards"] == 1


def test_beam_job_reads_jsonl_and_reports_failures(tmp_path):
    rows = [{"id": f"ok{i}", "input": r.input, "label": r.label}
            for i, r in enumerate(synthetic.generate(5, seed=1, split="test"))]
    rows.append({"id": "bad", "input": "seven plus two"})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = str(tmp_path / "out")
    code = teacher_beam.main(["--dataset", "synthetic", "--input", str(path), "--output_dir", out,
                              "--split", "test"])
    assert code == 0
    assert sorted(r.id for r in records.read_split(out, "test")) == [f"ok{i}" for i in range(5)]
    stats = json.loads(pathlib.Path(out, "stats.json").read_text())
    assert [f["id"] for f in stats["failures"]] == ["bad"]
    assert "cannot solve" in stats["failures"][0]["reason"]
    assert stats["agreement_with_gold"]["agree"] == 5
