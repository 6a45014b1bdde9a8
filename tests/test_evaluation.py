"""Evaluation decoding sharded over the data axes equals decoding on one device."""

import jax
import numpy as np

from sbs_jax import models
from sbs_jax.data.pipeline import EvalSet
from sbs_jax.data.vocab import load_vocab
from sbs_jax.infer import evaluation
from sbs_jax.train import optim, partitioning
from sbs_jax.train import step as step_lib

CONFIG = models.get_config("t5_1_1_tiny", vocab_size=640, num_heads=2, head_dim=8, emb_dim=16,
                           mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                           dropout_rate=0.0)


def test_sharded_eval_decodes_like_one_device(tiny_vocab_path):
    rng = np.random.default_rng(0)
    # 11 examples in batches of 6: the last batch is short, and 6 rows do not divide over the
    # 4 batch shards, so rows are padded to 8 for the mesh.
    inputs = [rng.integers(3, 600, rng.integers(3, 14)).astype(np.int32) for _ in range(11)]
    eval_set = EvalSet(task_name="t", ids=[str(i) for i in range(11)], inputs=inputs,
                       inputs_text=[""] * 11, targets=[""] * 11,
                       vocabulary=load_vocab(tiny_vocab_path))
    mesh = partitioning.make_mesh((2, 2, 2))
    part = partitioning.Partitioner(mesh, partitioning.logical_axis_rules(), CONFIG)
    state = step_lib.init_state(part, CONFIG, optim.make_optimizer(1e-3), seed=1)
    host_params = jax.device_get(state.params)

    sharded = evaluation.decode_texts(CONFIG, state.params, eval_set, 6, max_decode_len=6,
                                      mesh=mesh, axis_rules=part.rules)
    single = evaluation.decode_texts(CONFIG, host_params, eval_set, 6, max_decode_len=6)
    assert sharded == single
    assert len(set(single)) > 1  # a random model still decodes different rows differently
