"""`bench_sbs_step.py --batches ...`: ours and the HF peer over a set of batch sizes (GPU runs).

The peer (benchmarks/hf_peer.py) runs first, in its own process, so a JAX process (whose
allocator takes 75% of a GPU) and PyTorch never hold the card at once. Then ours, in the calling
process, batch sizes in increasing order; a batch that runs out of memory is recorded as such
and larger ones are skipped on that side. Compile seconds = first call minus a timed call; peak
memory = JAX `memory_stats()["peak_bytes_in_use"]` (process-wide, so monotone over the sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import flops
import hf_peer
import numpy as np
import peak


def peer_process(args: argparse.Namespace) -> dict:
    """The HF peer's sweep (benchmarks/hf_peer.py) in its own process: its JSON, or its error."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hf_peer.json")
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "hf_peer.py"),
               "--config", args.config, "--dtype", args.dtype,
               "--batches", *map(str, args.batches),
               "--decode_batches", *map(str, args.decode_batches),
               "--input_len", str(args.input_len), "--label_len", str(args.label_len),
               "--rationale_len", str(args.rationale_len), "--decode_len", str(args.decode_len),
               "--alpha", str(args.alpha), "--rounds", str(args.rounds), "--json_out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            return {"error": proc.stderr[-3000:]}
        with open(out) as f:
            return json.load(f)


def _out_of_memory(exc: Exception) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _ours_sweep(args: argparse.Namespace, config, ours_train: Callable) -> dict[str, dict]:
    """Our train step per batch of `--batches` and greedy decoding per `--decode_batches`,
    increasing; after an out-of-memory batch the larger ones are skipped."""
    import gc

    import jax

    from sbs_jax import models
    from sbs_jax.infer import decoding

    params = models.init_params(config, jax.random.PRNGKey(0))
    rows: dict[str, dict] = {"train": {}, "decode": {}}

    def measure(kind, batch, make_run):
        try:
            run = make_run()
            t = hf_peer.timed(run, args.rounds)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            rows[kind][str(batch)] = {"oom": str(exc).splitlines()[0][:300]}
            return False
        rows[kind][str(batch)] = {**t, "compile_s": max(0.0, t["first_call_s"] - t["seconds"]),
                                  "peak_bytes": _device_peak_bytes()}
        del run
        gc.collect()
        return True

    for batch in sorted(args.batches):
        views = hf_peer.random_views(config.vocab_size, batch, args.input_len, args.label_len,
                                     args.rationale_len)
        microbatches = (max(1, batch // args.rows_per_microbatch) if args.rows_per_microbatch
                        else args.num_microbatches)
        if not measure("train", batch, lambda views=views, m=microbatches: ours_train(
                config, params, views, args.alpha, m)):
            break
        rows["train"][str(batch)]["num_microbatches"] = microbatches
    for batch in sorted(args.decode_batches):
        enc = hf_peer.random_views(config.vocab_size, batch, args.input_len, args.label_len,
                                   args.rationale_len)["rationale"]["encoder_input_tokens"]

        def make_decode(enc=enc):
            return lambda: np.asarray(decoding.generate(config, params, enc, args.decode_len,
                                                        eos_id=-1))
        if not measure("decode", batch, make_decode):
            break
    return rows


def _sweep_rows(args, config, ours: dict, peer: dict | None, peak_flops: float | None
                ) -> list[dict]:
    """One row per (program, batch, side): seconds, tokens/s, MFU, compile s, peak GB."""
    rows = []
    for kind in ("train", "decode"):
        for batch in sorted(int(b) for b in set(ours[kind]) | set((peer or {}).get(kind, {}))):
            if kind == "train":
                work = flops.sbs_step_flops(config, batch, args.input_len, args.label_len,
                                            args.rationale_len)["total"]
                tokens = batch * (2 * args.input_len + args.label_len + args.rationale_len)
            else:
                work = flops.greedy_decode_flops(config, batch, args.input_len, args.decode_len)
                tokens = batch * args.decode_len
            for side, found in (("ours", ours), ("hf", peer or {})):
                r = found.get(kind, {}).get(str(batch))
                if r is None:
                    continue
                row = {"what": kind, "batch": batch, "side": side, **r}
                if "seconds" in r:
                    row.update(tokens_per_s=tokens / r["seconds"], flops_per_s=work / r["seconds"],
                               mfu=work / r["seconds"] / peak_flops if peak_flops else None)
                rows.append(row)
    return rows


def _goals(rows: list[dict]) -> dict[str, Any]:
    """The GPU goals, each figure beside its target under "targets" (None where this run has
    no figure for it)."""
    def get(what, side, batch, key):
        for r in rows:
            if (r["what"], r["side"], r["batch"]) == (what, side, batch) and key in r:
                return r[key]
        return None

    def ratio(what, batch, key="tokens_per_s"):
        ours, hf = get(what, "ours", batch, key), get(what, "hf", batch, key)
        return ours / hf if ours and hf else None

    hf_fit = [r["batch"] for r in rows if (r["what"], r["side"]) == ("train", "hf")
              and "seconds" in r]
    ours_fit = [r["batch"] for r in rows if (r["what"], r["side"]) == ("train", "ours")
                and "seconds" in r]
    speed = (get("train", "ours", max(ours_fit), "tokens_per_s")
             / get("train", "hf", max(hf_fit), "tokens_per_s") if hf_fit and ours_fit else None)
    peaks = (get("train", "ours", 32, "peak_bytes"), get("train", "hf", 32, "peak_bytes"))
    compiles = [r["compile_s"] for r in rows if r["side"] == "ours" and "compile_s" in r]
    return {
        "train_mfu_batch_64": get("train", "ours", 64, "mfu"),
        "train_tokens_per_s_vs_hf_largest_fit": speed,
        "peak_memory_batch_32_vs_hf": peaks[0] / peaks[1] if all(peaks) else None,
        "decode_vs_hf": {b: ratio("decode", b) for b in (8, 32)},
        "max_compile_s": max(compiles) if compiles else None,
        "targets": {"train_mfu_batch_64": ">= 0.45", "train_tokens_per_s_vs_hf_largest_fit":
                    ">= 4", "peak_memory_batch_32_vs_hf": "<= 0.5", "decode_vs_hf": ">= 10",
                    "max_compile_s": "< 60"},
    }


def sweep(args: argparse.Namespace, config, peer: dict | None, ours_train: Callable) -> dict:
    """Ours on every batch size (`ours_train(config, params, views, alpha, microbatches)` makes
    a step), beside the peer's figures from its own process."""
    peak_info = peak.device_peak(dtype=args.dtype)
    ours = _ours_sweep(args, config, ours_train)
    rows = _sweep_rows(args, config, ours, peer if peer and "error" not in peer else None,
                       peak_info["peak_flops_per_s"])
    lines = ["| what | batch | side | s | tokens/s | MFU | compile s | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "oom" in r:
            lines.append(f"| {r['what']} | {r['batch']} | {r['side']} | out of memory | | | | |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if not r.get("peak_bytes") else f"{r['peak_bytes'] / 1e9:.1f}"
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        lines.append(f"| {r['what']} | {r['batch']} | {r['side']} | {r['seconds']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {mfu} | {compile_s} | {mem} |")
    print("\n".join(lines))
    return {"batches": args.batches, "decode_batches": args.decode_batches, "peak": peak_info,
            "rows": rows, "peer": {k: v for k, v in (peer or {}).items()
                                   if k not in ("train", "decode")},
            "goals": _goals(rows)}
