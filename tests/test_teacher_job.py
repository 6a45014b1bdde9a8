"""The teacher job end to end (in process) against a faulty fake server, plus its pure parts:
prompts, voting, the ledger's crash recovery, and the CLI's refusals."""

import json
import os
import time

import pytest
from fake_teacher import FakeTeacher

from sbs_jax.cli import teacher as teacher_cli
from sbs_jax.data import dss, records, synthetic
from sbs_jax.data.parse import DATASETS, parse_completion
from sbs_jax.teacher.inputs import TeacherInput
from sbs_jax.teacher.job import vote
from sbs_jax.teacher.ledger import Batch, Ledger
from sbs_jax.teacher.prompts import PromptTemplate, load_prompt

KEY = "sk-job-SECRET-9876543210"


def synthetic_answer(prompt: str) -> str:
    """A correct teacher that, like real ones, runs on into an invented next exemplar."""
    query = prompt.rsplit("Q: ", 1)[1].split("\nA:")[0]
    rationale, label = synthetic.solve(query)
    return f" {rationale} So the answer is {label}.\n\nQ: 1 2 3 + 1 1 1\nA: invented"


def _run(argv, capsys):
    code = teacher_cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _committed(output_dir, split="train"):
    return [r for p in records.committed_shards(output_dir, split) for r in records.read_shard(p)]


def test_faults_end_written_once_or_failed_with_reason(tmp_path, capsys, caplog, monkeypatch):
    examples = synthetic.generate(14, seed=3, split="train")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": r.id, "input": r.input, "label": r.label}) + "\n"
                              for r in examples))
    faults = {
        examples[0].input: ["429"],
        examples[1].input: ["500", "500"],
        examples[2].input: ["hang"],
        examples[3].input: ["malformed"],
        examples[4].input: ["noanswer"],
        examples[5].input: ["500"] * 3,  # more than the retries: fails, asked again next run
    }
    monkeypatch.setenv("TEACHER_KEY", KEY)
    out = tmp_path / "out"
    argv = ["--input", str(inputs), "--dataset", "synthetic", "--backend", "openai",
            "--model", "fake", "--api_key_env", "TEACHER_KEY", "--output_dir", str(out),
            "--concurrency", "4", "--max_retries", "2", "--timeout_s", "1.5",
            "--backoff_base_s", "0.01", "--shard_size", "4", "--log_level", "DEBUG"]
    with FakeTeacher(answer=synthetic_answer, faults=faults, retry_after_s=1, hang_s=3) as teacher:
        code, log_text = _run(argv + ["--base_url", teacher.base_url], capsys)
        assert code == 0, log_text
        stats = json.loads((out / "stats.json").read_text())
        written = _committed(str(out))
        ids = [r.id for r in written]
        failed = {f["id"]: f["reason"] for f in stats["failures"]}
        assert len(ids) == len(set(ids)) == 12
        assert set(ids) | set(failed) == {r.id for r in examples} and not set(ids) & set(failed)
        assert "no parsable label" in failed[examples[4].id]
        assert "HTTP 500" in failed[examples[5].id] and "3 attempts" in failed[examples[5].id]
        assert stats["parse_failures"] == 1 and stats["failed"] == 2 and stats["finished"]
        by_id = {r.id: r for r in written}
        for example in examples[:4] + examples[6:]:
            record = by_id[example.id]
            assert (record.llm_label, record.rationale) == (example.label, example.rationale)
            assert record.input == example.input and record.label == example.label
            assert record.source == "synthetic/train" and record.teacher == "fake"
        # Retries observed by the server: 429, 500 x2, hang, malformed each cost extra requests
        # (a loaded machine may add a timeout or two, hence >=; 500 x3 is capped by retries).
        counts = [teacher.requests_by_marker[examples[i].input] for i in range(6)]
        assert all(c >= want for c, want in zip(counts, [2, 3, 2, 2, 1, 3])), counts
        assert counts[5] == 3
        assert stats["requests"] == teacher.requests >= 14 + 1 + 2 + 1 + 1 + 2
        assert stats["agreement_with_gold"] == {"examples_with_gold": 12, "agree": 12,
                                                "rate": 1.0}
        assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0

        # Re-run: only the example whose retries ran out is asked again (and now succeeds).
        teacher.reset_counts()
        code, log_text2 = _run(argv + ["--base_url", teacher.base_url], capsys)
        assert code == 0, log_text2
        asked = {p.rsplit("Q: ", 1)[1].split("\nA:")[0] for p in teacher.prompts}
        assert asked == {examples[5].input}
    stats = json.loads((out / "stats.json").read_text())
    ids = [r.id for r in _committed(str(out))]
    assert len(ids) == len(set(ids)) == 13
    assert [f["id"] for f in stats["failures"]] == [examples[4].id]
    # The key is in no output file and no log line.
    everything = log_text + log_text2 + caplog.text
    for name in os.listdir(out):
        everything += (out / name).read_bytes().decode("utf-8", "replace")
    assert KEY not in everything
    assert set(teacher.auth_headers) == {f"Bearer {KEY}"}


