"""The OpenAI-compatible backend against a real fake server: retries, Retry-After, timeouts,
malformed bodies, refusals, sampling top-ups, the chat endpoint, and the rate limiter."""

import asyncio
import email.utils
import time

import pytest
from fake_teacher import FakeTeacher

from sbs_jax.teacher.http_backend import (
    OpenAIBackend,
    TeacherError,
    TeacherUnavailable,
    parse_retry_after,
    redact,
)
from sbs_jax.teacher.ratelimit import RateLimiter, TokenBucket

KEY = "sk-test-SECRET-0123456789"


def _generate(teacher, prompt, num_samples=1, **kwargs):
    # Timeouts with room for a loaded machine, except where a hang is scripted.
    options = {"api_key": KEY, "timeout_s": 2.0, "max_retries": 3, "backoff_base_s": 0.01,
               "backoff_max_s": 0.05, "seed": 0}
    options.update(kwargs)

    async def go():
        async with OpenAIBackend(teacher.base_url, "fake-model", **options) as backend:
            return await backend.generate(prompt, num_samples)

    return asyncio.run(go())


@pytest.mark.parametrize("faults,requests,timeout_s", [
    (["500", "503"], 3, 2.0),
    (["hang"], 2, 0.5),
    (["malformed"], 2, 2.0),
])
def test_transient_faults_are_retried_until_an_answer(faults, requests, timeout_s):
    with FakeTeacher(faults={"X": faults}) as teacher:
        generation = _generate(teacher, "question X", timeout_s=timeout_s)
        assert generation.completions == ["The teacher thought about it. So the answer is 42."]
        assert generation.requests == requests
        assert teacher.requests_by_marker["X"] == requests
        assert set(teacher.auth_headers) == {f"Bearer {KEY}"}


def test_retry_after_seconds_is_honoured():
    with FakeTeacher(faults={"X": ["429"]}, retry_after_s=1) as teacher:
        start = time.monotonic()
        generation = _generate(teacher, "question X")
        assert time.monotonic() - start >= 1.0  # backoff alone would be ~0.01 s
        assert generation.requests == 2 and teacher.requests == 2


def test_retry_after_http_date_is_honoured():
    with FakeTeacher(faults={"X": ["429-date"]}, retry_after_s=2) as teacher:
        start = time.monotonic()
        _generate(teacher, "question X")
        # The date has one-second resolution: the wait is between 1 and 2 s.
        assert time.monotonic() - start >= 0.9
        assert teacher.requests == 2


def test_parse_retry_after():
    now = time.time()
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == \
        pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_retries_run_out_with_a_reason_and_a_count():
    with FakeTeacher(faults={"X": ["500"] * 10}) as teacher:
        with pytest.raises(TeacherError) as info:
            _generate(teacher, "question X", max_retries=2)
        assert not info.value.final and info.value.requests == 3
        assert "HTTP 500" in info.value.reason and "3 attempts" in info.value.reason
        assert teacher.requests == 3


def test_timeouts_run_out():
    with FakeTeacher(faults={"X": ["hang"] * 5}, hang_s=2) as teacher:
        start = time.monotonic()
        with pytest.raises(TeacherError, match="timeout after 0.2s"):
            _generate(teacher, "question X", max_retries=1, timeout_s=0.2)
        assert time.monotonic() - start < 1.5
        assert teacher.requests == 2


def test_refused_key_stops_the_job_without_leaking_it():
    with FakeTeacher(faults={"X": ["401"]}) as teacher:
        with pytest.raises(TeacherUnavailable) as info:
            _generate(teacher, "question X")
        assert "401" in str(info.value) and KEY not in str(info.value)
        assert teacher.requests == 1


def test_server_ignoring_n_gets_topped_up():
    with FakeTeacher(max_samples_per_request=1) as teacher:
        generation = _generate(teacher, "question", num_samples=3)
        assert len(generation.completions) == 3 and generation.requests == 3


