"""Async token-bucket rate limiting: requests per minute and tokens per minute.

Hosted teacher APIs meter both requests and tokens per minute; going over either earns 429s that
cost a whole backoff. The limiter lets a burst of up to one minute's allowance through, then
admits work at the refill rate. Tokens are charged with an estimate before a request and trued up
with the server-reported usage afterwards (the balance may go negative: later requests wait).
A 429's Retry-After pauses every caller, not only the one that saw it.
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """A bucket of `per_minute` units refilled continuously; `None` means unlimited."""

    def __init__(self, per_minute: float | None, clock=time.monotonic):
        if per_minute is not None and per_minute <= 0:
            raise ValueError(f"rate limit must be > 0 per minute, got {per_minute}")
        self.per_minute = per_minute
        self._clock = clock
        self._level = float(per_minute or 0)
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        if self.per_minute is not None:
            rate = self.per_minute / 60.0
            self._level = min(self.per_minute, self._level + (now - self._stamp) * rate)
        self._stamp = now

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` units are available (0 when they are now)."""
        if self.per_minute is None:
            return 0.0
        self._refill()
        # A request larger than the whole bucket is admitted when the bucket is full.
        needed = min(amount, self.per_minute) - self._level
        return max(0.0, needed / (self.per_minute / 60.0))

    def take(self, amount: float) -> None:
        if self.per_minute is not None:
            self._refill()
            self._level -= amount

    def give_back(self, amount: float) -> None:
        """Corrects an estimate: positive returns units, negative charges more."""
        if self.per_minute is not None:
            self._refill()
            self._level = min(self.per_minute, self._level + amount)


class RateLimiter:
    """Admits requests under both a request and a token budget, plus server-requested pauses."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        clock=time.monotonic,
    ):
        self._clock = clock
        self.requests = TokenBucket(requests_per_minute, clock)
        self.tokens = TokenBucket(tokens_per_minute, clock)
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self._unlimited = requests_per_minute is None and tokens_per_minute is None

    def pause_for(self, seconds: float) -> None:
        """Holds every new request back for `seconds` (a server's Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def acquire(self, estimated_tokens: float) -> None:
        """Waits until one request of `estimated_tokens` fits both budgets, then charges it.

        The lock makes callers queue in arrival order, so a large request is not starved.
        """
        if self._unlimited and self._paused_until <= self._clock():
            return
        async with self._lock:
            while True:
                wait = max(
                    self._paused_until - self._clock(),
                    self.requests.wait_time(1),
                    self.tokens.wait_time(estimated_tokens),
                )
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self.requests.take(1)
            self.tokens.take(estimated_tokens)

    def settle(self, estimated_tokens: float, actual_tokens: float) -> None:
        """Trues up the token budget once the server reports what a request really used."""
        self.tokens.give_back(estimated_tokens - actual_tokens)
