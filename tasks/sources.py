"""A seqio DataSource over our record shards, with the folder resolved when it is read."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import seqio

from sbs_jax.data import records, synthetic, verify
from sbs_jax.runtime.tf_setup import tf
from tasks import config


def _parse_records(path: tf.Tensor) -> tf.data.Dataset:
    spec = records.tf_feature_spec()
    return tf.data.TFRecordDataset(path).map(
        lambda data: tf.io.parse_single_example(data, spec),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


class RecordSource(seqio.FileDataSource):
    """Reads `{data_dir}/{dataset}/{split}-*.tfrecord`; each example also carries `split`.

    The folder is looked up on every read (not at registration) and, for the synthetic dataset,
    created on first use. Each split is checked against the folder's info.json (or teacher
    ledgers) before it is read: a partial or mixed folder is refused (`sbs_jax.data.verify`), and
    so is a vocabulary other than the one info.json pins (`config.check_pinned_vocabulary`).
    `split` lets preprocessors treat train differently (teacher labels).
    """

    def __init__(self, dataset: str):
        self._dataset = dataset
        super().__init__(
            read_file_fn=_parse_records,
            split_to_filepattern={s: f"$SBS_DATA_DIR/{dataset}/{s}-*.tfrecord"
                                  for s in records.SPLITS},
            cycle_length=1,
        )

    def directory(self) -> str:
        root = config.data_dir()
        if self._dataset == "synthetic":
            return synthetic.ensure_dataset(root)
        return os.path.join(root, self._dataset)

    def _shards(self, split: str) -> list[verify.VerifiedShard]:
        directory = self.directory()
        shards = verify.verify_split(directory, split)
        config.check_pinned_vocabulary(directory)
        if not shards:
            raise FileNotFoundError(
                f"no '{split}' record shards for {self._dataset!r} in {directory!r}: build them "
                f"with `sbs-build-data --dataset {self._dataset} --data_dir ...` (or the teacher "
                "job) and point SBS_DATA_DIR / tasks.data_config.data_dir at that folder"
            )
        return shards

    def list_shards(self, split: str) -> Sequence[str]:
        return [shard.path for shard in self._shards(split)]

    def num_input_examples(self, split: str) -> int:
        """Records of the split, as the verified shards' listings count them (none is read)."""
        return sum(shard.num_records for shard in self._shards(split))

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        dataset = super().get_dataset(split, shuffle, seed, shard_info)
        return dataset.map(lambda ex: {**ex, "split": tf.constant(split)})

    def __str__(self) -> str:
        return f"RecordSource({self._dataset!r})"
