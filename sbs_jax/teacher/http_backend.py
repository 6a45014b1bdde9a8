"""Teacher backend for any OpenAI-compatible server (vLLM, TGI, llama.cpp server, hosted APIs).

Talks HTTP directly (httpx2, the client under the `openai` package) because the job needs what
the `openai` client does not give: retrying 200 responses whose body is not valid JSON, a total
deadline per request (a server that trickles bytes never trips a read timeout), a Retry-After
that pauses every caller, and the count of attempts per example for the stats.

Retried: connection errors, timeouts, HTTP 408, 409, 429 and 5xx, and 200 bodies of any wrong
shape (not JSON, no choices, a string where an object belongs, ...); waits grow exponentially
with jitter and are never shorter than the server's Retry-After (seconds or an HTTP date).
401/403/404 mean the job is misconfigured and stop it (`TeacherUnavailable`), as do connection
errors for `startup_connect_s` (30 s) before the server ever answered (a wrong URL, named in the
message); other 4xx fail only the example (not retried in this run, asked again on a re-run).
The API key goes into the Authorization header and nowhere else: every reason and completion
this module produces is passed through `redact`, which also masks pieces of the key a server
echoes back (a masked `sk-ABCD****WXYZ` in an error body, say).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Self

import httpx2

from sbs_jax.teacher.ratelimit import RateLimiter

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})
ENDPOINTS = {"completions": "completions", "chat": "chat/completions"}
CHAT_INSTRUCTION = (
    "Continue the pattern of the examples: answer the last question with a step-by-step "
    "rationale ending in the same answer sentence the examples use. Write nothing else."
)
MAX_RETRY_AFTER_S = 600.0
CONNECTIONS_PER_POOL = 8
STARTUP_CONNECT_S = 30.0  # connection errors for this long, with no answer yet: wrong URL
CONNECT_TIMEOUT_S = 10.0  # a host that drops packets fails as a connection error


@dataclass(frozen=True)
class Generation:
    """The teacher's completions for one prompt and what they cost."""

    completions: list[str]
    prompt_tokens: int
    completion_tokens: int
    requests: int


