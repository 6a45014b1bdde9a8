"""Greedy decoding speed of two revisions of sbs-jax on this machine, in alternating processes.

Each revision is exported with `git archive` into a temporary folder and timed in a child
process of its own (`python decode_revisions.py --child`, that tree first on the path):
`decoding.generate(method="greedy")` of random-init weights, EOS off so every row decodes
exactly `--decode_len` tokens, compiled and warmed up first, best of `--calls` timed calls.
Rounds alternate the revisions (the order reversed every other round) so load from other
processes hits both alike; medians over rounds are reported. Prints a markdown table, then JSON.

    python benchmarks/decode_revisions.py --base REV --head HEAD [--dtypes bfloat16 float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _child(args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    from sbs_jax import models
    from sbs_jax.infer import decoding

    config = models.get_config(args.config, dtype=args.dtype)
    params = models.init_params(models.get_config(args.config), jax.random.PRNGKey(0))
    enc = np.random.default_rng(0).integers(2, config.vocab_size, (args.batch, args.input_len))
    enc = enc.astype(np.int32)

    def run():
        return decoding.generate(config, params, enc, args.decode_len, eos_id=-1)

    np.asarray(run())  # compile + warm-up
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        np.asarray(run())
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": min(times)}))


def _export(repo: str, rev: str, into: str) -> str:
    archive = subprocess.run(["git", "-C", repo, "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="git revision (the peer)")
    parser.add_argument("--head", default="HEAD", help="git revision measured against it")
    parser.add_argument("--config", default="t5_1_1_small")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=256)
    parser.add_argument("--decode_len", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3, help="timed calls a process (best)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.base is None:
        parser.error("--base is required")

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = [f"--{k}={getattr(args, k)}" for k in ("config", "batch", "input_len",
                                                    "decode_len", "calls")]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: _export(repo, rev, tempfile.mkdtemp(dir=tmp)) for rev in
                 (args.base, args.head)}
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for dtype in args.dtypes:
                for rev in list(trees)[:: 1 if r % 2 == 0 else -1]:
                    env = {**os.environ, "PYTHONPATH": trees[rev]}
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                          f"--dtype={dtype}", *shared],
                                         env=env, cwd=trees[rev], check=True,
                                         capture_output=True, text=True).stdout
                    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
                    times.setdefault((dtype, rev), []).append(seconds)
    tokens = args.batch * args.decode_len
    rows = []
    for dtype in args.dtypes:
        base, head = (statistics.median(times[(dtype, rev)]) for rev in (args.base, args.head))
        rows.append({"dtype": dtype, "base_s": base, "head_s": head, "base_tokens_per_s":
                     tokens / base, "head_tokens_per_s": tokens / head, "head_over_base":
                     base / head, "all_s": {rev: times[(dtype, rev)] for rev in trees}})
    print(f"| dtype | {args.base} s | tokens/s | {args.head} s | tokens/s | speed {args.head} / "
          f"{args.base} |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['base_s']:.3f} | {r['base_tokens_per_s']:.0f} | "
              f"{r['head_s']:.3f} | {r['head_tokens_per_s']:.0f} | {r['head_over_base']:.2f} |")
    print(json.dumps({"config": args.config, "batch": args.batch, "input_len": args.input_len,
                      "decode_len": args.decode_len, "rows": rows,
                      "load_average": os.getloadavg(), "cpu_count": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
