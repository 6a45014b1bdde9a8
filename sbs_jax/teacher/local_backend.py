"""Teacher backend that decodes with a local T5 (our checkpoint or a HF T5 / Flan-T5 folder).

The job's workers call `generate` one prompt at a time; a batcher gathers what is waiting into
one fixed-shape batch (rows padded to `batch_size`, lengths to a power of two) so
`sbs_jax.infer.decoding.generate` compiles a handful of shapes once and the accelerator sees full
batches. Decoding runs in a thread so the event loop stays free. Greedy at temperature 0, else
sampling (one row per sample, so `--num_samples` majority votes work too). Prompts longer than
`max_input_len` tokens keep their end: the query is there, the first exemplars are dropped.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Self

import numpy as np

from sbs_jax.data.vocab import EOS_ID
from sbs_jax.teacher.http_backend import Generation


@dataclass
class _Waiting:
    prompt: str
    num_samples: int
    future: asyncio.Future


def _bucket(length: int, smallest: int = 16) -> int:
    return max(smallest, 1 << (length - 1).bit_length())


class LocalBackend:
    """Batched decoding with a T5 from `model_path` (MODEL_DIR of ours, or a HF folder)."""

    name = "local"

    def __init__(self, model_path: str, vocab_path: str | None = None, batch_size: int = 32,
                 max_decode_len: int = 256, temperature: float = 0.0,
                 max_input_len: int = 1024, seed: int = 0):
        if not model_path:
            raise ValueError("the local backend needs --model (a MODEL_DIR or a HF T5 folder)")
        self.model = model_path
        self.batch_size = batch_size
        self.max_decode_len = max_decode_len
        self.temperature = temperature
        self.max_input_len = max_input_len
        self._seed = seed
        self._vocab_path = vocab_path or os.path.join(model_path, "spiece.model")
        self._queue: list[_Waiting] = []
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._calls = 0
        self.batches_decoded = 0

    def _load(self) -> None:
        from sbs_jax.data.vocab import load_vocab
        from sbs_jax.infer import evaluation
        from sbs_jax.models import load_hf
        from sbs_jax.train import checkpoint_steps

        if checkpoint_steps.is_our_checkpoint(self.model):
            self.config, self.params = evaluation.load_trained(
                self.model, evaluation.choose_step(self.model, "latest"))
        else:
            self.config, self.params = load_hf(self.model)
        self.vocab = load_vocab(self._vocab_path)

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._load)
        self._wakeup = asyncio.Event()
        self._batcher = asyncio.create_task(self._run_batches())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            self._batcher = None

    async def generate(self, prompt: str, num_samples: int = 1,
                       input_text: str = "") -> Generation:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(prompt, num_samples, future))
        self._wakeup.set()
        return await future

    async def _run_batches(self) -> None:
        while True:
            await self._wakeup.wait()
            # Let every worker that is about to ask enqueue before the batch is cut.
            for _ in range(3):
                await asyncio.sleep(0)
            batch, rows = [], 0
            while self._queue and rows + self._queue[0].num_samples <= self.batch_size:
                rows += self._queue[0].num_samples
                batch.append(self._queue.pop(0))
            if not batch:  # one prompt wants more samples than a batch holds
                batch.append(self._queue.pop(0))
            if not self._queue:
                self._wakeup.clear()
            try:
                results = await asyncio.to_thread(self.decode_batch, batch)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for waiting in batch:
                    waiting.future.set_exception(exc)
            else:
                for waiting, result in zip(batch, results):
                    waiting.future.set_result(result)

    def _encode(self, prompt: str) -> list[int]:
        ids = list(self.vocab.encode(prompt))[-(self.max_input_len - 1):]
        return ids + [EOS_ID]

    def decode_batch(self, batch: list[_Waiting]) -> list[Generation]:
        """Decodes the waiting prompts (each `num_samples` times) in fixed-shape batches."""
        from sbs_jax.infer import decoding

        rows = [(i, self._encode(w.prompt)) for i, w in enumerate(batch)
                for _ in range(w.num_samples)]
        texts: list[list[str]] = [[] for _ in batch]
        used = [[0, 0] for _ in batch]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            self.batches_decoded += 1
            tokens = np.zeros((self.batch_size, _bucket(max(len(ids) for _, ids in chunk))),
                              np.int32)
            for r, (_, ids) in enumerate(chunk):
                tokens[r, :len(ids)] = ids
            if self.temperature > 0:
                import jax

                self._calls += 1
                decoded = decoding.generate(
                    self.config, self.params, tokens, self.max_decode_len, method="sample",
                    temperature=self.temperature, rng=jax.random.PRNGKey(
                        self._seed * 1_000_003 + self._calls))
            else:
                decoded = decoding.generate(self.config, self.params, tokens,
                                            self.max_decode_len)
            for (owner, ids), out in zip(chunk, np.asarray(decoded)):
                out_ids = [int(t) for t in out if t != 0]
                texts[owner].append(self.vocab.decode(out_ids))
                used[owner][0] += len(ids)
                used[owner][1] += len(out_ids)
        return [Generation(t, u[0], u[1], 1) for t, u in zip(texts, used)]
