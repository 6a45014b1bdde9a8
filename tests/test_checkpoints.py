"""Orbax checkpoints: round trip across meshes, retention (last K + best), read-only queries."""

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbs_jax.train import checkpoint_steps, checkpoints, checksums


def _mesh(shape):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), ("data", "model"))


def _abstract(tree):
    """The restore target of a tree of arrays: shapes, dtypes and shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def _state(mesh):
    w = jnp.arange(64.0).reshape(8, 8) / 7.0
    params = {
        "w": jax.device_put(w, NamedSharding(mesh, P(None, "model"))),
        "b": jax.device_put(jnp.ones(4), NamedSharding(mesh, P())),
    }
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.sin, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return params, opt_state


def test_round_trip_onto_a_different_mesh_keeps_values_and_data_state(tmp_path):
    params, opt_state = _state(_mesh((2, 4)))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep_last=2)
    ckpt.save(10, params, opt_state, {"position": 10, "shard": [0, 1]})
    ckpt.close()

    other = _mesh((8, 1))
    target_params, target_opt = _state(other)
    reader = checkpoints.Checkpointer(str(tmp_path))
    got_params, got_opt, data = reader.restore(
        10, _abstract(target_params), _abstract(target_opt)
    )
    reader.close()
    assert data == {"position": 10, "shard": [0, 1]}
    assert got_params["w"].sharding.mesh.shape == other.shape
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((got_params, got_opt))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    host = checkpoints.load_params(str(tmp_path))
    assert isinstance(host["w"], np.ndarray)
    np.testing.assert_array_equal(host["w"], np.asarray(params["w"]))


def test_keeps_last_k_plus_best_by_metric(tmp_path):
    params, opt_state = _state(_mesh((1, 1)))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep_last=2, best_metric="accuracy")
    for step, metrics in [(1, None), (2, {"accuracy": 0.9}), (3, None), (4, {"accuracy": 0.4}),
                          (5, None), (6, None)]:
        ckpt.save(step, params, opt_state, {"step": step}, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    ckpt.close()
    assert checkpoint_steps.latest_step(str(tmp_path)) == 6
    assert checkpoint_steps.all_steps(str(tmp_path)) == [2, 5, 6]


def test_latest_step_is_read_only_and_ignores_unfinished_steps(tmp_path):
    missing = tmp_path / "nothing_here"
    assert checkpoint_steps.latest_step(str(missing)) is None
    assert not missing.exists()
    params, opt_state = _state(_mesh((1, 1)))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep_last=3)
    ckpt.save(3, params, opt_state, None)
    ckpt.close()
    # A save killed mid-write leaves an orbax temporary directory behind.
    os.makedirs(tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234" / "params")
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    assert checkpoint_steps.latest_step(str(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    with pytest.raises(FileNotFoundError, match="step 9 not found"):
        checkpoints.load_params(str(tmp_path), step=9)
    with pytest.raises(FileNotFoundError, match="no finalised checkpoint"):
        checkpoints.load_params(str(missing))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_train_state_restores_onto_its_abstract_shardings(tmp_path, optimizer):
    from sbs_jax import models
    from sbs_jax.train import optim, partitioning
    from sbs_jax.train import step as step_lib

    config = models.get_config("t5_1_1_tiny", vocab_size=128)
    part = partitioning.Partitioner(partitioning.make_mesh((2, 2, 2)),
                                    partitioning.logical_axis_rules(), config)
    tx = optim.make_optimizer(optim.make_schedule("constant", 1e-3, 10), name=optimizer)
    state = step_lib.init_state(part, config, tx, seed=1)
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    ckpt.save(1, state.params, state.opt_state, {"position": 64})
    ckpt.close()
    reader = checkpoints.Checkpointer(str(tmp_path))
    params, opt_state, data = reader.restore(1, part.abstract_params, part.abstract_opt_state(tx))
    reader.close()
    assert data == {"position": 64}
    assert jax.tree.structure(opt_state) == jax.tree.structure(state.opt_state)
    for want, got in zip(jax.tree.leaves((state.params, state.opt_state)),
                         jax.tree.leaves((params, opt_state))):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _interrupted_deletion(step_dir, keep_folders=False):
    """The state a kill during orbax's deletion of a step leaves: item folders gone (or, with
    `keep_folders`, emptied of their files) and the step's own two marker files still there."""
    for item in [p for p in step_dir.iterdir() if p.is_dir()]:
        if keep_folders:
            for path in [p for p in item.rglob("*") if p.is_file()]:
                path.unlink()
        else:
            shutil.rmtree(item)


@pytest.mark.parametrize("keep_folders", [False, True])
def test_readers_skip_a_half_deleted_step_and_name_it(tmp_path, capsys, keep_folders):
    params, opt_state = _state(_mesh((1, 1)))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep_last=3, best_metric="accuracy")
    for step, accuracy in [(1, 0.2), (2, 0.5), (3, 0.9)]:
        ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, params), opt_state, {"step": step},
                  metrics={"accuracy": accuracy})
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "3"
    _interrupted_deletion(step_dir, keep_folders)
    assert checkpoint_steps.all_steps(str(tmp_path)) == [1, 2]
    assert checkpoint_steps.latest_step(str(tmp_path)) == 2
    assert checkpoint_steps.best_step(str(tmp_path), "accuracy") == 2
    assert checkpoint_steps.incomplete_steps(str(tmp_path)) == {3: ["params", "opt_state", "data"]}
    np.testing.assert_array_equal(checkpoints.load_params(str(tmp_path))["w"],
                                  2 * np.asarray(params["w"]))
    with pytest.raises(checkpoint_steps.IncompleteCheckpointError,
                       match=rf"step 3 in {step_dir} is incomplete: params, opt_state, data "
                             r"missing .*complete steps: \[1, 2\]"):
        checkpoints.load_params(str(tmp_path), step=3)
    assert capsys.readouterr().err.count(f"skipping incomplete checkpoint {step_dir} ") == 1


