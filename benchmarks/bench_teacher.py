"""Teacher job throughput against a local OpenAI-compatible server with a fixed latency.

With latency L and C requests in flight, no client can beat C / L requests per second; this
measures the whole job (prompting, HTTP, parsing, voting, committing shards) against that bound
at concurrency 1, 4, 16 and 64 and prints JSON. Target: at least 0.9 of the bound at 64.
Beside it, in the same run, a bare asyncio HTTP client (the peer) shows what the machine and
server allow at all: on a loaded machine both fall short of the bound together.
The server (tests/fake_teacher.py) runs in its own process so it does not share our event loop.

    python benchmarks/bench_teacher.py [--latency_s 0.2] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measure(base_url: str, concurrency: int, rounds: int, work_dir: str) -> dict:
    from sbs_jax.data import synthetic
    from sbs_jax.teacher import job
    from sbs_jax.teacher.http_backend import OpenAIBackend
    from sbs_jax.teacher.inputs import TeacherInput
    from sbs_jax.teacher.prompts import load_prompt

    count = max(concurrency * rounds, 16)
    examples = [TeacherInput(r.id, r.input, r.label)
                for r in synthetic.generate(count, seed=concurrency, split="train")]
    backend = OpenAIBackend(base_url, "fake", concurrency=concurrency, timeout_s=30,
                            max_retries=0)
    options = job.JobOptions(dataset="synthetic", split="train", teacher="fake",
                             output_dir=os.path.join(work_dir, f"c{concurrency}"),
                             concurrency=concurrency, shard_size=count)
    start, cpu_start = time.perf_counter(), time.process_time()
    stats = asyncio.run(job.run_job(examples, backend, load_prompt("synthetic"), options, {}))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert stats["requests"] == count and stats["failed"] == 0, stats
    return {"concurrency": concurrency, "requests": count, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(count / elapsed, 2),
            "client_cpu_ms_per_request": round(1000 * cpu / count, 3)}


async def _raw_peer(port: int, concurrency: int, count: int) -> float:
    """Requests/s of a minimal keep-alive HTTP/1.1 client on raw asyncio streams: what this
    machine and server allow at all, measured beside the job in the same run."""
    body = json.dumps({"model": "fake", "prompt": "Q: 1 + 2\nA:", "n": 1}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
               f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    remaining = [count]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while remaining[0] > 0:
            remaining[0] -= 1
            writer.write(request)
            headers = await reader.readuntil(b"\r\n\r\n")
            length = int(headers.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            json.loads(await reader.readexactly(length))
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency_s", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=8, help="requests per worker")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args(argv)

    from sbs_jax.runtime.tf_setup import tf  # noqa: F401  (import once, outside the timed part)

    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "fake_teacher.py"),
         "--latency_s", str(args.latency_s)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        base_url = f"http://127.0.0.1:{port}/v1"
        results = []
        with tempfile.TemporaryDirectory() as work_dir:
            _measure(base_url, 4, 2, os.path.join(work_dir, "warm-up"))  # first-use costs
            for concurrency in args.concurrency:
                result = _measure(base_url, concurrency, args.rounds, work_dir)
                bound = concurrency / args.latency_s
                result["fraction_of_bound"] = round(result["requests_per_s"] / bound, 3)
                peer = asyncio.run(_raw_peer(port, concurrency, result["requests"]))
                result["raw_client_peer_fraction_of_bound"] = round(peer / bound, 3)
                results.append(result)
    finally:
        server.kill()
        server.wait()
    at_64 = next((r["fraction_of_bound"] for r in results if r["concurrency"] == 64), None)
    print(json.dumps({"benchmark": "teacher_http_throughput", "latency_s": args.latency_s,
                      "results": results, "target_fraction_at_64": 0.9,
                      "meets_target": None if at_64 is None else at_64 >= 0.9}, indent=1))


if __name__ == "__main__":
    main()
