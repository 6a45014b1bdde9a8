"""Record schema round trip, atomic shard commits, and what readers accept: a split must match
the info.json (or teacher ledgers) that vouch for its folder."""

import os

import pytest

from sbs_jax.data import records, verify
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
    records.write_info(str(tmp_path), "toy")
    assert records.read_split(str(tmp_path), "train") == written
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path):
    records.write_split(_records(6), str(tmp_path), "valid", records_per_shard=2)
    records.write_split(_records(2), str(tmp_path), "valid", records_per_shard=2)
    records.write_info(str(tmp_path), "toy")
    assert len(records.shard_paths(str(tmp_path), "valid")) == 1
    assert len(records.read_split(str(tmp_path), "valid")) == 2


def test_tmp_files_and_other_splits_are_not_shards(tmp_path):
    records.write_shard(_records(2), str(tmp_path), "test", 0)
    (tmp_path / "test-00001.123.tmp").write_bytes(b"half written")
    (tmp_path / "train-00000.tfrecord.tmp").write_bytes(b"half written")
    records.write_info(str(tmp_path), "toy")
    assert records.shard_paths(str(tmp_path), "test") == [str(tmp_path / "test-00000.tfrecord")]
    assert records.shard_paths(str(tmp_path), "train") == []


def test_missing_split_error_names_folder_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-\*\.tfrecord.*" + tmp_path.name):
        records.read_split(str(tmp_path), "train")


def test_record_without_required_feature_is_an_error_naming_it(tmp_path):
    from sbs_jax.runtime.tf_setup import tf

    example = tf.train.Example(features=tf.train.Features(feature={
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a"]))}))
    path = str(tmp_path / "train-00000.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(example.SerializeToString())
    with pytest.raises(ValueError, match=r"train-00000\.tfrecord record 0.*'input'"):
        list(records.read_shard(path))


def test_tf_feature_spec_parses_written_examples_with_optional_defaults():
    from sbs_jax.runtime.tf_setup import tf

    data = records.to_example_bytes(_records(1)[0])
    parsed = tf.io.parse_single_example(data, records.tf_feature_spec())
    assert parsed["input"].numpy().decode() == "input 0 ünïcode"
    assert parsed["teacher"].numpy() == b""


def _sealed(tmp_path, shards=3):
    records.write_split(_records(3 * shards), str(tmp_path), "train", records_per_shard=3)
    records.write_split(_records(2, "test"), str(tmp_path), "test")
    records.write_info(str(tmp_path), "toy")
    return str(tmp_path)


def test_a_folder_missing_a_listed_shard_is_refused(tmp_path):
    directory = _sealed(tmp_path)
    os.remove(tmp_path / "train-00001.tfrecord")
    with pytest.raises(records.DatasetError, match=r"incomplete: 2 of 3 shards.*"
                                                   r"train-00001.*Rebuild it: `python -m "
                                                   r"sbs_jax.data.build"):
        records.read_split(directory, "train")
    assert len(records.read_split(directory, "test")) == 2  # other splits stay readable


def test_shards_not_in_info_json_are_a_mixed_folder(tmp_path):
    directory = _sealed(tmp_path)
    records.write_shard(_records(2), directory, "train", 3)  # another build's leftover
    with pytest.raises(records.DatasetError, match=r"train-00003.tfrecord not listed in its "
                                                   r"info.json.*mixes"):
        records.shard_paths(directory, "train")
    records.write_shard(_records(1), directory, "valid", 0)  # a split info.json never had
    with pytest.raises(records.DatasetError, match="valid-00000.tfrecord not listed"):
        records.read_split(directory, "valid")


def test_changed_bytes_and_unsealed_folders_are_refused(tmp_path):
    directory = _sealed(tmp_path / "a")
    path = tmp_path / "a" / "train-00002.tfrecord"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(records.DatasetError, match=r"train-00002.tfrecord: SHA-256 differs"):
        records.read_split(directory, "train")
    records.write_split(_records(2), str(tmp_path / "b"), "train")
    with pytest.raises(records.DatasetError, match="without an info.json or teacher ledgers"):
        records.read_split(str(tmp_path / "b"), "train")


def test_count_records_walks_the_framing_and_notices_a_cut(tmp_path):
    path = records.write_shard(_records(5), str(tmp_path), "train", 0)
    assert verify.count_records(path) == 5
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(records.DatasetError, match="truncated after 4 records"):
        verify.count_records(path)


def test_a_record_field_that_is_not_a_string_names_record_and_field():
    with pytest.raises(TypeError, match=r"record 'r0': field 'label' is int 450"):
        records.to_example_bytes(_records(1)[0].replace(label=450))