def test_a_writer_removes_a_half_deleted_step_and_can_save_it_again(tmp_path):
    params, opt_state = _state(_mesh((1, 1)))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep_last=3)
    for step in (1, 2):
        ckpt.save(step, params, opt_state, {"step": step})
    ckpt.close()
    _interrupted_deletion(tmp_path / "checkpoints" / "2")
    writer = checkpoints.Checkpointer(str(tmp_path), keep_last=3)
    assert not (tmp_path / "checkpoints" / "2").exists()
    assert writer.all_steps() == [1]
    with pytest.raises(FileNotFoundError, match="step 2 not found"):
        writer.restore(2, _abstract(params), _abstract(opt_state))
    writer.save(2, jax.tree.map(lambda x: x + 1, params), opt_state, {"step": 2})
    writer.close()
    assert checkpoint_steps.all_steps(str(tmp_path)) == [1, 2]
    np.testing.assert_array_equal(checkpoints.load_params(str(tmp_path), 2)["b"], np.full(4, 2.0))


def test_close_leaves_no_step_half_deleted(tmp_path):
    params, opt_state = _state(_mesh((1, 1)))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep_last=1, async_save=True)
    for step in range(1, 6):
        ckpt.save(step, params, opt_state, {"step": step})
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]
    assert checkpoint_steps.incomplete_steps(str(tmp_path)) == {}


def _saved_steps(tmp_path, steps=(1, 2, 3), async_save=True):
    """Steps whose params are the base params times the step number."""
    params, opt_state = _state(_mesh((1, 1)))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep_last=5, async_save=async_save)
    for step in steps:
        ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, params), opt_state, {"step": step})
    ckpt.close()
    return params, opt_state


@pytest.mark.parametrize("async_save", [True, False])
def test_each_step_records_the_checksums_of_its_item_files(tmp_path, async_save):
    _saved_steps(tmp_path, (1,), async_save)
    step_dir = tmp_path / "checkpoints" / "1"
    files = json.loads((step_dir / checksums.MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
               if p.is_file() and p.parent != step_dir}
    assert set(files) == on_disk and {name.split("/")[0] for name in files} == {
        "params", "opt_state", "data"}
    for name, digest in files.items():
        data = (step_dir / name).read_bytes()
        assert digest == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _damage(step_dir, kind):
    """Damages the largest array data file of a step's params the way a disk or a person might."""
    target = max((step_dir / "params" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data = target.read_bytes()
    if kind == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif kind == "overwritten":  # same size, other bytes
        middle = len(data) // 2
        target.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8])
                           + data[middle + 8:])
    else:
        target.unlink()
    return str(target.relative_to(step_dir))


@pytest.mark.parametrize("kind", ["truncated", "overwritten", "deleted"])
def test_a_damaged_newest_step_is_skipped_for_the_newest_good_one(tmp_path, capsys, kind):
    params, opt_state = _saved_steps(tmp_path)
    step_dir = tmp_path / "checkpoints" / "3"
    damaged_file = _damage(step_dir, kind)
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoint_steps.latest_step(str(tmp_path)) == 3  # the listing alone: cheap
    assert checkpoint_steps.latest_good_step(str(tmp_path)) == 2
    np.testing.assert_array_equal(checkpoints.load_params(str(tmp_path))["b"], np.full(4, 2.0))
    with pytest.raises(checkpoint_steps.DamagedCheckpointError,
                       match=rf"step 3 in {step_dir} is damaged: {damaged_file} "):
        checkpoints.load_params(str(tmp_path), step=3)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"sbs_jax.train.checkpoint_steps: skipping damaged checkpoint {step_dir}: "
        f"{damaged_file} "), err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # readers
    # A writer moves the step aside, resumes from step 2 and writes step 3 afresh.
    writer = checkpoints.Checkpointer(str(tmp_path), keep_last=5)
    assert writer.all_steps() == [1, 2]
    assert (tmp_path / checkpoint_steps.DAMAGED_SUBDIR / "3" / damaged_file).exists() != (
        kind == "deleted")
    restored, _, data = writer.restore(2, _abstract(params), _abstract(opt_state))
    assert data == {"step": 2}
    np.testing.assert_array_equal(np.asarray(restored["b"]), np.full(4, 2.0))
    writer.save(3, jax.tree.map(lambda x: x * 3, params), opt_state, {"step": 3})
    writer.close()
    np.testing.assert_array_equal(checkpoints.load_params(str(tmp_path))["b"], np.full(4, 3.0))


def test_a_step_saved_without_checksums_loads_with_one_line(tmp_path, capsys):
    _saved_steps(tmp_path, (1,))
    step_dir = tmp_path / "checkpoints" / "1"
    (step_dir / checksums.MANIFEST).unlink()
    capsys.readouterr()
    for _ in range(2):
        np.testing.assert_array_equal(checkpoints.load_params(str(tmp_path))["b"], np.ones(4))
    note = (f"sbs_jax.train.checksums: {step_dir} has no {checksums.MANIFEST} (saved without "
            "checksums); reading it unverified")
    assert capsys.readouterr().err.strip().splitlines() == [note]
