"""The teacher job's core: prompt every pending example, vote, parse, commit exactly once.

`run_job` drives any backend with `generate(prompt, num_samples, input_text) -> Generation`
(`http_backend.OpenAIBackend`, `local_backend.LocalBackend`, `rules_backend.RulesBackend`)
through `concurrency` workers. Results are buffered and committed through `ledger.Ledger` every
`shard_size` examples or `commit_every_s` seconds, so a crash loses at most one buffer, and a
re-run with the same arguments asks only what was not committed. It returns the stats that
`stats.json` holds. The CLI lives in `sbs_jax.cli.teacher`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time
from dataclasses import dataclass

from sbs_jax.data.parse import ParsedCompletion, parse_completion
from sbs_jax.data.records import Record
from sbs_jax.infer.metrics import arithmetic_equal
from sbs_jax.teacher.http_backend import Generation, TeacherError, TeacherUnavailable
from sbs_jax.teacher.inputs import TeacherInput
from sbs_jax.teacher.ledger import Batch, Ledger
from sbs_jax.teacher.prompts import PromptTemplate

log = logging.getLogger(__name__)


class JobInterrupted(Exception):
    """The job stopped on a signal after committing what was done."""


@dataclass(frozen=True)
class JobOptions:
    dataset: str
    split: str
    output_dir: str
    teacher: str = ""
    num_samples: int = 1
    concurrency: int = 16
    shard_size: int = 1000
    commit_every_s: float = 60.0
    max_consecutive_failures: int = 100
    prompt_cost_per_1k: float = 0.0
    completion_cost_per_1k: float = 0.0


def vote(dataset: str, completions: list[str]) -> tuple[ParsedCompletion, str] | str:
    """Majority label over the samples that parse; returns (parsed, its completion) or a reason.

    Ties go to the label seen first; the rationale is that of the first sample with the
    winning label, so rationale and label always come from one completion.
    """
    parsed = [(parse_completion(dataset, text), text) for text in completions]
    usable = [(p, text) for p, text in parsed if p.ok]
    if not usable:
        if any(p.label is not None for p, _ in parsed):
            return "empty rationale in every completion"
        return "no parsable label in the completion"
    counts = collections.Counter(p.label.strip() for p, _ in usable)
    best = max(counts.values())
    winner = next(p.label.strip() for p, _ in usable if counts[p.label.strip()] == best)
    return next((p, text) for p, text in usable if p.label.strip() == winner)


def labels_agree(dataset: str, llm_label: str, gold: str) -> bool:
    """The paper's teacher-accuracy rule: exact match, or equal values for SVAMP expressions."""
    if dataset == "svamp":
        return arithmetic_equal(llm_label, gold)
    return llm_label.strip() == gold.strip()


@dataclass(frozen=True)
class Outcome:
    """What asking about one example produced: a record or a failure, and what it cost."""

    record: Record | None
    failure: dict | None  # {"id", "reason", "kind": "parse" | "teacher", "final", ...}
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    gold_known: bool = False
    gold_agree: bool = False


