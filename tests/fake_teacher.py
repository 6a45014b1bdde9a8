"""A fake OpenAI-compatible teacher: a real HTTP server on 127.0.0.1 with scripted faults.

The teacher job must survive what real servers do, so this server can, per prompt, answer 429
with a Retry-After (seconds or HTTP date), 500, hang past the client's timeout, send a body that
is not JSON or JSON of the wrong shape (MISSHAPEN), send a completion with no parsable answer,
or refuse the key (401), echoing it back masked (`sk-ABCD****WXYZ`) or a piece of it. A fault
script maps a marker (any substring of the prompt) to the actions of successive requests whose
prompt contains it; once the list is used up the server answers normally. It counts requests per
marker and keeps every Authorization header it saw.

Also runnable as a process for benchmarks: `python tests/fake_teacher.py --latency_s 0.2`
prints the port on its first line. It also records the most requests it had in flight at once.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

ACTIONS = ("ok", "429", "429-date", "500", "503", "hang", "malformed", "noanswer", "401",
           "message-string", "no-choices", "empty-choices", "wrong-types", "json-list",
           "401-masked-key", "400-key-piece")
# 200 replies of the wrong shape, each of which a client must retry rather than crash on.
MISSHAPEN = {
    "message-string": {"choices": [{"index": 0, "message": "just a string", "text": 7}]},
    "no-choices": {"id": "x", "object": "text_completion"},
    "empty-choices": {"choices": [], "usage": {"prompt_tokens": 3}},
    "wrong-types": {"choices": [{"index": 0, "text": ["a"], "message": {"content": 5}}],
                    "usage": {"prompt_tokens": "many", "completion_tokens": None}},
    "json-list": [{"text": "a list, not an object"}],
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 resets connections at concurrency 64


def default_answer(prompt: str) -> str:
    return "The teacher thought about it. So the answer is 42."


class FakeTeacher:
    """Serves `answer(prompt) -> completion` with `latency_s` delay and scripted `faults`."""

    def __init__(
        self,
        answer: Callable[[str], str] = default_answer,
        faults: dict[str, list[str]] | None = None,
        latency_s: float = 0.0,
        retry_after_s: int = 1,
        hang_s: float = 5.0,
        max_samples_per_request: int | None = None,
    ):
        for actions in (faults or {}).values():
            unknown = set(actions) - set(ACTIONS)
            if unknown:
                raise ValueError(f"unknown fault actions {unknown}; use {ACTIONS}")
        self.answer = answer
        self.faults = {marker: list(actions) for marker, actions in (faults or {}).items()}
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.max_samples_per_request = max_samples_per_request
        self.requests = 0
        self.requests_by_marker: Counter = Counter()
        self.prompts: list[str] = []
        self.auth_headers: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.requests_by_marker.clear()
            self.prompts.clear()

    def _next_action(self, prompt: str, auth: str) -> str:
        with self._lock:
            self.requests += 1
            self.prompts.append(prompt)
            self.auth_headers.append(auth)
            action = "ok"
            for marker, actions in self.faults.items():
                if marker in prompt:
                    self.requests_by_marker[marker] += 1
                    if actions:
                        action = actions.pop(0)
                    break
            return action

    def _handler_class(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers and body wait on delayed ACKs (40 ms)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                chat = self.path.endswith("/chat/completions")
                prompt = request["messages"][-1]["content"] if chat else request["prompt"]
                auth = self.headers.get("Authorization", "")
                action = teacher._next_action(prompt, auth)
                self.key = auth.removeprefix("Bearer ")
                with teacher._lock:
                    teacher.in_flight += 1
                    teacher.max_in_flight = max(teacher.max_in_flight, teacher.in_flight)
                try:
                    if teacher.latency_s:
                        time.sleep(teacher.latency_s)
                    self._respond(action, prompt, request, chat)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with teacher._lock:
                        teacher.in_flight -= 1

            def _respond(self, action: str, prompt: str, request: dict, chat: bool) -> None:
                if action == "hang":
                    teacher._stop.wait(teacher.hang_s)
                    self.close_connection = True
                    return
                if action in ("429", "429-date"):
                    value = str(teacher.retry_after_s)
                    if action == "429-date":
                        value = email.utils.formatdate(time.time() + teacher.retry_after_s,
                                                       usegmt=True)
                    self._send(429, b'{"error": "rate limited"}', {"Retry-After": value})
                    return
                if action in ("500", "503"):
                    self._send(int(action), b'{"error": "internal"}')
                    return
                if action == "401":
                    self._send(401, b'{"error": "invalid api key"}')
                    return
                if action == "401-masked-key":
                    shown = f"{self.key[:7]}****{self.key[-4:]}"
                    self._send(401, json.dumps({"error": f"Incorrect API key: {shown}"}).encode())
                    return
                if action == "400-key-piece":
                    piece = self.key[3:12]
                    self._send(400, json.dumps({"error": f"bad request for {piece}"}).encode())
                    return
                if action in MISSHAPEN:
                    self._send(200, json.dumps(MISSHAPEN[action]).encode())
                    return
                if action == "malformed":
                    self._send(200, b'{"choices": [{"text": "trunc')
                    return
                n = int(request.get("n", 1))
                if teacher.max_samples_per_request:
                    n = min(n, teacher.max_samples_per_request)
                texts = ["I am not sure about this one."] * n if action == "noanswer" else [
                    teacher.answer(prompt) for _ in range(n)]
                choices = [{"index": i, "message": {"role": "assistant", "content": t}}
                           if chat else {"index": i, "text": t} for i, t in enumerate(texts)]
                usage = {"prompt_tokens": len(prompt.split()),
                         "completion_tokens": sum(len(t.split()) for t in texts)}
                self._send(200, json.dumps({"choices": choices, "usage": usage}).encode())

        return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency_s", type=float, default=0.2)
    args = parser.parse_args(argv)
    with FakeTeacher(latency_s=args.latency_s) as teacher:
        print(teacher._server.server_address[1], flush=True)
        try:
            teacher._stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    sys.exit(main())
