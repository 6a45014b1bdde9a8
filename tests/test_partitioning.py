"""Mesh construction, T5X logical axis rules and sharded == single-device logits."""

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from sbs_jax.models import T5, abstract_params, get_config, init_params
from sbs_jax.train import partitioning


def test_make_mesh_fills_in_the_remaining_devices():
    assert len(jax.devices()) == 8
    assert partitioning.make_mesh().devices.shape == (8, 1, 1)
    mesh = partitioning.make_mesh((2, -1, 2))
    assert mesh.devices.shape == (2, 2, 2) and mesh.axis_names == partitioning.MESH_AXES


def test_make_mesh_refuses_shapes_the_devices_do_not_fill():
    with pytest.raises(ValueError, match="MESH_SHAPE"):
        partitioning.make_mesh((3, -1, 1))
    with pytest.raises(ValueError, match="MESH_SHAPE"):
        partitioning.make_mesh((2, 2, 1))
    with pytest.raises(ValueError, match="MESH_SHAPE"):
        partitioning.make_mesh((8, 1))


def test_rules_on_2x2x2_mesh():
    mesh = partitioning.make_mesh((2, 2, 2))
    config = get_config("t5_1_1_tiny", vocab_size=512)
    shardings = partitioning.params_shardings(abstract_params(config), mesh,
                                              partitioning.logical_axis_rules())
    assert shardings["token_embedder"]["embedding"].spec == P("model", "fsdp")
    layer = shardings["encoder"]["layers_0"]
    assert layer["attention"]["query"]["kernel"].spec == P("fsdp", "model")
    assert layer["attention"]["out"]["kernel"].spec == P("model", "fsdp")
    assert layer["mlp"]["wo"]["kernel"].spec == P("model", "fsdp")
    assert shardings["encoder"]["relpos_bias"]["rel_embedding"].spec == P("model", None)
    no_fsdp = partitioning.params_shardings(abstract_params(config), mesh,
                                            partitioning.logical_axis_rules(fsdp=False))
    assert no_fsdp["decoder"]["logits_dense"]["kernel"].spec == P(None, "model")
    assert partitioning.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    scanned = partitioning.params_shardings(
        abstract_params(get_config("t5_1_1_tiny", vocab_size=512, scan_layers=True)), mesh,
        partitioning.logical_axis_rules())
    assert scanned["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].spec == P(None, "fsdp", "model")


def test_sharded_logits_equal_single_device():
    config = get_config("t5_1_1_tiny", vocab_size=512)
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    enc = rng.integers(2, 512, (8, 12)).astype(np.int32)
    enc[:, 9:] = 0
    dec = rng.integers(2, 512, (8, 6)).astype(np.int32)
    dec[:, 0] = 0
    model = T5(config)
    expected = np.asarray(model.apply({"params": params}, enc, dec))

    mesh = partitioning.make_mesh((4, 1, 2))
    rules = partitioning.logical_axis_rules()
    shardings = partitioning.params_shardings(abstract_params(config), mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    batch = partitioning.batch_sharding(mesh)

    @jax.jit
    def forward(p, e, d):
        with nn.logical_axis_rules(rules):
            return model.apply({"params": p}, e, d)

    with jax.set_mesh(mesh):
        logits = forward(sharded_params, jax.device_put(enc, batch), jax.device_put(dec, batch))
    assert len(logits.sharding.device_set) == 8
    # batch split 4 ways over data, vocab 2 ways over model (the logical constraints hold).
    assert logits.sharding.shard_shape(logits.shape) == (2, 6, 256)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


def test_decoding_with_sharded_params_equals_single_device():
    from sbs_jax.infer import decoding

    config = get_config("t5_1_1_tiny", vocab_size=512)
    params = init_params(config, jax.random.PRNGKey(1))
    enc = np.random.default_rng(1).integers(2, 512, (8, 12)).astype(np.int32)
    expected = np.asarray(decoding.generate(config, params, enc, 6, method="beam"))
    mesh = partitioning.make_mesh((4, 1, 2))
    rules = partitioning.logical_axis_rules()
    sharded = jax.device_put(
        params, partitioning.params_shardings(abstract_params(config), mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = decoding.generate(config, sharded,
                                jax.device_put(enc, partitioning.batch_sharding(mesh)), 6,
                                method="beam")
    np.testing.assert_array_equal(np.asarray(got), expected)
