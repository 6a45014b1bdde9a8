"""infer/eval on a trained tiny run: --input_file (JSONL, plain text, bad records), and a run
whose newest step was half deleted still evaluates, infers and resumes from the step before."""

import dataclasses
import json
import shutil

import pytest
from conftest import tiny_run_config

from sbs_jax.cli import eval as eval_cli
from sbs_jax.cli import infer as infer_cli
from sbs_jax.infer import evaluation, inputs
from sbs_jax.train import checkpoint_steps, checkpoints, loop, run_config


# A one-layer model keeps compiles short; batch 8 fits the default 8-device data mesh.
def _config(model_dir) -> run_config.RunConfig:
    """The tiny run, evaluated every 2 steps (8 examples, 8 tokens), saving asynchronously."""
    return tiny_run_config(model_dir, eval_period=2, eval_max_examples=8, eval_batch_size=8,
                           max_decode_len=8, log_period=2, async_checkpointing=True)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 4-step run with checkpoints 2 and 4 (both with eval metrics)."""
    with pytest.MonkeyPatch.context() as patch:
        # The same data folder as tests/test_train_loop.py: the synthetic data is made once.
        patch.setenv("SBS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "trainer_data"))
        model_dir = tmp_path_factory.mktemp("infer") / "run"
        loop.train(_config(model_dir))
        assert checkpoint_steps.all_steps(str(model_dir)) == [2, 4]
        yield model_dir


def _flags(model_dir):
    return ["--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 64}", "--batch_size=8",
            "--gin_bindings=RunConfig.max_decode_len=8"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plain_text_inputs_predict_like_the_task_split(trained_run, tmp_path, capsys):
    split_preds = tmp_path / "split.jsonl"
    assert infer_cli.main([*_flags(trained_run), "--split=test", "--max_examples=4",
                           f"--output={split_preds}"]) == 0
    split_rows = _rows(split_preds)
    # The same inputs as a text file (record text, no prefix) must be formatted like the task.
    text_file = tmp_path / "inputs.txt"
    text_file.write_text("\n".join(r["input"].removeprefix("predict: ") for r in split_rows)
                         + "\n\n")
    text_preds = tmp_path / "text.jsonl"
    assert infer_cli.main([*_flags(trained_run), f"--input_file={text_file}",
                           f"--output={text_preds}"]) == 0
    text_rows = _rows(text_preds)
    assert [r["id"] for r in text_rows] == ["1", "2", "3", "4"]
    assert [r["input"] for r in text_rows] == [r["input"] for r in split_rows]
    assert [r["prediction"] for r in text_rows] == [r["prediction"] for r in split_rows]
    assert all(set(r) == {"id", "input", "prediction", "answer"} for r in text_rows)
    # a label task's postprocessor leaves predictions as decoded (it round-trips targets only)
    assert [r["answer"] for r in split_rows] == [r["prediction"] for r in split_rows]
    assert "4 predictions (step 4)" in capsys.readouterr().out


def test_jsonl_inputs_keep_ids_order_and_decode_rationales(trained_run, tmp_path, capsys):
    lines = [{"id": "q-b", "input": "1 2 3 + 4 5 6"}, {"input": "7 + 8"},
             {"id": 7, "premise": "A man sleeps.", "hypothesis": "A person rests."}]
    source = tmp_path / "inputs.jsonl"
    source.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n"
                      + json.dumps(lines[2]) + "\n")
    out = tmp_path / "preds.jsonl"
    assert infer_cli.main([*_flags(trained_run), f"--input_file={source}", f"--output={out}",
                           "--output_rationale"]) == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["q-b", "2", "7"]
    assert [r["input"] for r in rows] == ["predict: 1 2 3 + 4 5 6", "predict: 7 + 8",
                                          "predict: A man sleeps.</s>A person rests."]
    # the NLI text is letters, byte pieces in the digits-only synthetic vocabulary: over 32 tokens
    # in both views
    assert [r.pop("truncated", False) for r in rows] == [False, False, True]
    assert [r.pop("rationale_truncated", False) for r in rows] == [False, False, True]
    assert all(set(r) == {"id", "input", "prediction", "answer", "rationale"} for r in rows)
    assert all(isinstance(r["rationale"], str) for r in rows)
    err = capsys.readouterr().err
    assert ("1 of 3 inputs and 1 of 3 rationale inputs are longer than the 32-token input cap"
            in err and "(first: id '7'; first rationale input: id '7')" in err)
    assert 'their lines say "truncated": true and "rationale_truncated": true' in err


def test_rationale_inputs_cut_alone_are_counted_and_marked(trained_run, tmp_path, capsys):
    """The `explain:` prefix can take an input over the cap that its label view fits (here the
    label task has no prefix): the rationale input is counted and its line marked."""
    source = tmp_path / "inputs.txt"
    source.write_text("1 + 2\n" + " ".join(["9"] * 25) + " + 1\n")  # 28 and 37 tokens
    out = tmp_path / "preds.jsonl"
    assert infer_cli.main([*_flags(trained_run), "--gin.MIXTURE_OR_TASK_NAME='synthetic_standard_gt'",
                           f"--input_file={source}", f"--output={out}",
                           "--output_rationale"]) == 0
    rows = _rows(out)
    assert [r["input"].startswith("9 9") for r in rows] == [False, True]
    assert [(r.get("truncated", False), r.get("rationale_truncated", False)) for r in rows] == [
        (False, False), (False, True)]
    captured = capsys.readouterr()
    assert ("warning: 1 of 2 rationale inputs are longer than the 32-token input cap"
            in captured.err and "(first rationale input: id '2')" in captured.err)
    assert 'their lines say "rationale_truncated": true' in captured.err
    assert "2 predictions (step 4) written to" in captured.out
    assert "; 1 rationale inputs truncated to 32 tokens" in captured.out


@pytest.mark.parametrize("content, problem", [
    ('{"input": "1 + 2"}\n{"input": "3 +\n', r"inputs.jsonl:2: not valid JSON"),
    ('{"id": "a", "input": "1"}\n\n{"id": "a", "input": "2"}\n',
     r"inputs.jsonl:3: id 'a' repeats line 1"),
    ('{"text": "1 + 2"}\n', r"inputs.jsonl:1: no 'input' field .*fields: \['text'\]"),
    ('["1 + 2"]\n', r"inputs.jsonl:1: expected a JSON object, got list"),
    ('{"input": ""}\n', r"inputs.jsonl:1: 'input' must be a non-empty string"),
    ('\n\n', r"inputs.jsonl: no inputs"),
    (b'{"input": "1 + 2"}\n{"input": "3 \xff"}\n',
     r"inputs.jsonl:2: not UTF-8 \(byte 0xff at column 14\)"),
])
def test_malformed_input_records_are_named(tmp_path, content, problem):
    source = tmp_path / "inputs.jsonl"
    source.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(inputs.InputFileError, match=problem):
        inputs.read_inputs(str(source))


def test_a_bad_input_file_exits_2_naming_it_and_writes_nothing(trained_run, tmp_path, capsys):
    source = tmp_path / "inputs.jsonl"
    source.write_text('{"input": "1 + 2"}\n{"inputs": "3 + 4"}\n')
    out = tmp_path / "preds.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        infer_cli.main([*_flags(trained_run), f"--input_file={source}", f"--output={out}"])
    assert exit_info.value.code == 2
    assert f"{source}:2: no 'input' field" in capsys.readouterr().err
    assert not out.exists()


def _half_delete(model_dir, step):
    """What an interrupted keep-last-K deletion left behind in the quickstart: the step folder
    with only its own files (`_CHECKPOINT_METADATA`, checksums, `commit_success.txt`)."""
    step_dir = model_dir / "checkpoints" / str(step)
    for item in step_dir.iterdir():
        if item.is_dir():
            shutil.rmtree(item)
    assert sorted(p.name for p in step_dir.iterdir()) == ["_CHECKPOINT_METADATA",
                                                           "checksums.json", "commit_success.txt"]


def test_a_half_deleted_step_is_skipped_by_eval_infer_and_resume(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _half_delete(run, 4)
    assert evaluation.choose_step(str(run), "best", "accuracy") == 2
    assert evaluation.choose_step(str(run), "latest") == 2
    metrics_path = tmp_path / "metrics.json"
    assert eval_cli.main([*_flags(run), "--split=test", "--max_examples=8",
                          f"--output={metrics_path}"]) == 0
    assert json.loads(metrics_path.read_text())["step"] == 2
    source = tmp_path / "inputs.txt"
    source.write_text("1 + 2\n")
    assert infer_cli.main([*_flags(run), f"--input_file={source}",
                           f"--output={tmp_path / 'preds.jsonl'}"]) == 0
    captured = capsys.readouterr()
    assert "1 predictions (step 2)" in captured.out
    assert captured.err.count(f"skipping incomplete checkpoint {run}/checkpoints/4") == 1
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([*_flags(run), "--step=4", f"--output={tmp_path / 'step4.json'}"])
    assert exit_info.value.code == 2
    assert (f"checkpoint step 4 in {run}/checkpoints/4 is incomplete: params, opt_state, data "
            "missing") in capsys.readouterr().err
    # Resuming trains steps 3 and 4 again from step 2 and saves step 4 anew (no eval: faster).
    summary = loop.train(dataclasses.replace(_config(run), eval_period=0))
    assert summary["resumed_from"] == 2 and summary["step"] == 4
    assert checkpoint_steps.all_steps(str(run)) == [2, 4]
    assert checkpoint_steps.incomplete_steps(str(run)) == {}
    assert set(checkpoints.load_params(str(run), 4)) == set(checkpoints.load_params(str(run), 2))