def test_unreachable_teacher_exits_nonzero_and_keeps_what_is_done(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--input", "synthetic:6", "--dataset", "synthetic", "--backend", "openai",
            "--base_url", "http://127.0.0.1:9/v1", "--output_dir", str(out), "--max_retries",
            "0", "--concurrency", "1", "--max_consecutive_failures", "2"]
    code, text = _run(argv, capsys)
    assert code == 2 and "teacher looks unavailable" in text and "connection error" in text
    stats = json.loads((out / "stats.json").read_text())
    assert not stats["finished"] and stats["failed"] == 2 and stats["not_attempted"] == 4


def test_an_unset_api_key_variable_is_refused_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    code, text = _run(["--input", "synthetic:4", "--dataset", "synthetic", "--output_dir",
                       str(tmp_path), "--backend", "openai", "--base_url",
                       "http://127.0.0.1:9/v1", "--api_key_env", "NO_SUCH_KEY_VAR"], capsys)
    assert code == 2 and "NO_SUCH_KEY_VAR" in text


def test_a_rerun_with_other_settings_is_refused(tmp_path, capsys):
    base = ["--input", "synthetic:4", "--dataset", "synthetic", "--output_dir", str(tmp_path)]
    assert _run(base, capsys)[0] == 0  # rules backend by default
    code, text = _run(base + ["--num_samples", "3"], capsys)
    assert code == 2 and "num_samples was 1, now 3" in text


def test_a_bad_input_line_is_refused_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "input": "1 + 2"}\n{"id": "b", "inp": 1}\n')
    code, text = _run(["--input", str(bad), "--dataset", "synthetic", "--dry_run"], capsys)
    assert code == 2 and f"{bad}:2" in text


def test_dry_run_prints_one_prompt_with_the_input_verbatim(tmp_path, capsys):
    rows = tmp_path / "in.jsonl"
    premise, hypothesis = "A {braced} cat sleeps.", "An animal rests."
    rows.write_text(json.dumps({"id": "x", "premise": premise, "hypothesis": hypothesis}) + "\n")
    code, text = _run(["--input", str(rows), "--dataset", "esnli", "--dry_run"], capsys)
    assert code == 0
    assert text.rstrip().endswith(f"Premise: {premise}\nHypothesis: {hypothesis}\nReasonings:")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_prompt_exemplars_parse_with_the_dataset_rules(dataset):
    prompt = load_prompt(dataset)
    assert len(prompt.exemplars) >= 4
    answer_prefix = prompt.query.splitlines()[-1]  # "A:", "Answer:" or "Reasonings:"
    for exemplar in prompt.exemplars:
        completion = exemplar.rsplit("\n" + answer_prefix, 1)[1]
        parsed = parse_completion(dataset, completion + "\n\n" + exemplar)
        assert parsed.ok, (dataset, exemplar)
        if dataset in ("esnli", "anli1"):
            assert parsed.label in ("entailment", "neutral", "contradiction")


