"""A MODEL_DIR describes its run: `--model_dir DIR` alone drives eval, infer and convert in a
fresh shell (no gin file, no SBS_* variables, another working directory), another vocabulary is
refused naming both, INITIAL_CHECKPOINT_PATH brings its vocabulary and is checked for shape."""

import hashlib
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import fresh_env, tiny_run_config

from sbs_jax.cli import convert as convert_cli
from sbs_jax.cli import eval as eval_cli
from sbs_jax.cli import infer as infer_cli
from sbs_jax.data.vocab import train_vocab
from sbs_jax.infer.inputs import input_set
from sbs_jax.train import convert, loop, run_config, run_files

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LONG_INPUT = " ".join(["9"] * 60) + " + 1"  # over the 32-token input cap


def _config(model_dir, **overrides) -> run_config.RunConfig:
    """The tiny synthetic run: 2 steps, decodes of 8 tokens."""
    return tiny_run_config(model_dir, **{"train_steps": 2, "eval_batch_size": 8,
                                        "max_decode_len": 8, **overrides})


def _sha(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # The same data folder as tests/test_train_loop.py: the synthetic data is made once.
    return tmp_path_factory.getbasetemp() / "trainer_data"


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory) -> str:
    """A vocabulary that is not the run's (a stale cache, a wrong SBS_VOCAB)."""
    prefix = tmp_path_factory.mktemp("other_vocab") / "other"
    return train_vocab(["a different corpus entirely"] * 40, str(prefix), vocab_size=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    """A 2-step run trained with SBS_DATA_DIR set (the vocabulary is the data folder's)."""
    model_dir = tmp_path_factory.mktemp("model_dir") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SBS_DATA_DIR", str(data_dir))
        patch.delenv("SBS_VOCAB", raising=False)
        loop.train(_config(model_dir))
    return model_dir


def _stale_copy(run_dir, data_dir, other_vocab, work) -> pathlib.Path:
    """The run as if trained on a data folder whose default spiece.model was replaced since:
    a copy of the run pointing at a copy of the data holding another vocabulary."""
    shutil.copytree(data_dir / "synthetic", work / "data" / "synthetic")
    shutil.copyfile(other_vocab, work / "data" / "spiece.model")
    shutil.copytree(run_dir, work / "run")
    record = json.loads((work / "run" / run_files.DATA_CONFIG_FILE).read_text())
    record["data_dir"] = str(work / "data")
    (work / "run" / run_files.DATA_CONFIG_FILE).write_text(json.dumps(record))
    return work / "run"


@pytest.fixture(scope="module")
def fresh_shell(run_dir, data_dir, tmp_path_factory, other_vocab):
    """eval, infer and convert --model_dir of the stale copy run at once, each in a fresh
    environment; returns (work folder, the copy, {command: (exit code, stdout, stderr)})."""
    work = tmp_path_factory.mktemp("fresh_shell")
    env = fresh_env(work)
    run_dir = _stale_copy(run_dir, data_dir, other_vocab, work)
    inputs = work / "questions.jsonl"
    # U+2028 inside a JSON string is text, not a line break.
    inputs.write_text(json.dumps({"id": "q1", "input": "1 2 + 3\u2028"}, ensure_ascii=False)
                      + "\n" + json.dumps({"id": "q2", "input": LONG_INPUT}) + "\n")
    commands = {
        "eval": ["sbs_jax.eval", f"--model_dir={run_dir}", "--split=test",
                 "--max_examples=8"],
        "infer": ["sbs_jax.infer", "--model_dir", str(run_dir), "--input_file", str(inputs),
                  "--output", str(work / "preds.jsonl")],
        "convert": ["sbs_jax.convert", "--to=hf", "--model_dir", str(run_dir), "--hf_dir",
                    str(work / "hf")],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *argv], cwd=work, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = (proc.returncode, out, err)
    return work, run_dir, results


def test_a_run_pins_its_vocabulary_data_folder_and_settings(run_dir, data_dir):
    pinned = json.loads((run_dir / run_files.DATA_CONFIG_FILE).read_text())
    source = data_dir / "spiece.model"
    assert pinned["data_dir"] == str(data_dir)
    assert pinned["vocabulary"] == {"file": "spiece.model", "sha256": _sha(source),
                                    "source": str(source)}
    assert _sha(run_dir / "spiece.model") == _sha(source)
    assert stat.S_IMODE((run_dir / "spiece.model").stat().st_mode) == 0o644
    saved = json.loads((run_dir / run_config.CONFIG_FILE).read_text())
    assert saved["mixture_or_task_name"] == "synthetic_label_gt"
    assert json.loads((run_dir / "model_config.json").read_text())["emb_dim"] == 16
    summary = json.loads((run_dir / loop.SUMMARY_FILE).read_text())
    assert summary["initialised_from"] is None and summary["resumed_from"] is None


def test_eval_model_dir_in_a_fresh_shell(fresh_shell):
    _, copy, results = fresh_shell
    code, out, err = results["eval"]
    assert code == 0, err[-3000:]
    written = copy / "eval_synthetic_label_gt_test_step2.json"
    metrics = json.loads(written.read_text())
    assert metrics["task"] == "synthetic_label_gt" and metrics["split"] == "test"
    assert metrics["step"] == 2 and metrics["num_examples"] == 8
    assert f"metrics written to {written}" in out


def test_infer_model_dir_in_a_fresh_shell(fresh_shell, run_dir, data_dir, monkeypatch):
    work, _, results = fresh_shell
    code, out, err = results["infer"]
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (work / "preds.jsonl").read_text().split("\n") if line]
    # The training form on the original run predicts the same: the pinned vocabulary was used.
    monkeypatch.setenv("SBS_DATA_DIR", str(data_dir))
    assert infer_cli.main(["--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR='{run_dir}'",
                           f"--input_file={work / 'questions.jsonl'}",
                           "--gin_bindings=RunConfig.max_decode_len = 8",
                           f"--output={work / 'same.jsonl'}"]) == 0
    same = [json.loads(line) for line in (work / "same.jsonl").read_text().split("\n") if line]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in same]
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert rows[0]["input"] == "predict: 1 2 + 3\u2028" and "truncated" not in rows[0]
    assert rows[1]["truncated"] is True
    assert err.count("warning:") == 1
    assert "1 of 2 inputs are longer than the 32-token input cap" in err
    assert "2 predictions (step 2) written to" in out and "1 inputs truncated to 32 tokens" in out


