"""SIGTERM, then SIGKILL the teacher job (a real subprocess) at random moments, re-run it with
the same flags: every example ends in exactly one committed shard, a re-run asks only what was
missing, and SIGTERM stops cleanly (exit 130, stats written)."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

from fake_teacher import FakeTeacher
from test_teacher_job import synthetic_answer

from sbs_jax.data import records, synthetic


def _committed_ids(output_dir):
    ids = [r.id for p in records.committed_shards(output_dir, "train")
           for r in records.read_shard(p)]
    assert len(ids) == len(set(ids)), "an example was committed twice"
    return set(ids)


def _asked_inputs(teacher):
    return {prompt.rsplit("Q: ", 1)[1].split("\nA:")[0] for prompt in teacher.prompts}


def test_sigkill_then_rerun_gives_every_example_exactly_once(tmp_path):
    examples = synthetic.generate(60, seed=5, split="train")
    id_of = {r.input: r.id for r in examples}
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": r.id, "input": r.input}) + "\n"
                              for r in examples))
    out = str(tmp_path / "out")
    rng = random.Random(0)
    with FakeTeacher(answer=synthetic_answer, latency_s=0.03) as teacher:
        argv = [sys.executable, "-m", "sbs_jax.teacher", "--input", str(inputs), "--dataset",
                "synthetic", "--backend", "openai", "--base_url", teacher.base_url, "--model",
                "fake", "--output_dir", out, "--concurrency", "2", "--shard_size", "3",
                "--log_level", "WARNING"]
        kills = 0
        for signal_number in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
            before = _committed_ids(out)
            teacher.reset_counts()
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while teacher.requests == 0 and process.poll() is None:
                assert time.monotonic() < deadline, "the job never asked the teacher"
                time.sleep(0.01)
            time.sleep(0.1 if signal_number == signal.SIGTERM else rng.uniform(0.0, 0.6))
            assert signal_number != signal.SIGTERM or process.poll() is None
            if process.poll() is None:
                process.send_signal(signal_number)
                kills += signal_number == signal.SIGKILL
                if signal_number == signal.SIGTERM:
                    assert process.wait() == 130, process.stderr.read()[-2000:]
                    stats = json.loads(pathlib.Path(out, "stats.json").read_text())
                    assert stats["aborted"] == "stopped by SIGTERM" and not stats["finished"]
                    assert stats["records"] == len(_committed_ids(out)) < 60
            process.wait()
            asked = {id_of[text] for text in _asked_inputs(teacher)}
            assert not asked & before, "a committed example was asked again"
        assert kills >= 1

        before = _committed_ids(out)
        teacher.reset_counts()
        finished = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        assert finished.returncode == 0, finished.stderr[-2000:]
        asked = {id_of[text] for text in _asked_inputs(teacher)}
        assert not asked & before and asked | before == set(id_of.values())

    assert _committed_ids(out) == {r.id for r in examples}
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    stats = json.loads(pathlib.Path(out, "stats.json").read_text())
    assert stats["finished"] and stats["records"] == 60 and stats["failed"] == 0