def test_prompt_template_rejects_bad_files():
    with pytest.raises(ValueError, match="<<query>>"):
        PromptTemplate.from_text("Q: a\nA: b\n", "p.txt")
    with pytest.raises(ValueError, match="names"):
        PromptTemplate.from_text("Q: a\nA: b\n<<query>>\nQ: {question}\nA:", "p.txt")


def test_vote_takes_the_majority_label_with_its_own_rationale():
    a = " r1 So the answer is 1 2."
    b = " r2 So the answer is 3 4."
    c = " r3 So the answer is 3 4."
    parsed, completion = vote("synthetic", [a, b, c, "nothing"])
    assert (parsed.label, parsed.rationale, completion) == ("3 4", "r2", b)
    assert vote("synthetic", [a, b])[0].label == "1 2"  # tie: first seen
    assert "no parsable label" in vote("synthetic", ["nothing", "at all"])


def test_ledger_recovers_from_a_crash_between_and_inside_commits(tmp_path):
    out = str(tmp_path)
    rows = synthetic.generate(6, seed=0, split="train")
    ledger = Ledger(out, "train", {"x": 1})
    ledger.commit(Batch(records=rows[:2], failures=[
        {"id": "f", "reason": "no parsable label", "kind": "parse", "final": True},
        {"id": "g", "reason": "timeout", "kind": "teacher", "final": False}]))
    ledger.commit(Batch(records=rows[2:4]))
    ledger.close()
    # Crash inside the second commit: ledger written, shard still .tmp.
    os.rename(os.path.join(out, "train-00001.tfrecord"), os.path.join(out, "train-00001.1.tmp"))
    ledger = Ledger(out, "train", {"x": 1})
    assert ledger.record_ids == {rows[0].id, rows[1].id}
    assert ledger.is_done("f") and not ledger.is_done("g") and not ledger.is_done(rows[2].id)
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    assert not os.path.exists(os.path.join(out, "train-00001.ledger.json"))
    assert ledger.next_index == 1
    with pytest.raises(RuntimeError, match="another teacher job"):
        Ledger(out, "train", {"x": 1})
    ledger.close()


@pytest.mark.parametrize("dataset", ["esnli", "anli1", "cqa", "svamp"])
def test_dry_run_on_released_data_shows_the_input_verbatim(dss_data_dir, dataset, capsys):
    code, text = _run(["--input", str(dss_data_dir / dataset), "--dataset", dataset,
                       "--split", "test", "--dry_run"], capsys)
    assert code == 0, text
    first = dss.read_split(str(dss_data_dir), dataset, "test").records[0]
    for value in TeacherInput(first.id, first.input).prompt_fields(dataset).values():
        assert value in text


def test_cqa_job_on_released_data_reports_agreement(dss_data_dir, tmp_path, capsys):
    def first_choice(prompt):
        choice = prompt.rsplit("Answer Choices:\n(a) ", 1)[1].split("\n", 1)[0]
        return f" It must be the first. So the answer is (a) {choice}.\n\nQ: invented"

    rows = dss.read_split(str(dss_data_dir), "cqa", "test").records[:8]
    expected = sum(r.label == r.input.split("\n(a) ")[1].split("\n")[0] for r in rows)
    out = tmp_path / "out"
    with FakeTeacher(answer=first_choice) as teacher:
        code, text = _run(["--input", str(dss_data_dir), "--dataset", "cqa", "--split", "test",
                           "--limit", "8", "--base_url", teacher.base_url, "--model", "m",
                           "--output_dir", str(out)], capsys)
    assert code == 0, text
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"] == 8 and stats["agreement_with_gold"]["examples_with_gold"] == 8
    assert stats["agreement_with_gold"]["agree"] == expected
    assert {r.id for r in _committed(str(out), "test")} == {r.id for r in rows}