def judge(example: TeacherInput, generation: Generation, options: JobOptions) -> Outcome:
    """Votes over the completions and builds the example's record (or its parse failure)."""
    cost = {"prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens, "requests": generation.requests}
    outcome = vote(options.dataset, generation.completions)
    if isinstance(outcome, str):
        first = generation.completions[0][:500] if generation.completions else ""
        return Outcome(None, {"id": example.id, "reason": outcome, "kind": "parse",
                              "final": True, "completion": first}, **cost)
    parsed, completion = outcome
    label = parsed.label.strip()
    record = Record(id=example.id, input=example.input, label=example.label, llm_label=label,
                    rationale=parsed.rationale.strip(),
                    source=f"{options.dataset}/{options.split}", teacher=options.teacher,
                    raw_completion=completion)
    return Outcome(record, None, **cost, gold_known=bool(example.label),
                   gold_agree=bool(example.label) and labels_agree(options.dataset, label,
                                                                   example.label))


async def ask(backend, prompt: PromptTemplate, example: TeacherInput,
              options: JobOptions) -> Outcome:
    """Asks the teacher about one example; only `TeacherUnavailable` escapes."""
    text = prompt.render(example.prompt_fields(options.dataset))
    try:
        generation = await backend.generate(text, options.num_samples, example.input)
    except TeacherError as exc:
        return Outcome(None, {"id": example.id, "reason": exc.reason, "kind": "teacher",
                              "final": exc.final}, requests=exc.requests)
    return judge(example, generation, options)


class _Run:
    """One invocation: the worker pool, the commit buffer and this run's counters."""

    def __init__(self, examples: list[TeacherInput], backend, prompt: PromptTemplate,
                 ledger: Ledger, options: JobOptions):
        self.backend = backend
        self.prompt = prompt
        self.ledger = ledger
        self.options = options
        self.pending = collections.deque(e for e in examples if not ledger.is_done(e.id))
        self.buffer = Batch()
        self.last_commit = time.monotonic()
        self.consecutive_failures = 0
        self.done_this_run = 0
        self.requests_this_run = 0
        self.abort_reason: str | None = None
        self.interrupted = False
        self.workers: list[asyncio.Task] = []

    def interrupt(self, reason: str) -> None:
        """First signal: take no new work, finish what is in flight. Second: stop now."""
        if self.interrupted:
            for worker in self.workers:
                worker.cancel()
        self.interrupted = True
        self.abort_reason = self.abort_reason or reason
        log.warning("%s: committing what is done, then stopping", reason)

    def _add(self, outcome: Outcome) -> None:
        counters = self.buffer.counters
        counters["prompt_tokens"] += outcome.prompt_tokens
        counters["completion_tokens"] += outcome.completion_tokens
        counters["requests"] += outcome.requests
        counters["gold_known"] += outcome.gold_known
        counters["gold_agree"] += outcome.gold_agree
        self.requests_this_run += outcome.requests
        if outcome.record is not None:
            self.buffer.records.append(outcome.record)
        else:
            self.buffer.failures.append(outcome.failure)

    def _maybe_commit(self, force: bool = False) -> None:
        due = len(self.buffer) >= self.options.shard_size or (
            time.monotonic() - self.last_commit >= self.options.commit_every_s)
        if len(self.buffer) and (force or due):
            self.ledger.commit(self.buffer)
            self.buffer = Batch()
            self.last_commit = time.monotonic()

    async def _worker(self) -> None:
        while self.pending and self.abort_reason is None:
            example = self.pending.popleft()
            try:
                outcome = await ask(self.backend, self.prompt, example, self.options)
            except TeacherUnavailable as exc:
                self.pending.appendleft(example)
                self.abort_reason = str(exc)
                return
            self._add(outcome)
            teacher_failed = outcome.failure is not None and outcome.failure["kind"] == "teacher"
            self.consecutive_failures = self.consecutive_failures + 1 if teacher_failed else 0
            if self.consecutive_failures >= self.options.max_consecutive_failures:
                self.abort_reason = (
                    f"{self.consecutive_failures} examples in a row failed; the teacher looks "
                    f"unavailable (last: {outcome.failure['reason']})")
            self.done_this_run += 1
            self._maybe_commit()

    async def run(self) -> None:
        self.workers = [asyncio.create_task(self._worker())
                        for _ in range(max(1, min(self.options.concurrency, len(self.pending))))]
        try:
            await asyncio.gather(*self.workers)
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
        finally:
            for worker in self.workers:
                worker.cancel()
            self._maybe_commit(force=True)


def job_stats(examples: list[TeacherInput], ledger: Ledger, options: JobOptions,
              elapsed_s: float, done_this_run: int, requests_this_run: int,
              abort_reason: str | None) -> dict:
    """The stats report: counts over every run, throughput of this one, cost estimate."""
    ids = [e.id for e in examples]
    with_record = sum(1 for i in ids if i in ledger.record_ids)
    failures = [{"id": i, "reason": ledger.failures[i]["reason"]} for i in ids
                if i not in ledger.record_ids and i in ledger.failures]
    pending = len(ids) - with_record - len(failures)
    totals = ledger.totals
    parse_failures = sum(1 for f in failures if ledger.failures[f["id"]]["kind"] == "parse")
    cost = (totals["prompt_tokens"] * options.prompt_cost_per_1k
            + totals["completion_tokens"] * options.completion_cost_per_1k) / 1000
    return {
        "dataset": options.dataset,
        "split": options.split,
        "teacher": options.teacher,
        "finished": abort_reason is None and pending == 0,
        "aborted": abort_reason,
        "examples": len(ids),
        "records": with_record,
        "failed": len(failures),
        "not_attempted": pending,
        "parse_failures": parse_failures,
        "agreement_with_gold": {
            "examples_with_gold": totals["gold_known"],
            "agree": totals["gold_agree"],
            "rate": totals["gold_agree"] / totals["gold_known"] if totals["gold_known"] else None,
        },
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        "requests": totals["requests"],
        "estimated_cost_usd": round(cost, 6),
        "this_run": {
            "elapsed_s": round(elapsed_s, 3),
            "examples": done_this_run,
            "examples_per_s": round(done_this_run / elapsed_s, 3) if elapsed_s > 0 else None,
            "requests_per_s": round(requests_this_run / elapsed_s, 3) if elapsed_s > 0 else None,
        },
        "failures": failures,
    }


async def run_job(examples: list[TeacherInput], backend, prompt: PromptTemplate,
                  options: JobOptions, settings: dict) -> dict:
    """Runs (or resumes) the job; writes and returns the stats. `settings` must match on resume.

    Raises `TeacherUnavailable` after committing what was done and writing the stats when the
    teacher cannot be reached or refuses the job, and `JobInterrupted` likewise after SIGTERM or
    SIGINT (a second signal stops without waiting for requests in flight).
    """
    start = time.monotonic()
    ledger = Ledger(options.output_dir, options.split, settings)
    try:
        run = _Run(examples, backend, prompt, ledger, options)
        log.info("%d of %d examples to ask (%d already done)", len(run.pending),
                 len(examples), len(examples) - len(run.pending))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, run.interrupt, f"stopped by {sig.name}")
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (e.g. a Beam worker): signals stay as they were
        try:
            async with backend:
                await run.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        stats = job_stats(examples, ledger, options, time.monotonic() - start,
                          run.done_this_run, run.requests_this_run, run.abort_reason)
        ledger.write_stats(stats)
    finally:
        ledger.close()
    if run.interrupted:
        raise JobInterrupted(run.abort_reason)
    if run.abort_reason is not None:
        raise TeacherUnavailable(run.abort_reason)
    return stats