def test_convert_model_dir_in_a_fresh_shell_ships_the_runs_tokenizer(fresh_shell, run_dir,
                                                                      data_dir):
    from transformers import AutoTokenizer

    work, _, results = fresh_shell
    code, _, err = results["convert"]
    assert code == 0, err[-3000:]
    hf_dir = work / "hf"
    assert _sha(hf_dir / "spiece.model") == _sha(run_dir / "spiece.model")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in hf_dir.iterdir()}
    assert modes == dict.fromkeys(
        ["model.safetensors", "config.json", "generation_config.json", "spiece.model",
         "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"], 0o644)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = [("a", "1 2 3 + 4 5 6"), ("b", "7 +  8\nwhat?")]
    from tasks import config as tasks_config

    with tasks_config.overrides_restored():
        tasks_config.set_vocabulary_path(str(run_dir / "spiece.model"))
        tasks_config.set_data_dir(str(data_dir))
        ours = input_set("synthetic_label_gt", texts, 64)
    assert [tokenizer("predict: " + text).input_ids for _, text in texts] == \
        [list(x) for x in ours.inputs]


def test_eval_refuses_another_vocabulary_and_an_existing_output(fresh_shell, other_vocab,
                                                                monkeypatch, capsys):
    _, run_dir, _ = fresh_shell
    monkeypatch.delenv("SBS_DATA_DIR", raising=False)
    monkeypatch.setenv("SBS_VOCAB", other_vocab)
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([f"--model_dir={run_dir}", "--split=test"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(run_dir / "spiece.model") in err and other_vocab in err
    assert _sha(other_vocab)[:12] in err and _sha(run_dir / "spiece.model")[:12] in err
    # The same file under another name is the run's vocabulary.
    monkeypatch.setenv("SBS_VOCAB", str(run_dir / "spiece.model"))
    with pytest.raises(SystemExit) as exit_info:  # the fresh-shell eval wrote step 2's file
        eval_cli.main([f"--model_dir={run_dir}", "--split=test", "--max_examples=8"])
    assert exit_info.value.code == 2
    assert "eval_synthetic_label_gt_test_step2.json exists" in capsys.readouterr().err
    assert eval_cli.main([f"--model_dir={run_dir}", "--split=test", "--max_examples=8",
                          "--overwrite", "--gin.MESH_SHAPE=(2, 2, 2)"]) == 0


def test_eval_refuses_an_existing_output_before_loading(run_dir, tmp_path, monkeypatch, capsys):
    """An existing --output is refused from the flags and the run's files alone: with the
    run's checkpoints gone, the refusal still names the file, which is left as it was."""
    monkeypatch.delenv("SBS_DATA_DIR", raising=False)
    shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    output = tmp_path / "metrics.json"
    output.write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([f"--model_dir={tmp_path / 'run'}", "--split=test", f"--output={output}"])
    assert exit_info.value.code == 2
    assert f"{output} exists (an earlier eval); pass --overwrite" in capsys.readouterr().err
    assert output.read_text() == "{}\n"


def test_gin_file_form_evaluates_the_runs_task(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SBS_DATA_DIR", raising=False)
    output = tmp_path / "metrics.json"
    assert eval_cli.main(["--gin_file=gin/sbs_base.gin", f"--gin.MODEL_DIR='{run_dir}'",
                          "--split=test", "--max_examples=8", f"--output={output}",
                          "--gin_bindings=RunConfig.max_decode_len = 8"]) == 0
    assert json.loads(output.read_text())["task"] == "synthetic_label_gt"
    err = capsys.readouterr().err
    assert ("MIXTURE_OR_TASK_NAME='synthetic_label_gt' from" in err
            and "the gin files say 'esnli_label_mixture'" in err)
    # A command-line binding still chooses another task (no data for it here: exit 2).
    with pytest.raises(SystemExit):
        eval_cli.main(["--gin_file=gin/sbs_base.gin", f"--gin.MODEL_DIR='{run_dir}'",
                       "--gin.MIXTURE_OR_TASK_NAME='cqa_label_gt'",
                       f"--output={tmp_path / 'cqa.json'}"])
    assert "'cqa'" in capsys.readouterr().err


def test_convert_refuses_a_non_empty_folder_and_another_vocabulary(run_dir, tmp_path,
                                                                   other_vocab, capsys):
    target = tmp_path / "hf"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    argv = ["--to=hf", f"--model_dir={run_dir}", f"--hf_dir={target}"]
    assert convert_cli.main(argv) == 2
    assert f"--hf_dir {target} is not empty; pass --overwrite" in capsys.readouterr().err
    assert convert_cli.main([*argv, f"--vocab={other_vocab}", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert other_vocab in err and str(run_dir / "spiece.model") in err
    assert convert_cli.main([*argv, "--overwrite"]) == 0
    assert (target / "tokenizer.json").exists() and (target / "notes.txt").exists()


def test_hf_initial_checkpoint_brings_its_vocabulary(tmp_path, data_dir, tiny_vocab_path,
                                                     other_vocab, monkeypatch, capsys):
    fixtures = pytest.importorskip("hf_t5_fixtures")
    hf_dir = tmp_path / "t5-v1_1"
    fixtures.make_hf_dir("v1_1", hf_dir, vocab_size=640)
    (hf_dir / "spiece.model").write_bytes(pathlib.Path(tiny_vocab_path).read_bytes())
    monkeypatch.setenv("SBS_DATA_DIR", str(data_dir))  # whose own vocabulary differs
    cfg = _config(tmp_path / "run", initial_checkpoint_path=str(hf_dir), train_steps=1,
                  checkpoint_period=1, model_overrides={"dropout_rate": 0.0})
    summary = loop.train(cfg)
    assert _sha(tmp_path / "run" / "spiece.model") == _sha(tiny_vocab_path)
    assert summary["initialised_from"] == {
        "path": str(hf_dir), "format": "HF", "step": None,
        "vocabulary": str(hf_dir / "spiece.model"), "vocabulary_from": "checkpoint"}
    out = capsys.readouterr().out
    assert f"initialised from {hf_dir} (HF)" in out and "has no spiece.model" not in out
    # A vocabulary named that differs from the folder's is refused, naming both.
    monkeypatch.setenv("SBS_VOCAB", other_vocab)
    with pytest.raises(loop.SetupError) as error:
        loop.train(_config(tmp_path / "other", initial_checkpoint_path=str(hf_dir),
                           model_overrides={}))
    assert str(hf_dir / "spiece.model") in str(error.value) and other_vocab in str(error.value)


def test_hf_initial_checkpoint_without_a_vocabulary_says_which_it_uses(tmp_path, data_dir,
                                                                        monkeypatch, capsys):
    fixtures = pytest.importorskip("hf_t5_fixtures")
    hf_dir = tmp_path / "t5-without-spiece"
    fixtures.make_hf_dir("v1_1", hf_dir, vocab_size=640)
    assert not (hf_dir / "spiece.model").exists()
    monkeypatch.setenv("SBS_DATA_DIR", str(data_dir))
    monkeypatch.delenv("SBS_VOCAB", raising=False)
    summary = loop.train(_config(
        tmp_path / "run", initial_checkpoint_path=str(hf_dir), train_steps=1,
        checkpoint_period=1, eval_period=0, model_overrides={"dropout_rate": 0.0}))
    task_vocabulary = str(data_dir / "spiece.model")
    assert summary["initialised_from"] == {
        "path": str(hf_dir), "format": "HF", "step": None, "vocabulary": task_vocabulary,
        "vocabulary_from": "task"}
    lines = [line for line in capsys.readouterr().out.splitlines() if "spiece.model" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"INITIAL_CHECKPOINT_PATH={hf_dir} has no spiece.model: using the task vocabulary "
        f"{task_vocabulary}; it must be the one the checkpoint was trained with")
    assert _sha(tmp_path / "run" / "spiece.model") == _sha(task_vocabulary)


def test_a_checkpoint_of_another_shape_names_tensor_shapes_and_model_gin(tmp_path, run_dir,
                                                                         data_dir, monkeypatch):
    fixtures = pytest.importorskip("hf_t5_fixtures")
    fixtures.make_hf_dir("v1_1", tmp_path / "hf", vocab_size=640)
    convert.import_from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    env = {**os.environ, "SBS_DATA_DIR": str(data_dir)}
    env.pop("SBS_VOCAB", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sbs_jax.train", "--gin_file=gin/quickstart.gin",
         f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
         f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'ours'}'"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert ("tensor decoder/decoder_norm/scale is (32,) in the checkpoint but (64,) in the "
            "model (RunConfig.model_name='t5_1_1_tiny'") in proc.stderr
    assert "the checkpoint has the sizes of gin/models/flan_t5_tiny.gin or " \
           "gin/models/t5_1_1_tiny.gin" in proc.stderr
    # Our MODEL_DIR as a start: sizes of no shipped config give the overrides to bind.
    monkeypatch.setenv("SBS_DATA_DIR", str(data_dir))
    with pytest.raises(loop.SetupError, match=r"bind RunConfig.model_overrides=\{'emb_dim"
                       r"': 16, 'num_heads': 2"):
        loop.train(_config(tmp_path / "run2", initial_checkpoint_path=str(run_dir),
                           model_overrides={}))


def test_a_restart_with_another_vocabulary_is_refused(run_dir, other_vocab, data_dir, tmp_path,
                                                      monkeypatch):
    run_dir = shutil.copytree(run_dir, tmp_path / "run")
    monkeypatch.setenv("SBS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("SBS_VOCAB", other_vocab)
    with pytest.raises(loop.SetupError) as error:
        loop.train(_config(run_dir, train_steps=4))
    assert f"MODEL_DIR={run_dir} was trained with {run_dir / 'spiece.model'}" in str(error.value)
    assert other_vocab in str(error.value)
    # Without it the run resumes on its own copy, and the record keeps where it came from.
    monkeypatch.delenv("SBS_VOCAB")
    record = (run_dir / run_files.DATA_CONFIG_FILE).read_text()
    assert loop.train(_config(run_dir))["resumed_from"] == 2
    assert (run_dir / run_files.DATA_CONFIG_FILE).read_text() == record
