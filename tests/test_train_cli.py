"""The train / eval / infer CLIs end to end on the quickstart config, and their clear errors."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import gin
from sbs_jax.cli import eval as eval_cli
from sbs_jax.cli import infer as infer_cli
from sbs_jax.cli import train as train_cli
from sbs_jax.runtime import gin_utils
from sbs_jax.train import checkpoint_steps

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every console line of the CLIs starts with its local time.
STAMPED = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S")

QUICK = ["--gin_file=gin/quickstart.gin", "--gin.TRAIN_STEPS=12", "--gin.EVAL_PERIOD=6",
         "--gin.CHECKPOINT_PERIOD=6", "--gin_bindings=RunConfig.warmup_steps=2",
         "--gin_bindings=RunConfig.eval_max_examples=16",
         "--gin_bindings=RunConfig.log_period=3"]


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    """Environment of CLI subprocesses: 8 CPU devices, a private synthetic data folder."""
    env = dict(os.environ)
    env["SBS_DATA_DIR"] = str(tmp_path_factory.mktemp("sbs_data"))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    # Runs of one test compile the same programs: a shared persistent cache saves the repeats.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def run_cli(module, args, env, timeout=420):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory, cli_env):
    model_dir = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_cli("sbs_jax.train", [*QUICK, f"--gin.MODEL_DIR='{model_dir}'"], cli_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return model_dir, proc.stdout


def test_quickstart_trains_evaluates_checkpoints_and_logs(quickstart_dir):
    model_dir, stdout = quickstart_dir
    summary = json.loads((model_dir / "run_summary.json").read_text())
    assert summary["step"] == 12 and summary["mesh"] == {"data": 8, "fsdp": 1, "model": 1}
    assert set(summary["eval_metrics"]) >= {"accuracy", "num_examples"}
    assert summary["eval_metrics"]["num_examples"] == 16
    assert checkpoint_steps.all_steps(str(model_dir)) == [6, 12]
    assert checkpoint_steps.step_metrics(str(model_dir), 12)["num_examples"] == 16
    saved = json.loads((model_dir / "run_config.json").read_text())
    assert saved["train_steps"] == 12 and saved["rationale_mixture_name"] == "synthetic_rationale"
    assert "RunConfig.alpha = %ALPHA" in (model_dir / "config.gin").read_text()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(model_dir))
    lines = stdout.splitlines()
    assert lines and all(STAMPED.match(line) for line in lines), lines
    progress = [line for line in lines if " step " in line and "| loss " in line]
    assert len(progress) == 4 and all("tok/s" in p and "ETA" in p for p in progress)
    losses = [float(p.split("| loss ")[1].split(" ")[0]) for p in progress]
    assert losses[-1] < losses[0]
    assert "rationale" in progress[0]
    # The first step compiles: reported apart, left out of tokens/s, summed in the summary.
    assert "| compile " in progress[0] and summary["compiles"] >= 1
    assert summary["compile_s"] >= float(progress[0].split("| compile ")[1].split("s")[0]) - 0.05
    assert summary["tokens_per_s"] > 0 and summary["eval_compile_s"] > 0
    evals = [line for line in lines if " eval step " in line]
    assert [e.split(" eval step ")[1].split(":")[0] for e in evals] == ["6 (valid)", "12 (valid)"]
    accuracy = float(evals[-1].split("accuracy ")[1].split("%")[0])
    assert accuracy == pytest.approx(summary["eval_metrics"]["accuracy"], abs=0.01)
    assert "num_examples 16" in evals[-1]
    assert sum("decoding synthetic_label_gt: 16 examples" in line for line in lines) == 2


def test_eval_and_infer_read_the_run(quickstart_dir, cli_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SBS_DATA_DIR", cli_env["SBS_DATA_DIR"])
    model_dir, _ = quickstart_dir
    flags = [*QUICK, f"--gin.MODEL_DIR='{model_dir}'", "--split=test", "--max_examples=8"]
    metrics_path = tmp_path / "metrics.json"
    assert eval_cli.main([*flags, "--step=latest", f"--output={metrics_path}"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["step"] == 12 and metrics["split"] == "test" and metrics["num_examples"] == 8
    assert 0.0 <= metrics["accuracy"] <= 100.0
    out = capsys.readouterr().out.splitlines()
    assert out and all(STAMPED.match(line) for line in out), out
    assert any(line.endswith(f"eval step 12 (test): accuracy {metrics['accuracy']:.2f}%, "
                             "num_examples 8") for line in out), out
    preds = tmp_path / "preds.jsonl"
    assert infer_cli.main([*flags, f"--output={preds}", "--output_rationale"]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    assert all(r["input"].startswith("predict: ") for r in rows)
    assert all(set(r) == {"id", "input", "target", "prediction", "answer", "rationale"}
               for r in rows)
    assert "8 predictions (step 12)" in capsys.readouterr().out
    # Params and rows are sharded over the run's mesh: other meshes decode the same.
    for mesh, name in (("(2, 2, 2)", "mesh.jsonl"), ("(4, 1, 2)", "model.jsonl")):
        assert infer_cli.main([*flags, f"--gin.MESH_SHAPE={mesh}", "--batch_size=6",
                               f"--output={tmp_path / name}"]) == 0
    on_2x2x2, on_4x1x2 = ([json.loads(line)["prediction"] for line in (tmp_path / name).open()]
                       for name in ("mesh.jsonl", "model.jsonl"))
    assert on_2x2x2 == on_4x1x2 == [r["prediction"] for r in rows]


@pytest.mark.parametrize("module", ["sbs_jax.train", "sbs_jax.eval", "sbs_jax.infer"])
def test_help_lists_the_gin_flags(module, cli_env):
    proc = run_cli(module, ["--help"], cli_env, timeout=120)
    assert proc.returncode == 0 and "--gin_file" in proc.stdout


def _main_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_gin_mistakes_are_named(capsys, tmp_path):
    model_dir = f"--gin.MODEL_DIR='{tmp_path}'"
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin", model_dir, "--gin.TRAIN_STEP=5"])
    assert "--gin.TRAIN_STEP" in err and "TRAIN_STEPS" in err
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin", model_dir,
                               "--gin_bindings=RunConfig.learning_rat = 0.1"])
    assert "learning_rat" in err
    err = _main_error(capsys, ["--gin_file=gin/nope.gin", model_dir])
    assert "gin/nope.gin" in err and "not found" in err
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin"])
    assert "MODEL_DIR" in err
    # A string whose quotes the shell removed: the message shows the quoting that works.
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={tmp_path}"])
    assert "--gin.MODEL_DIR=\"'" + str(tmp_path) + "'\"" in err
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin", "--gin.MODEL_DIR=gs://b/run"])
    assert "--gin.MODEL_DIR=\"'gs://b/run'\"" in err
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin",
                               f"--gin_bindings=MODEL_DIR = {tmp_path}"])
    assert "--gin_bindings=\"MODEL_DIR = '" + str(tmp_path) + "'\"" in err
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin", model_dir,
                               "--gin.MESH_SHAPE=(1, 2"])
    assert "--gin.MESH_SHAPE = (1, 2" in err and "quote" not in err


def test_a_gin_shorthand_without_a_value_is_one_line(capsys, tmp_path):
    """The last flag `--gin.TRAIN_STEPS` with no value: exit 2 naming it, as eval and infer do."""
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR='{tmp_path}'",
                               "--gin.TRAIN_STEPS"])
    assert err == ("sbs-train: error: --gin.TRAIN_STEPS has no value; write "
                   "--gin.TRAIN_STEPS=VALUE\n")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("binding, message", [
    ("BATCH_SIZE='thirty-two'", "BATCH_SIZE='thirty-two' must be an integer"),
    ("TRAIN_STEPS=40.5", "TRAIN_STEPS=40.5 must be an integer"),
    ("LEARNING_RATE='fast'", "LEARNING_RATE='fast' must be a number"),
    ("LEARNING_RATE=-1", "LEARNING_RATE=-1 must be positive"),
    ("LEARNING_RATE=0", "LEARNING_RATE=0 must be positive"),
    ("MESH_SHAPE='data'", "MESH_SHAPE='data' must be 3 integers (data, fsdp, model)"),
    ("MESH_SHAPE=(-1, -1, 2)", "MESH_SHAPE=(-1, -1, 2) must be 3 integers"),
    ("FSDP=1", "FSDP=1 must be True or False"),
    ("RunConfig.optimizer='sgd'", "RunConfig.optimizer='sgd' must be one of ('adamw', "),
    ("RunConfig.log_period=0", "RunConfig.log_period=0 must be positive"),
    ("RunConfig.clip_norm=1e999", "RunConfig.clip_norm=inf must be a finite number"),
])
def test_settings_are_type_and_range_checked(capsys, tmp_path, binding, message):
    err = _main_error(capsys, ["--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR='{tmp_path}'",
                               f"--gin_bindings={binding}"])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sbs-train: error: {message}"), err
    assert not os.listdir(tmp_path)


def test_a_model_dir_that_cannot_be_a_folder_is_one_line(capsys, tmp_path):
    file = tmp_path / "file"
    file.write_text("not a folder")
    for model_dir, problem in ((file, "is a file, not a folder"),
                               (file / "run", "cannot be written (Not a directory)")):
        err = _main_error(capsys, ["--gin_file=gin/quickstart.gin",
                                   f"--gin.MODEL_DIR='{model_dir}'"])
        assert err.strip() == f"sbs-train: error: MODEL_DIR={model_dir} {problem}"


def test_setup_errors_name_the_setting(capsys, tmp_path, quickstart_dir, cli_env, monkeypatch):
    monkeypatch.setenv("SBS_DATA_DIR", cli_env["SBS_DATA_DIR"])
    fresh = f"--gin.MODEL_DIR='{tmp_path / 'fresh'}'"
    err = _main_error(capsys, [*QUICK, fresh, "--gin.MIXTURE_OR_TASK_NAME='synthetic_lable_gt'"])
    assert "MIXTURE_OR_TASK_NAME='synthetic_lable_gt'" in err and "synthetic_label_gt" in err
    err = _main_error(capsys, [*QUICK, fresh, "--gin.BATCH_SIZE=12"])
    assert "BATCH_SIZE=12" in err and "data x fsdp = 8" in err
    model_dir, _ = quickstart_dir
    err = _main_error(capsys, [*QUICK, f"--gin.MODEL_DIR='{model_dir}'", "--gin.ALPHA=0.3"])
    assert "ALPHA: saved 0.5, now 0.3" in err and str(model_dir) in err
    assert not (tmp_path / "fresh" / "checkpoints").exists()


def test_splits_the_run_reads_are_checked_before_step_1(toy_dir, tmp_path, capsys):
    """Teacher output with a train split only: refused at start-up, naming the task, split and
    folder, instead of crashing at the first evaluation with nothing saved."""
    from sbs_jax.data import records, synthetic

    folder = toy_dir / "svamp"
    records.write_split(synthetic.generate(16, seed=0, split="train"), str(folder), "train")
    records.write_info(str(folder), "svamp")
    model_dir = tmp_path / "run"
    argv = [*QUICK, f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.MIXTURE_OR_TASK_NAME='svamp_label_gt'",
            "--gin.RATIONALE_MIXTURE_NAME='svamp_rationale'"]
    err = _main_error(capsys, argv)
    assert ("MIXTURE_OR_TASK_NAME='svamp_label_gt': split 'valid' (evaluated every "
            "EVAL_PERIOD=6 steps)") in err and str(folder) in err
    assert not (model_dir / "checkpoints").exists()
    assert capsys.readouterr().out == ""  # no step ran
    # An empty split is refused too; with test_every_eval, so is a missing test split.
    records.write_shard([], str(folder), "valid", 0)
    records.write_info(str(folder), "svamp")
    err = _main_error(capsys, argv)
    assert "task 'svamp_label_gt' has no examples in split 'valid'" in err
    records.write_split(synthetic.generate(4, seed=0, split="valid"), str(folder), "valid")
    records.write_info(str(folder), "svamp")
    err = _main_error(capsys, [*argv, "--gin_bindings=RunConfig.test_every_eval=True"])
    assert "split 'test'" in err and "no 'test' record shards" in err
    assert not (model_dir / "checkpoints").exists()


def test_shorthand_flags_become_bindings():
    rest, bindings = gin_utils.split_gin_shorthand(
        ["--gin.MODEL_DIR='/x'", "--split=test", "--gin.TRAIN_STEPS", "7"])
    assert rest == ["--split=test"]
    assert bindings == ["MODEL_DIR = '/x'", "TRAIN_STEPS = 7"]
    np.testing.assert_equal(gin_utils.REPO_ROOT, str(REPO_ROOT))


def test_gin_files_may_bind_the_task_data_folder():
    gin_utils.parse_gin(["gin/quickstart.gin"],
                        ["tasks.data_config.data_dir = '/data/sbs'", "TRAIN_STEPS = 7"])
    from tasks import config as task_config

    assert task_config.data_dir() == "/data/sbs"
    assert gin.query_parameter("%TRAIN_STEPS") == 7


@pytest.mark.parametrize("size", ["small", "base", "large", "xl", "xxl"])
def test_sbs_configs_hold_the_papers_recipe(size, tmp_path):
    from sbs_jax.train import run_config

    gin_utils.parse_gin([f"gin/sbs_{size}.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    cfg = run_config.from_gin()
    assert cfg.model_name == f"t5_1_1_{size}"
    assert (cfg.optimizer, cfg.schedule, cfg.learning_rate, cfg.warmup_steps) == (
        "adamw", "linear", 5e-5, 0)
    assert (cfg.weight_decay, cfg.clip_norm, cfg.alpha, cfg.max_decode_len) == (0.0, 1.0, 0.5, 63)
    assert cfg.task_feature_lengths == {"inputs": 1024, "targets": 256}
    assert cfg.rationale_mixture_name.endswith("_rationale_mixture")
    want = (32, 4000) if size == "xxl" else (64, 10000)
    assert (cfg.batch_size, cfg.train_steps) == want
    assert cfg.eval_period == 250
    assert cfg.mesh_shape == ((1, -1, 1) if size in ("xl", "xxl") else (-1, 1, 1))


@pytest.mark.parametrize("size, remat, microbatches", [
    ("base", "minimal", 1), ("large", "minimal", 4), ("xl", "minimal", 1), ("xxl", "full", 1)])
def test_accelerator_configs_compute_in_bf16_with_their_sized_settings(size, remat,
                                                                       microbatches, tmp_path):
    """base and up: bf16 compute, scanned layers, and the remat / micro-batches that
    benchmarks/memory.py sized them with; float32 compute is one macro away."""
    from sbs_jax.train import run_config

    gin_utils.parse_gin([f"gin/sbs_{size}.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    cfg = run_config.from_gin()
    assert cfg.model_overrides == {"dtype": "bfloat16", "scan_layers": True,
                                   "remat_policy": remat}
    assert cfg.num_microbatches == microbatches
    gin_utils.parse_gin([f"gin/sbs_{size}.gin"], [f"MODEL_DIR = '{tmp_path}'"],
                        shorthand_bindings=["ACTIVATION_DTYPE = 'float32'"])
    assert run_config.from_gin().model_overrides["dtype"] == "float32"
    gin_utils.parse_gin(["gin/sbs_small.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    assert run_config.from_gin().model_overrides == {}


def test_overlay_configs_switch_mode_and_optimizer(tmp_path):
    from sbs_jax.train import run_config

    gin_utils.parse_gin(["gin/sbs_base.gin", "gin/standard_distill.gin", "gin/adafactor.gin",
                         "gin/partitioning/data_model_2d.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    cfg = run_config.from_gin()
    assert cfg.rationale_mixture_name is None and cfg.alpha == 1.0
    assert cfg.mixture_or_task_name.endswith("_standard_llm")
    assert (cfg.optimizer, cfg.schedule, cfg.clip_norm) == ("adafactor", "rsqrt_decay", None)
    assert cfg.mesh_shape == (-1, 1, 4) and cfg.fsdp is False
