"""Record schema round trip and atomic shard commits."""

import os

import pytest

from sbs_jax.data import records
from sbs_jax.data.records import Record


def _records(n, split="train"):
    return [
        Record(id=f"r{i}", input=f"input {i} ünïcode", label=str(i % 3), llm_label="x",
               rationale=f"because {i}", source=f"toy/{split}",
               teacher="t" if i % 2 else "", raw_completion="raw" if i % 2 else "")
        for i in range(n)
    ]


def test_write_read_round_trip_preserves_every_field_and_order(tmp_path):
    written = _records(7)
    paths = records.write_split(written, str(tmp_path), "train", records_per_shard=3)
    assert [os.path.basename(p) for p in paths] == [
        "train-00000.tfrecord", "train-00001.tfrecord", "train-00002.tfrecord"]
    assert records.read_split(str(tmp_path), "train") == written
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path):
    records.write_split(_records(6), str(tmp_path), "valid", records_per_shard=2)
    records.write_split(_records(2), str(tmp_path), "valid", records_per_shard=2)
    assert len(records.shard_paths(str(tmp_path), "valid")) == 1
    assert len(records.read_split(str(tmp_path), "valid")) == 2


def test_tmp_files_and_other_splits_are_not_shards(tmp_path):
    records.write_shard(_records(2), str(tmp_path), "test", 0)
    (tmp_path / "test-00001.123.tmp").write_bytes(b"half written")
    (tmp_path / "train-00000.tfrecord.tmp").write_bytes(b"half written")
    assert records.shard_paths(str(tmp_path), "test") == [str(tmp_path / "test-00000.tfrecord")]
    assert records.shard_paths(str(tmp_path), "train") == []


def test_missing_split_error_names_folder_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-\*\.tfrecord.*" + tmp_path.name):
        records.read_split(str(tmp_path), "train")


def test_record_without_required_feature_is_an_error_naming_it(tmp_path):
    from sbs_jax.tf_setup import tf

    example = tf.train.Example(features=tf.train.Features(feature={
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a"]))}))
    path = str(tmp_path / "train-00000.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(example.SerializeToString())
    with pytest.raises(ValueError, match=r"train-00000\.tfrecord record 0.*'input'"):
        records.read_split(str(tmp_path), "train")


def test_tf_feature_spec_parses_written_examples_with_optional_defaults():
    from sbs_jax.tf_setup import tf

    data = records.to_example_bytes(_records(1)[0])
    parsed = tf.io.parse_single_example(data, records.tf_feature_spec())
    assert parsed["input"].numpy().decode() == "input 0 ünïcode"
    assert parsed["teacher"].numpy() == b""
