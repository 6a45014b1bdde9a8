"""The local JAX teacher: a random-init tiny T5 saved as a HF folder, batched decoding, the job."""

import asyncio
import json

import jax
import pytest

from sbs_jax.cli import teacher as teacher_cli
from sbs_jax.data import records
from sbs_jax.data.vocab import load_vocab, padded_vocab_size
from sbs_jax.models import get_config, init_params, save_hf
from sbs_jax.teacher.local_backend import LocalBackend


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory, tiny_vocab_path):
    vocab_size = padded_vocab_size(load_vocab(tiny_vocab_path).vocab_size)
    config = get_config("t5_1_1_tiny", vocab_size=vocab_size)
    path = tmp_path_factory.mktemp("teacher_hf")
    save_hf(config, init_params(config, jax.random.PRNGKey(3)), path, vocab=tiny_vocab_path)
    return str(path)


def test_batched_decoding_equals_one_at_a_time(tiny_teacher_dir):
    # Short prompts: one length bucket, so one compiled shape serves both ways.
    prompts = ["Q: 1 2 3\nA:", "Premise: a cat.", "Q: Where?\nA: the"]

    async def ask(together):
        async with LocalBackend(tiny_teacher_dir, max_decode_len=6, batch_size=4) as backend:
            if together:
                results = await asyncio.gather(*(backend.generate(p) for p in prompts))
            else:
                results = [await backend.generate(p) for p in prompts]
            return results, backend.batches_decoded

    batched, batches = asyncio.run(ask(together=True))
    single, singles = asyncio.run(ask(together=False))  # each alone among padding rows
    assert (batches, singles) == (1, 3)
    assert [g.completions for g in batched] == [g.completions for g in single]
    assert all(g.prompt_tokens > 0 and g.completion_tokens > 0 for g in batched)


def test_job_with_the_local_backend_accounts_for_every_example(tiny_teacher_dir, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    code = teacher_cli.main(["--input", "synthetic:6", "--dataset", "synthetic",
                             "--backend", "local", "--model", tiny_teacher_dir, "--max_tokens",
                             "6", "--batch_size", "4", "--num_samples", "2",
                             "--output_dir", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    written = [r.id for p in records.shard_paths(str(out), "train")
               for r in records.read_shard(p)]
    failed = [f["id"] for f in stats["failures"]]
    assert len(written) + len(failed) == 6 and not set(written) & set(failed)
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0
    # A random model writes no "So the answer is": those are parse failures, not errors.
    assert stats["parse_failures"] == len(failed)