def test_chat_endpoint_and_usage():
    with FakeTeacher(max_samples_per_request=None) as teacher:
        generation = _generate(teacher, "one two three", num_samples=2, endpoint="chat")
        assert len(generation.completions) == 2
        assert generation.prompt_tokens == 3  # what the server reported
        assert generation.requests == 1


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(60, clock=lambda: now[0])  # one unit a second, burst of 60
    bucket.take(60)
    assert bucket.wait_time(1) == pytest.approx(1.0)
    now[0] = 30.0
    assert bucket.wait_time(30) == 0.0 and bucket.wait_time(31) == pytest.approx(1.0)
    assert TokenBucket(None).wait_time(10**9) == 0.0


def test_rate_limiter_spaces_requests():
    async def go():
        limiter = RateLimiter(requests_per_minute=600)  # burst 600, then 10 a second
        limiter.requests.take(600)  # burst used up
        start = time.monotonic()
        for _ in range(3):
            await limiter.acquire(1)
        return time.monotonic() - start

    assert asyncio.run(go()) >= 0.25


def test_rate_limiter_pause_holds_everyone():
    async def go():
        limiter = RateLimiter()
        limiter.pause_for(0.3)
        start = time.monotonic()
        await asyncio.gather(limiter.acquire(1), limiter.acquire(1))
        return time.monotonic() - start

    assert asyncio.run(go()) >= 0.29


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("action", ["message-string", "no-choices", "empty-choices",
                                    "wrong-types", "json-list"])
def test_a_misshapen_200_reply_is_retried_not_a_crash(action, endpoint):
    with FakeTeacher(faults={"X": [action, action]}) as teacher:
        generation = _generate(teacher, "question X", endpoint=endpoint)
        assert generation.completions == ["The teacher thought about it. So the answer is 42."]
        assert generation.requests == 3 and teacher.requests_by_marker["X"] == 3
        with pytest.raises(TeacherError, match="malformed response body") as info:
            teacher.faults["X"] = [action] * 3
            _generate(teacher, "question X", endpoint=endpoint, max_retries=2)
        assert info.value.requests == 3 and not info.value.final


def test_pieces_of_the_key_a_server_echoes_are_masked():
    with FakeTeacher(faults={"X": ["401-masked-key"], "Y": ["400-key-piece"]}) as teacher:
        with pytest.raises(TeacherUnavailable) as info:
            _generate(teacher, "question X")
        message = str(info.value)
        assert "Incorrect API key: ***" in message
        assert KEY[:7] not in message and KEY[-4:] not in message
        with pytest.raises(TeacherError) as error:
            _generate(teacher, "question Y")
        assert "HTTP 400" in error.value.reason and KEY[3:12] not in error.value.reason


def test_redact_masks_whole_key_fragments_and_masked_forms():
    key = "sk-ADVT0123456789SECRET"
    assert redact(f"key {key}!", key) == "key ***!"
    assert redact("given sk-ADVT****CRET here", key) == "given *** here"
    assert redact("tail 6789SECRET, head sk-ADV", key) == "tail ***, head ***"
    assert redact("sk-A****ET", key) == "***"
    assert redact("short 0123 and SECRE and ADVT0 stay", key) == \
        "short 0123 and SECRE and ADVT0 stay"
    assert redact("***bold*** and a **** b", key) == "***bold*** and a **** b"
    assert redact("anything", None) == "anything"


def test_a_wrong_url_fails_fast_and_names_it():
    async def go():
        async with OpenAIBackend("http://127.0.0.1:9/v1", "m", max_retries=50,
                                 backoff_base_s=0.05, backoff_max_s=0.2,
                                 startup_connect_s=1.0) as backend:
            await backend.generate("question")

    start = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=r"cannot reach the teacher at "
                                                 r"http://127\.0\.0\.1:9/v1.*--base_url"):
        asyncio.run(go())
    assert time.monotonic() - start < 30  # 50 retries would take far longer