class TeacherError(Exception):
    """One example the teacher could not answer; `reason` is safe to record (no secrets).

    `final` means asking again can never help (a re-run skips the example); HTTP failures are
    not final: the server may recover or the user may fix the settings before the re-run.
    """

    def __init__(self, reason: str, requests: int = 0, final: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.requests = requests
        self.final = final


class TeacherUnavailable(Exception):
    """The job cannot go on (bad key, wrong URL or model): every request would fail alike."""


MIN_FRAGMENT = 6  # shorter runs of the key's characters are left alone (too common)
_MARK = "\x00"  # where a piece of the key was, until the masked forms around it are found
_MASKED = re.compile(r"[\w.-]*[*\u2022]{3,}[\w.-]*")  # e.g. sk-ADVT****CRET
_MASKED_AFTER_PIECE = re.compile(_MARK + r"[*\u2022]+[\w.-]*")


def redact(text: str, secret: str | None) -> str:
    """`text` with the secret masked: the whole of it, any run of MIN_FRAGMENT or more of its
    characters in a row (a prefix, a suffix or any piece a server echoes back), and a masked form
    of it (`sk-ADVT****CRET`: the stars and what follows a piece, or a starred token beginning
    with the key's first four characters)."""
    if not secret or not text:
        return text
    grams = {secret[i:i + MIN_FRAGMENT] for i in range(len(secret) - MIN_FRAGMENT + 1)}
    pieces, start, i = [], 0, 0
    while i <= len(text) - MIN_FRAGMENT:
        if text[i:i + MIN_FRAGMENT] in grams:
            end = i + MIN_FRAGMENT
            while end < len(text) and text[i:end + 1] in secret:
                end += 1
            pieces += [text[start:i], _MARK]
            start = i = end
        else:
            i += 1
    text = _MASKED_AFTER_PIECE.sub(_MARK, "".join(pieces) + text[start:])
    head = secret[:4]
    text = _MASKED.sub(lambda m: _MARK if m.group(0).startswith(head) else m.group(0), text)
    return text.replace(_MARK, "***")


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for budgets when a server reports no usage."""
    return max(1, len(text) // 4)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def _choice_text(choice: object, endpoint: str) -> str | None:
    if not isinstance(choice, dict):
        return None
    if endpoint == "chat":
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else None


def _choice_texts(body: object, endpoint: str) -> list[str] | None:
    """The completion strings of a response body, or None when it is not the expected shape
    (any shape at all: a reply the server garbled is retried, never a crash)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return None
    texts = [_choice_text(choice, endpoint) for choice in body["choices"]]
    if not texts or any(text is None for text in texts):
        return None
    return texts


def _snippet(content: bytes, limit: int) -> str:
    return content[:limit].decode("utf-8", "replace")


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def _usage(body: dict, prompt: str, texts: list[str]) -> tuple[int, int]:
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    prompt_tokens = _count(usage.get("prompt_tokens"))
    completion_tokens = _count(usage.get("completion_tokens"))
    if prompt_tokens is None:
        prompt_tokens = estimate_tokens(prompt)
    if completion_tokens is None:
        completion_tokens = sum(estimate_tokens(t) for t in texts)
    return prompt_tokens, completion_tokens


class OpenAIBackend:
    """Async client of an OpenAI-compatible `completions` or `chat/completions` endpoint.

    Use as `async with OpenAIBackend(...) as backend: await backend.generate(prompt, k)`.
    Concurrency is bounded by the caller (the job's workers) and by the connection pool.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        endpoint: str = "completions",
        concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        seed: int | None = None,
        startup_connect_s: float = STARTUP_CONNECT_S,
    ):
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
        if not base_url:
            raise ValueError("the openai backend needs --base_url (e.g. http://host:8000/v1)")
        self.base_url = base_url.rstrip("/")
        # For messages: credentials in the URL (user:password@host) stay out of them.
        self.display_url = re.sub(r"//[^/@]*@", "//", self.base_url)
        self.model = model
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stop = stop
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self._api_key = api_key
        self._concurrency = concurrency
        self._random = random.Random(seed)
        self.startup_connect_s = startup_connect_s
        self._answered = False  # any HTTP response at all: the URL reaches a server
        self._connect_failing_since: float | None = None
        self._clients: list[httpx2.AsyncClient] = []
        self._in_flight: list[int] = []

    async def __aenter__(self) -> Self:
        # Several small connection pools: a pool's bookkeeping costs time linear in its size
        # per request, which at tens of connections dominates the client's CPU.
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        num_pools = -(-self._concurrency // CONNECTIONS_PER_POOL)
        per_pool = -(-self._concurrency // num_pools)
        tls = httpx2.create_ssl_context()  # one for all pools: each loads the CA bundle
        self._clients = [
            httpx2.AsyncClient(
                base_url=self.base_url + "/",
                headers=headers,
                timeout=httpx2.Timeout(self.timeout_s,
                                       connect=min(self.timeout_s, CONNECT_TIMEOUT_S)),
                verify=tls,
                limits=httpx2.Limits(max_connections=per_pool,
                                     max_keepalive_connections=per_pool),
            )
            for _ in range(num_pools)
        ]
        self._in_flight = [0] * num_pools
        return self

    async def __aexit__(self, *exc) -> None:
        for client in self._clients:
            await client.aclose()
        self._clients = []

    async def _post(self, body: dict) -> httpx2.Response:
        """POSTs through the least busy pool."""
        pool = min(range(len(self._clients)), key=self._in_flight.__getitem__)
        self._in_flight[pool] += 1
        try:
            return await self._clients[pool].post(ENDPOINTS[self.endpoint], json=body)
        finally:
            self._in_flight[pool] -= 1

    def _body(self, prompt: str, n: int) -> dict:
        body = {"model": self.model, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "n": n}
        if self.stop:
            body["stop"] = self.stop
        if self.endpoint == "chat":
            body["messages"] = [
                {"role": "system", "content": CHAT_INSTRUCTION},
                {"role": "user", "content": prompt},
            ]
        else:
            body["prompt"] = prompt
        return body

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: uniform in [half, all] of base * 2**attempt, capped."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        return ceiling * (0.5 + 0.5 * self._random.random())

    def _parse(self, content: bytes, prompt: str
               ) -> tuple[list[str] | None, tuple[int, int]]:
        """(completions with the key masked, token usage) of a 200 body; (None, ...) when the
        body is not the expected JSON."""
        try:
            payload = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            return None, (0, 0)
        texts = _choice_texts(payload, self.endpoint)
        if texts is None:
            return None, (0, 0)
        return [redact(t, self._api_key) for t in texts], _usage(payload, prompt, texts)

    def _check_reachable(self, reason: str) -> None:
        """Stops the job when connecting has failed for `startup_connect_s` and the server never
        answered: a wrong --base_url, a server not up, a firewall."""
        if self._answered:
            return
        now = time.monotonic()
        if self._connect_failing_since is None:
            self._connect_failing_since = now
        elif now - self._connect_failing_since >= self.startup_connect_s:
            raise TeacherUnavailable(
                f"cannot reach the teacher at {self.display_url}: connection errors for "
                f"{now - self._connect_failing_since:.0f}s since the job started (last: "
                f"{redact(reason, self._api_key)}). Check --base_url and that the server is up.")

    async def generate(self, prompt: str, num_samples: int = 1,
                       input_text: str = "") -> Generation:
        """`num_samples` completions of `prompt` (more requests when a server ignores `n`)."""
        texts: list[str] = []
        prompt_tokens = completion_tokens = requests = 0
        for _ in range(num_samples):
            if len(texts) >= num_samples:
                break
            got, used_prompt, used_completion, attempts = await self._request(
                prompt, num_samples - len(texts), requests)
            texts.extend(got)
            prompt_tokens += used_prompt
            completion_tokens += used_completion
            requests += attempts
        return Generation(texts[:num_samples], prompt_tokens, completion_tokens, requests)

    async def _request(self, prompt: str, n: int, earlier_requests: int):
        """One logical request with retries: (texts, prompt_tokens, completion_tokens, attempts)."""
        assert self._clients, "use `async with OpenAIBackend(...)`"
        body = self._body(prompt, n)
        estimate = estimate_tokens(prompt) + n * self.max_tokens
        reason = "no attempt made"
        for attempt in range(self.max_retries + 1):
            await self.limiter.acquire(estimate)
            retry_after = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await self._post(body)
            except TimeoutError:
                reason = f"timeout after {self.timeout_s:g}s"
            except httpx2.TransportError as exc:
                reason = (f"connection error to {self.display_url} ({type(exc).__name__}: "
                          f"{exc})")
                self._check_reachable(reason)
            else:
                self._answered = True
                status = response.status_code
                if status == 200:
                    texts, used = self._parse(response.content, prompt)
                    if texts is not None:
                        self.limiter.settle(estimate, sum(used))
                        return texts, used[0], used[1], attempt + 1
                    snippet = redact(_snippet(response.content, 120), self._api_key)
                    reason = f"malformed response body (not the expected JSON): {snippet!r}"
                else:
                    snippet = redact(_snippet(response.content, 200), self._api_key)
                    if status in FATAL_STATUS:
                        raise TeacherUnavailable(
                            f"teacher at {self.display_url} answered HTTP {status} "
                            f"(check the key, URL and --model {self.model!r}): {snippet}")
                    if status not in RETRYABLE_STATUS and status < 500:
                        raise TeacherError(f"HTTP {status}: {snippet}",
                                           earlier_requests + attempt + 1)
                    reason = f"HTTP {status}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
            reason = redact(reason, self._api_key)
            self.limiter.settle(estimate, 0)
            if attempt == self.max_retries:
                break
            delay = self._backoff(attempt)
            if retry_after is not None:
                delay = max(delay, retry_after)
                self.limiter.pause_for(retry_after)
            log.info("teacher request failed (%s); retry %d/%d in %.2fs",
                     reason, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
        raise TeacherError(f"{reason}; gave up after {self.max_retries + 1} attempts",
                           earlier_requests + self.max_retries + 1)
