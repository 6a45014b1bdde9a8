"""The teacher job: few-shot chain-of-thought prompting of a teacher LLM into rationale datasets.

Modules: `prompts` (tasks/prompts/*.txt), `inputs` (what to label), `http_backend` (any
OpenAI-compatible server; retries, rate limits), `local_backend` (a T5 checkpoint, batched
decoding), `rules_backend` (the synthetic dataset's exact teacher), `ledger` (exactly-once
commits and resume), `job` (workers, voting, stats), `backends` (the one the flags choose),
`beam_job` (Beam form). The flags are `sbs_jax.cli.teacher`'s (`sbs-teacher`).
"""
