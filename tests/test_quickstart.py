"""The quickstart end to end in a subprocess, reduced (few examples, few steps), as a user runs it."""

import json
import os
import re
import subprocess
import sys

import matplotlib.image
import pytest
from conftest import REPO_ROOT

from sbs_jax.data import records
from sbs_jax.data.vocab import load_vocab
from sbs_jax.experiments import quickstart as quickstart_module

SIZES = {"train": 64, "valid": 16, "test": 32}


def _command(out, num_train=SIZES["train"]):
    return [sys.executable, "-m", "sbs_jax.quickstart", "--output_dir", str(out),
            "--train_steps", "10", "--num_train", str(num_train), "--num_valid",
            str(SIZES["valid"]), "--num_test", str(SIZES["test"]),
            "--gin_bindings", "RunConfig.warmup_steps = 2"]


def _run(command):
    # As a user runs it: the real device count, not the test suite's 8 virtual CPU devices.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=900,
                          cwd=REPO_ROOT, env=env)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    proc = _run(_command(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_stages_and_training_progress_are_shown(quickstart):
    _, stdout = quickstart
    positions = [stdout.index(f"[quickstart {i}/6") for i in range(1, 7)]
    assert positions == sorted(positions)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"  # console.say's local time, on every CLI's lines
    assert len(re.findall(rf"^{stamp} \[quickstart \d/6 ", stdout, re.MULTILINE)) == 6
    assert "[teacher train]" in stdout and "[teacher test]" in stdout
    # the teacher job logs with the same time prefix (no milliseconds)
    assert re.search(rf"^\[teacher train\] {stamp} INFO sbs_jax.teacher: done: ", stdout, re.MULTILINE)
    for method in ("sbs_llm", "standard_ft"):
        # the trainer's lines start with their time: `YYYY-MM-DD HH:MM:SS step 10/10 | ...`
        assert re.search(rf"synthetic/t5_1_1_tiny/{method}/100pct/seed0 train\] "
                         rf"{stamp} step 10/10 ", stdout)
    assert "on the same 64 examples for 10 steps each" in stdout
    assert "same number of steps" in stdout


def test_teacher_wrote_the_records_the_tasks_read(quickstart):
    out, _ = quickstart
    directory = out / "data" / "synthetic"
    for split, size in SIZES.items():
        written = records.read_split(str(directory), split)
        with open(out / "inputs" / f"{split}.jsonl") as f:
            asked = [json.loads(line) for line in f]
        assert sorted(r.id for r in written) == sorted(a["id"] for a in asked)
        assert len(written) == size
        # The rule-based teacher is exact: its labels are the gold ones, with a rationale each.
        assert all(r.llm_label == r.label and r.rationale for r in written)
    stats = json.loads((directory / "stats.json").read_text())
    assert stats["failed"] == 0
    assert (directory / "info.json").exists()


def test_vocabulary_gives_each_spaced_digit_one_token(quickstart):
    """Issue 9: a vocabulary that split digits made each digit of `3 4 7` two tokens (`▁`, `3`),
    doubling the synthetic sequences (and a step's cost); step-by-step then learned nothing in
    the quickstart's budget (2.0% test accuracy)."""
    out, _ = quickstart
    vocabulary = load_vocab(str(out / "data" / "spiece.model"))
    for record in records.read_split(str(out / "data" / "synthetic"), "test"):
        assert len(vocabulary.encode(record.label)) == len(record.label.split(" "))
        assert len(vocabulary.encode(record.input)) == len(record.input.split(" "))


def test_table_plot_and_results_agree_with_the_evaluations(quickstart):
    out, stdout = quickstart
    results = json.loads((out / "quickstart_results.json").read_text())
    assert results["train_steps"] == 10 and results["train_examples"] == SIZES["train"]
    table = (out / "comparison.md").read_text()
    for method, title in (("sbs_llm", "step-by-step (teacher labels)"),
                          ("standard_ft", "standard fine-tuning (gold labels)")):
        cell_dir = out / "runs" / "synthetic" / "t5_1_1_tiny" / method / "100pct" / "seed0"
        metrics = json.loads((cell_dir / "metrics.json").read_text())
        accuracy = results["methods"][method]["accuracy"]
        assert metrics["split"] == "test" and metrics["num_examples"] == SIZES["test"]
        assert accuracy == metrics["accuracy"] and 0.0 <= accuracy <= 100.0
        assert f"| {title} | {accuracy:.1f} | {SIZES['train']} | 10 |" in table
        assert f"| {title} | {accuracy:.1f} |" in stdout
        # The plot's loss curves: the trainer's logged losses up to the last step.
        label_curve = quickstart_module.training_curve(cell_dir / "model", "label_loss")
        rationale_curve = quickstart_module.training_curve(cell_dir / "model", "rationale_loss")
        assert label_curve[-1][0] == 10 and all(v > 0 for _, v in label_curve)
        assert bool(rationale_curve) == (method == "sbs_llm")
    image = matplotlib.image.imread(out / "comparison.png")
    assert image.ndim == 3 and image.shape[0] > 200


def test_rerun_resumes_without_repeating_work(quickstart):
    out, _ = quickstart
    before = json.loads((out / "quickstart_results.json").read_text())["methods"]
    proc = _run(_command(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[teacher] already done" in proc.stdout
    assert "2 cells: 2 finished, 0 to run" in proc.stdout
    after = json.loads((out / "quickstart_results.json").read_text())["methods"]
    assert {m: r["accuracy"] for m, r in after.items()} == \
        {m: r["accuracy"] for m, r in before.items()}


def test_other_data_settings_in_the_same_folder_are_refused(quickstart):
    out, _ = quickstart
    proc = _run(_command(out, num_train=128))
    assert proc.returncode == 2
    assert "other data settings (sizes)" in proc.stderr and str(out) in proc.stderr


def test_help_lists_the_teacher_flags():
    proc = subprocess.run([sys.executable, "-m", "sbs_jax.quickstart", "--help"],
                          check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0 and "--teacher_backend" in proc.stdout


def test_http_teacher_shortfall_stops_before_training(tmp_path):
    """A configured OpenAI-compatible teacher that leaves examples unlabeled: a clear error."""
    from fake_teacher import FakeTeacher

    with FakeTeacher(faults={"+": ["noanswer"] * 5}) as teacher:
        proc = _run([*_command(tmp_path), "--teacher_backend", "openai", "--base_url",
                     teacher.base_url, "--teacher_model", "fake-model"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert teacher.requests >= SIZES["train"]
    assert f"the teacher wrote {SIZES['train'] - 5} of {SIZES['train']} train records" \
        in proc.stderr
    assert "stats.json" in proc.stderr
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "data" / "synthetic" / "info.json").exists()
