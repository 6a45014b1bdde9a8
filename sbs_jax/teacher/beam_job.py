"""The teacher job as an Apache Beam pipeline, for millions of examples (`sbs-teacher-beam`,
flags in sbs_jax.cli.teacher_beam).

Exactly once: records are written by Beam's file sink into `{output_dir}/.beam-{split}.tmp/`
as `{split}-{k:05d}.staged` (the runner commits each shard once even when it retries bundles,
which may ask the teacher about an example again). When the pipeline has succeeded, on a local
folder each staged shard is committed through the teacher's ledger (a ledger with its ids and
checksum, then the rename to `{split}-{k:05d}.tfrecord`), so readers check it like the plain
job's output and a re-run skips ids already committed; on a remote folder the shards are renamed
into place after those already there. `stats.json` (the same keys as the plain job's) is written
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from sbs_jax.data import records
from sbs_jax.teacher import backends, job
from sbs_jax.teacher.inputs import TeacherInput, parse_jsonl_line, read_inputs
from sbs_jax.teacher.ledger import Batch, Ledger
from sbs_jax.teacher.prompts import load_prompt

NAMESPACE = "sbs_teacher"
STAGED_SUFFIX = ".staged"  # nothing has ".tfrecord" in its name before it is committed
COUNTERS = ("records", "failed", "parse_failures", "prompt_tokens", "completion_tokens",
            "requests", "gold_known", "gold_agree")


def _options(args: argparse.Namespace) -> job.JobOptions:
    return job.JobOptions(dataset=args.dataset, split=args.split, output_dir=args.output_dir,
                          teacher=args.model or args.backend, num_samples=args.num_samples,
                          concurrency=args.concurrency)


class AskTeacher(beam.DoFn):
    """Asks the teacher about a batch of examples; records out, failures to a tagged output."""

    FAILURES = "failures"

    def __init__(self, args: argparse.Namespace):
        self._args = args  # holds the variable's name, never the key
        self._counters = {name: Metrics.counter(NAMESPACE, name) for name in COUNTERS}

    def setup(self) -> None:
        api_key = backends.api_key(self._args.api_key_env)
        self._backend = backends.make_backend(self._args, api_key)
        self._prompt = load_prompt(self._args.dataset, self._args.prompts_dir)
        self._job_options = _options(self._args)
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._backend.__aenter__())

    def teardown(self) -> None:
        self._loop.run_until_complete(self._backend.__aexit__(None, None, None))
        self._loop.close()

    async def _ask_all(self, batch: list[TeacherInput]) -> list[job.Outcome]:
        gate = asyncio.Semaphore(self._job_options.concurrency)

        async def one(example: TeacherInput) -> job.Outcome:
            async with gate:
                return await job.ask(self._backend, self._prompt, example, self._job_options)

        return await asyncio.gather(*(one(example) for example in batch))

    def process(self, batch: list[TeacherInput]):
        for outcome in self._loop.run_until_complete(self._ask_all(batch)):
            for name in ("prompt_tokens", "completion_tokens", "requests", "gold_known",
                         "gold_agree"):
                self._counters[name].inc(int(getattr(outcome, name)))
            if outcome.record is not None:
                self._counters["records"].inc()
                yield records.to_example_bytes(outcome.record)
            else:
                self._counters["failed"].inc()
                self._counters["parse_failures"].inc(outcome.failure["kind"] == "parse")
                yield beam.pvalue.TaggedOutput(self.FAILURES, json.dumps(outcome.failure))


def _read(pipeline, args: argparse.Namespace):
    """The input examples as a PCollection (files are read by the workers)."""
    path = args.input
    in_memory = args.limit is not None  # only an in-memory list has a "first N"
    if path.endswith(".jsonl") and not in_memory:
        return (pipeline | "ReadJsonl" >> beam.io.ReadFromText(path)
                | "Parse" >> beam.Map(parse_jsonl_line, where=path)
                | "DropBlank" >> beam.Filter(lambda example: example is not None))
    if path.endswith(".tfrecord") and not in_memory:
        return (pipeline | "ReadShards" >> beam.io.ReadFromTFRecord(path)
                | "Decode" >> beam.Map(records.from_example_bytes, where=path)
                | "ToInput" >> beam.Map(lambda r: TeacherInput(r.id, r.input, r.label)))
    examples = read_inputs(path, args.dataset, args.split)
    if args.limit is not None:
        examples = examples[: args.limit]
    return pipeline | "Create" >> beam.Create(examples, reshuffle=True)


def _move_into_place(staging: str, output_dir: str, split: str) -> int:
    """Renames the staged shards after those already there (a remote folder has no ledger)."""
    from sbs_jax.runtime.tf_setup import tf

    first_index = sum(1 for n in tf.io.gfile.listdir(output_dir)
                      if (m := records.SHARD_RE.match(n)) and m.group("split") == split)
    names = sorted(n for n in tf.io.gfile.listdir(staging) if n.endswith(STAGED_SUFFIX))
    for offset, name in enumerate(names):
        tf.io.gfile.rename(os.path.join(staging, name),
                           os.path.join(output_dir, records.shard_name(split, first_index
                                                                       + offset)))
    return len(names)


def _read_failures(staging: str) -> list[dict]:
    from sbs_jax.runtime.tf_setup import tf

    failures = []
    for name in sorted(tf.io.gfile.listdir(staging)):
        if name.startswith("failures"):
            with tf.io.gfile.GFile(os.path.join(staging, name)) as f:
                failures += [json.loads(line) for line in f if line.strip()]
    return failures


def run(args: argparse.Namespace, beam_argv: list[str]) -> dict:
    """Runs the pipeline to completion and returns the stats it wrote."""
    if args.backend is None:
        args.backend = "rules" if args.dataset == "synthetic" else "openai"
    if args.temperature is None:
        args.temperature = 0.0 if args.num_samples == 1 else 0.7
    backends.api_key(args.api_key_env)  # fail early, on the launcher, when the variable is missing
    local = "://" not in args.output_dir
    ledger = None
    if local:
        ledger = Ledger(args.output_dir, args.split, {
            "input": args.input, "dataset": args.dataset, "split": args.split,
            "backend": args.backend, "model": args.model, "endpoint": args.endpoint,
            "num_samples": args.num_samples})
    try:
        return _run_pipeline(args, beam_argv, ledger)
    finally:
        if ledger is not None:
            ledger.close()


def _run_pipeline(args: argparse.Namespace, beam_argv: list[str], ledger: Ledger | None) -> dict:
    """The pipeline, then its shards committed: through the ledger on a local folder."""
    from sbs_jax.runtime.tf_setup import tf

    done = set(ledger.record_ids) if ledger else set()
    staging = os.path.join(args.output_dir, f".beam-{args.split}.tmp")
    if tf.io.gfile.exists(staging):
        tf.io.gfile.rmtree(staging)
    tf.io.gfile.makedirs(staging)

    pipeline = beam.Pipeline(options=PipelineOptions(beam_argv))
    examples = _read(pipeline, args)
    asked = (examples
             | "SkipDone" >> beam.Filter(lambda example, ids: example.id not in ids, ids=done)
             | "Batch" >> beam.BatchElements(min_batch_size=1,
                                             max_batch_size=max(4 * args.concurrency, 64))
             | "Ask" >> beam.ParDo(AskTeacher(args)).with_outputs(AskTeacher.FAILURES,
                                                                 main="records"))
    _ = asked.records | "WriteShards" >> beam.io.WriteToTFRecord(
        os.path.join(staging, args.split), file_name_suffix=STAGED_SUFFIX,
        shard_name_template="-SSSSS")
    _ = asked[AskTeacher.FAILURES] | "WriteFailures" >> beam.io.WriteToText(
        os.path.join(staging, "failures"), file_name_suffix=".jsonl",
        shard_name_template="-SSSSS")
    result = pipeline.run()
    result.wait_until_finish()

    totals = dict.fromkeys(COUNTERS, 0)
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        totals[counter.key.metric.name] += counter.committed or counter.attempted or 0
    failures = _read_failures(staging)
    if ledger is not None:
        staged = sorted(n for n in os.listdir(staging) if n.endswith(STAGED_SUFFIX))
        for name in staged:
            ledger.commit_file(os.path.join(staging, name))
        ledger.commit(Batch(failures=failures))
        shards = len(staged)
    else:
        shards = _move_into_place(staging, args.output_dir, args.split)
    tf.io.gfile.rmtree(staging)
    cost = (totals["prompt_tokens"] * args.prompt_cost_per_1k
            + totals["completion_tokens"] * args.completion_cost_per_1k) / 1000
    stats = {
        "dataset": args.dataset, "split": args.split, "teacher": args.model or args.backend,
        "finished": True, "aborted": None, "runner": "beam",
        "examples": len(done) + totals["records"] + totals["failed"],
        "records": len(done) + totals["records"], "failed": len(failures),
        "not_attempted": 0, "parse_failures": totals["parse_failures"],
        "agreement_with_gold": {
            "examples_with_gold": totals["gold_known"], "agree": totals["gold_agree"],
            "rate": totals["gold_agree"] / totals["gold_known"] if totals["gold_known"]
            else None},
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"], "requests": totals["requests"],
        "estimated_cost_usd": round(cost, 6), "new_shards": shards,
        "failures": [{"id": f["id"], "reason": f["reason"]} for f in failures],
    }
    if ledger is not None:
        ledger.write_stats(stats)
    else:
        with tf.io.gfile.GFile(os.path.join(args.output_dir, "stats.json"), "w") as f:
            f.write(json.dumps(stats, indent=1, ensure_ascii=False))
    return stats


if __name__ == "__main__":  # `python -m sbs_jax.teacher.beam_job`: runs sbs_jax.cli.teacher_beam
    import sys

    from sbs_jax.cli import teacher_beam

    sys.exit(teacher_beam.main())
