"""The training loop in-process: standard mode, NaN guard with the last good checkpoint kept."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_run_config

from sbs_jax import models
from sbs_jax.train import (
    checkpoint_steps,
    checkpoints,
    loop,
    partitioning,
    run_config,
    run_setup,
)


@pytest.fixture(autouse=True)
def data_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SBS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "trainer_data"))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    # Warmup from 0 makes update 1 zero; update 2 (lr 5e29) overflows the update norm in fp32 on
    # any backend. The loop must stop at step 2 before saving it, and keep step 1.
    cfg = tiny_run_config(tmp_path, learning_rate=1e30, warmup_steps=2, checkpoint_period=1,
                  clip_norm=None)
    with pytest.raises(loop.NonFiniteLossError) as error:
        loop.train(cfg)
    message = str(error.value)
    assert "update_norm is inf at step 2" in message
    assert "last good checkpoint (step 1)" in message
    assert checkpoint_steps.all_steps(str(tmp_path)) == [1]
    params = checkpoints.load_params(str(tmp_path), 1)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert not (tmp_path / loop.SUMMARY_FILE).exists()


def test_a_non_finite_first_update_saves_nothing(tmp_path):
    # Without warmup or clipping, update 1 at lr 1e30 overflows the update norm in fp32.
    cfg = tiny_run_config(tmp_path, learning_rate=1e30, checkpoint_period=1, clip_norm=None)
    with pytest.raises(loop.NonFiniteLossError,
                       match="update_norm is inf at step 1; .*No checkpoint was saved"):
        loop.train(cfg)
    assert checkpoint_steps.all_steps(str(tmp_path)) == []


def test_a_nan_after_a_restore_names_the_restored_step_not_the_learning_rate(tmp_path):
    loop.train(tiny_run_config(tmp_path, train_steps=2))
    # Step 2 rewritten with finite, checksummed parameters that overflow the next forward pass:
    # damage no checksum can see (written so, or saved without checksums).
    cfg = tiny_run_config(tmp_path, train_steps=4)
    model_config = models.config_from_json((tmp_path / "model_config.json").read_text(), "")
    part = partitioning.Partitioner(partitioning.make_mesh(cfg.mesh_shape),
                                    partitioning.logical_axis_rules(cfg.fsdp), model_config)
    reader = checkpoints.Checkpointer(str(tmp_path))
    params, opt_state, data = reader.restore(2, part.abstract_params,
                                             part.abstract_opt_state(run_setup.optimizer(cfg)[0]))
    reader.close()
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    writer = checkpoints.Checkpointer(str(tmp_path), async_save=False)
    writer.save(2, jax.tree.map(lambda x: x * 1e30, params), opt_state, data)
    writer.close()
    with pytest.raises(loop.NonFiniteLossError) as error:
        loop.train(cfg)
    message = str(error.value)
    assert "at step 3; stopping. Step 2 was restored from " in message
    assert f"{tmp_path / 'checkpoints' / '2'}, which may be damaged" in message
    assert "LEARNING_RATE" not in message and "good" not in message


def test_standard_mode_trains_labels_only_and_evaluates(tmp_path):
    cfg = tiny_run_config(tmp_path, mixture_or_task_name="synthetic_standard_gt",
                  rationale_mixture_name=None, alpha=1.0, eval_period=2, eval_max_examples=8,
                  eval_batch_size=8, max_decode_len=12, test_every_eval=True)
    summary = loop.train(cfg)
    assert summary["step"] == 4
    assert "rationale_loss" not in summary["final_train_metrics"]
    assert summary["eval_metrics"]["num_examples"] == 8
    # Each eval also scored the whole test split; only valid picks the best checkpoint.
    history_file = tmp_path / run_config.EVAL_HISTORY_FILE
    history = [json.loads(line) for line in history_file.read_text().splitlines()]
    assert [(h["step"], h["split"], h["num_examples"]) for h in history] == [
        (2, "valid", 8), (2, "test", 500), (4, "valid", 8), (4, "test", 500)]
    assert history[2] == {"step": 4, "split": "valid", **summary["eval_metrics"]}
    valid = {h["step"]: h["accuracy"] for h in history if h["split"] == "valid"}
    assert valid[summary["best_step"]] == max(valid.values())
    saved = json.loads((tmp_path / loop.SUMMARY_FILE).read_text())
    assert saved["final_train_metrics"]["label_loss"] == pytest.approx(
        summary["final_train_metrics"]["label_loss"])
    model_config = json.loads((tmp_path / "model_config.json").read_text())
    assert model_config["emb_dim"] == 16 and model_config["vocab_size"] % 128 == 0
    # Running again with the same settings finds the run finished and changes nothing.
    again = loop.train(cfg)
    assert again["resumed_from"] == 4 and checkpoint_steps.all_steps(str(tmp_path)) == [2, 4]
    assert [json.loads(line) for line in history_file.read_text().splitlines()] == history


@pytest.mark.parametrize("scan_layers", [False, True])
def test_initial_checkpoint_from_a_hf_folder_is_one_setting(tmp_path, scan_layers):
    torch_fixtures = pytest.importorskip("hf_t5_fixtures")
    from sbs_jax.models.hf import load_hf

    hf_dir = tmp_path / "hf"
    torch_fixtures.make_hf_dir("v1_1", hf_dir, vocab_size=1024)
    # Warmup from 0: update 1 is zero, so the saved step-1 parameters are the imported ones
    # (stacked per layer when the run scans its layers, as the shipped accelerator configs do).
    cfg = tiny_run_config(tmp_path / "run", initial_checkpoint_path=str(hf_dir), train_steps=1,
                  warmup_steps=1,
                  model_overrides={"dropout_rate": 0.0, "scan_layers": scan_layers})
    loop.train(cfg)
    _, want = load_hf(str(hf_dir), scan_layers=scan_layers)
    got = checkpoints.load_params(str(tmp_path / "run"), 1)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), b)
    saved = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert saved["emb_dim"] == 32 and saved["vocab_size"] == 1024
    clash = tiny_run_config(tmp_path / "clash", initial_checkpoint_path=str(hf_dir), train_steps=1,
                    model_overrides={"emb_dim": 64})
    with pytest.raises(ValueError, match=r"model_overrides \['emb_dim'\] disagree"):
        loop.train(clash)
