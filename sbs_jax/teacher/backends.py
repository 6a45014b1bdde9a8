"""The teacher backend the job's flags choose, and the API key from the environment."""

from __future__ import annotations

import argparse
import os


def api_key(env_name: str | None) -> str | None:
    """The API key from the environment variable --api_key_env names (None without one); a
    ValueError when it is unset or empty. Keys are never read from flags or files."""
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ValueError(f"environment variable {env_name} (from --api_key_env) is "
                         "not set or empty")
    return key


def make_backend(args: argparse.Namespace, key: str | None):
    """The backend `sbs-teacher`'s flags choose (rules, local or an OpenAI-compatible server)."""
    if args.backend == "rules":
        from sbs_jax.teacher.rules_backend import RulesBackend

        return RulesBackend(args.dataset)
    if args.backend == "local":
        from sbs_jax.teacher.local_backend import LocalBackend

        return LocalBackend(args.model, vocab_path=args.vocab, batch_size=args.batch_size,
                            max_decode_len=args.max_tokens, temperature=args.temperature)
    from sbs_jax.teacher.http_backend import OpenAIBackend

    return OpenAIBackend(
        args.base_url, args.model or "", api_key=key, endpoint=args.endpoint,
        concurrency=args.concurrency, timeout_s=args.timeout_s, max_retries=args.max_retries,
        max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop,
        requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
        backoff_base_s=args.backoff_base_s, backoff_max_s=args.backoff_max_s,
        startup_connect_s=args.startup_connect_s)