def test_concurrency_bounds_requests_in_flight(tmp_path, capsys):
    with FakeTeacher(answer=synthetic_answer, latency_s=0.05) as teacher:
        code, text = _run(["--input", "synthetic:12", "--dataset", "synthetic", "--backend",
                           "openai", "--base_url", teacher.base_url, "--concurrency", "3",
                           "--output_dir", str(tmp_path / "out")], capsys)
        assert code == 0, text
        assert teacher.max_in_flight == 3 and teacher.requests == 12


def test_misshapen_replies_and_an_echoed_key_never_crash_or_leak(tmp_path, capsys, monkeypatch):
    examples = synthetic.generate(6, seed=4, split="train")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": r.id, "input": r.input}) + "\n"
                              for r in examples))
    monkeypatch.setenv("TEACHER_KEY", KEY)
    out = tmp_path / "out"
    argv = ["--input", str(inputs), "--dataset", "synthetic", "--backend", "openai", "--model",
            "fake", "--api_key_env", "TEACHER_KEY", "--output_dir", str(out), "--endpoint",
            "chat", "--backoff_base_s", "0.01", "--concurrency", "2", "--shard_size", "2"]
    faults = {examples[0].input: ["message-string"], examples[1].input: ["wrong-types"],
              examples[2].input: ["json-list", "no-choices"], examples[3].input: ["400-key-piece"]}
    with FakeTeacher(answer=synthetic_answer, faults=faults) as teacher:
        code, text = _run(argv + ["--base_url", teacher.base_url], capsys)
        assert code == 0, text
        stats = json.loads((out / "stats.json").read_text())
        assert stats["records"] == 5 and [f["id"] for f in stats["failures"]] == [examples[3].id]
        assert "HTTP 400" in stats["failures"][0]["reason"]
        teacher.faults = {examples[3].input: ["401-masked-key"]}
        code, text2 = _run(argv + ["--base_url", teacher.base_url], capsys)
    assert code == 2 and "answered HTTP 401" in text2 and "Incorrect API key: ***" in text2
    everything = text + text2
    for name in os.listdir(out):
        everything += (out / name).read_bytes().decode("utf-8", "replace")
    for fragment in (KEY, KEY[:7], KEY[3:12], KEY[-6:]):
        assert fragment not in everything, fragment


def test_a_wrong_base_url_ends_the_job_fast_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    start = time.monotonic()
    code, text = _run(["--input", "synthetic:40", "--dataset", "synthetic", "--backend", "openai",
                       "--base_url", "http://127.0.0.1:9/v1", "--output_dir", str(out),
                       "--startup_connect_s", "2", "--backoff_base_s", "0.1"], capsys)
    assert code == 2, text
    assert time.monotonic() - start < 60
    assert "cannot reach the teacher at http://127.0.0.1:9/v1" in text and "--base_url" in text
    stats = json.loads((out / "stats.json").read_text())
    assert not stats["finished"] and "http://127.0.0.1:9/v1" in stats["aborted"]
    assert stats["records"] == 0 and stats["not_attempted"] > 0
    parsed = teacher_cli.build_parser().parse_args(["--input", "x", "--dataset", "cqa"])
    assert parsed.startup_connect_s == 30


@pytest.mark.parametrize("flag, value, message", [
    ("--timeout_s", "-1", "must be > 0, got -1"), ("--max_retries", "-1", "must be >= 0"),
    ("--concurrency", "0", "must be >= 1, got 0"), ("--num_samples", "0", "must be >= 1"),
    ("--shard_size", "two", "expected an integer, got 'two'"),
    ("--requests_per_minute", "0", "must be > 0"), ("--temperature", "nan", "must be >= 0"),
    ("--limit", "-3", "must be >= 0"), ("--commit_every_s", "0", "must be > 0"),
    ("--startup_connect_s", "-5", "must be > 0"), ("--backoff_max_s", "-1", "must be >= 0"),
])
def test_numeric_flags_are_range_checked_by_name(flag, value, message, capsys):
    with pytest.raises(SystemExit) as info:
        teacher_cli.main(["--input", "synthetic:2", "--dataset", "synthetic", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err
