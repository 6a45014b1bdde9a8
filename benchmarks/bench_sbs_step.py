"""The sbs train step and greedy decoding: ours vs the HF PyTorch reference recipe, with MFU.

Train step. Ours: `sbs_jax.train.step.make_train_step` (one jitted, buffer-donating step that runs
the label view and the rationale view of the same examples, AdamW, clip 1.0, linear decay).
Peer (benchmarks/hf_peer.py): the reference recipe in HF PyTorch on the same device — two
forward passes (label, rationale) of `T5ForConditionalGeneration`, `alpha * label_loss +
(1 - alpha) * rationale_loss`, backward, clip 1.0, AdamW + linear decay. Dropout 0.1 on in both.
Every target token is real (no padding), so tokens/s = batch x (input + label + input +
rationale) per step. Decoding. Ours: `sbs_jax.infer.decoding.generate(method="greedy")`; peer: HF
`generate` greedy; EOS disabled in both so each decodes exactly `--decode_len` tokens per row.

MFU = model FLOPs per second (benchmarks/flops.py) / the device peak (benchmarks/peak.py: on a
CPU the best large-matmul rate in the compute dtype measured in this run, before and after the
timings, the higher of the two; on a GPU/TPU the published bf16 peak of its device kind).

One batch (the default; the CPU figures): ours and the peers in one process with the same
weights, rounds alternating so load from other processes hits all alike, medians; with
`--dtype bfloat16` HF also runs under CPU bf16 autocast as a second peer, and every row also
gives its FLOP/s as a fraction of the fp32 peak. Goals on CPU: train ratio >= 2, train MFU >=
60%, decode ratio >= 3.

Several batches (`--batches 8 32 64`, what benchmarks/accelerator_check.sh runs on a GPU): the
peer first, in its own process (bf16 autocast + fused AdamW; bf16 weights for generate), then
ours in this one, batch sizes in increasing order; a batch that runs out of memory on one side
is recorded as such and larger ones are skipped there. Per batch: seconds, tokens/s, MFU,
compile seconds (first call minus a timed call) and peak device memory (JAX
`memory_stats()["peak_bytes_in_use"]`, process-wide; torch `max_memory_allocated`). Imports no
TensorFlow, SeqIO or gin: a GPU host with jax, flax, optax, orbax, torch and transformers runs it.

    python benchmarks/bench_sbs_step.py [--config t5_1_1_small] [--dtype bfloat16] [--rounds 3]
    python benchmarks/bench_sbs_step.py --config t5_1_1_large --dtype bfloat16 --scan_layers \
        --batches 8 32 64 --decode_batches 8 32 [--json_out F]

Prints a markdown table, then JSON.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops
import hf_peer
import peak
import results
import step_sweep


def sbs_step(config, params, alpha: float, num_microbatches: int = 1
             ) -> tuple[Callable, Callable]:
    """Our sbs train step (`step_lib.make_train_step`, AdamW) on one device, from `params`:
    (to_device, run): `to_device({view: numpy batch})` places a batch, `run(placed)` steps the
    state it keeps and returns the loss (not waited for)."""
    import jax

    from sbs_jax import models
    from sbs_jax.train import optim, partitioning
    from sbs_jax.train import step as step_lib

    mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
    part = partitioning.Partitioner(mesh, partitioning.logical_axis_rules(), config)
    schedule = optim.make_schedule("linear", 1e-4, total_steps=10_000)
    tx = optim.make_optimizer(schedule)
    state = {"s": step_lib.init_state(part, config, tx, seed=0, params=params)}
    step = step_lib.make_train_step(part, models.T5(config), tx, schedule,
                                    step_lib.StepOptions(alpha=alpha,
                                                        num_microbatches=num_microbatches))

    def to_device(batches: dict) -> dict:
        return {v: step_lib.global_batch(b, part.batch_sharding, len(b["encoder_input_tokens"]))
                for v, b in batches.items()}

    def run(placed: dict):
        state["s"], metrics = step(state["s"], placed)
        return metrics["loss"]
    return to_device, run


def ours_train(config, params, batches: dict, alpha: float,
               num_microbatches: int = 1) -> Callable[[], None]:
    """One timed sbs train step of ours on `batches` (placed once), blocking until done."""
    to_device, step = sbs_step(config, params, alpha, num_microbatches)
    placed = to_device(batches)
    return lambda: step(placed).block_until_ready()


def _median_timings(fns: dict[str, Callable[[], None]], rounds: int,
                    settle_s: float) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each function over `rounds`, the order reversed every other round, and
    the seconds of each one's first call (compilation, warm-up).

    Each timed call starts after `settle_s` of idle: the previous call's worker threads keep
    spinning for a while after it returns (PyTorch's OpenMP pool) and would slow the next call
    on a machine with few cores.
    """
    first = {}
    for name, fn in fns.items():  # warm-up / compile
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fn = fns[name]
            time.sleep(settle_s)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, first


def _row(name: str, seconds: float, tokens: int, flop: int, peaks: dict[str, float | None],
         peers: dict[str, float] | None = None) -> dict[str, Any]:
    """One table row; `peers` maps a peer ("hf": the fp32 reference recipe, "hf_bf16": it under
    bf16 autocast) to its seconds, `peaks` "mfu" (compute dtype) / "fp32" to FLOP/s."""
    achieved = flop / seconds
    peers = peers or {}
    return {"what": name, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ratio_vs_hf": peers["hf"] / seconds if "hf" in peers else None,
            "ratio_vs_hf_bf16": peers["hf_bf16"] / seconds if "hf_bf16" in peers else None,
            "flops_per_s": achieved,
            "mfu": achieved / peaks["mfu"] if peaks.get("mfu") else None,
            "fraction_of_fp32_peak": achieved / peaks["fp32"] if peaks.get("fp32") else None}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value, spec, scale=1.0, unit=""):
        return "-" if value is None else format(scale * value, spec) + unit

    lines = ["| what | s | tokens/s | ours/HF fp32 | ours/HF bf16 | GFLOP/s | MFU | of fp32 peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{fmt(r['ratio_vs_hf'], '.2f')} | {fmt(r['ratio_vs_hf_bf16'], '.2f')} | "
                     f"{r['flops_per_s'] / 1e9:.1f} | {fmt(r['mfu'], '.1f', 100, '%')} | "
                     f"{fmt(r['fraction_of_fp32_peak'], '.1f', 100, '%')} |")
    return "\n".join(lines)


def single_batch(args: argparse.Namespace, config) -> dict:
    """Ours and the HF peers (on a CPU) in one process on one batch, with the same weights."""
    import jax

    from sbs_jax import models
    from sbs_jax.infer import decoding

    device = jax.devices()[0]
    use_hf = not args.no_hf and device.platform == "cpu"
    # bf16 compute on a CPU: HF also runs under bf16 autocast, and MFU is also given against
    # the fp32 peak (the goal's denominator).
    hf_peers = {"hf": False, "hf_bf16": True} if args.dtype == "bfloat16" else {"hf": False}
    peak_dtypes = sorted({args.dtype, "float32"}) if device.platform == "cpu" else [args.dtype]
    peaks_before = {d: peak.device_peak(dtype=d) for d in peak_dtypes}

    batches = hf_peer.random_views(config.vocab_size, args.batch, args.input_len,
                                   args.label_len, args.rationale_len)
    # Unscanned float32 params (the HF export's layout); the compute dtype is config.dtype.
    params = models.init_params(models.get_config(args.config), jax.random.PRNGKey(0))
    if use_hf:  # one export; the trained copy's updates never reach the decoded one
        hf_model = hf_peer.hf_model(models.get_config(args.config), params)
        hf_train_model = copy.deepcopy(hf_model)
    if config.scan_layers:
        params = models.stack_layers(params)

    train_fns = {"ours": ours_train(config, params, batches, args.alpha, args.num_microbatches)}
    if use_hf:
        for name, bf16 in hf_peers.items():
            train_fns[name] = hf_peer.train_fn(hf_train_model, batches, args.alpha, bf16)
    train_s, train_first = _median_timings(train_fns, args.rounds, args.settle_s)

    enc = batches["rationale"]["encoder_input_tokens"]
    decode_fns, outputs = {}, {}
    if not args.no_decode:
        def ours_decode():
            outputs["ours"] = np.asarray(decoding.generate(config, params, enc, args.decode_len,
                                                           eos_id=-1))
        decode_fns["ours"] = ours_decode
        if use_hf:
            for name, bf16 in hf_peers.items():
                decode_fns[name] = hf_peer.decode_fn(hf_model, enc, args.decode_len, bf16,
                                                     outputs, name)
    decode_s, decode_first = (_median_timings(decode_fns, args.rounds, args.settle_s)
                              if decode_fns else ({}, {}))
    peaks_after = {d: peak.device_peak(dtype=d) for d in peak_dtypes}
    peak_used = {d: max(peaks_before[d]["peak_flops_per_s"] or 0.0,
                        peaks_after[d]["peak_flops_per_s"] or 0.0) or None for d in peak_dtypes}
    peaks = {"mfu": peak_used[args.dtype], "fp32": peak_used.get("float32")
             if args.dtype != "float32" else None}

    step_flops = flops.sbs_step_flops(config, args.batch, args.input_len, args.label_len,
                                      args.rationale_len)["total"]
    step_tokens = args.batch * (2 * args.input_len + args.label_len + args.rationale_len)
    peer_names = {"hf": "HF PyTorch fp32", "hf_bf16": "HF PyTorch bf16 autocast"}
    rows = [_row("sbs train step, ours", train_s["ours"], step_tokens, step_flops, peaks,
                 {k: v for k, v in train_s.items() if k != "ours"})]
    rows += [_row(f"sbs train step, {peer_names[k]}", v, step_tokens, step_flops, peaks)
             for k, v in train_s.items() if k != "ours"]
    if decode_s:
        decode_flops = flops.greedy_decode_flops(config, args.batch, args.input_len,
                                                 args.decode_len)
        new_tokens = args.batch * args.decode_len
        rows.append(_row("greedy decode, ours", decode_s["ours"], new_tokens, decode_flops,
                         peaks, {k: v for k, v in decode_s.items() if k != "ours"}))
        rows += [_row(f"greedy decode, {peer_names[k]} generate", v, new_tokens, decode_flops,
                      peaks) for k, v in decode_s.items() if k != "ours"]
    print(markdown_table(rows))
    return {
        "batch": args.batch, "settle_s": args.settle_s,
        "peak": {"before": peaks_before, "after": peaks_after, "used_flops_per_s": peak_used},
        "sbs_step_flops": step_flops, "sbs_step_tokens": step_tokens, "rows": rows,
        "compile_s": {"train": train_first["ours"] - train_s["ours"],
                      "decode": (decode_first["ours"] - decode_s["ours"]) if decode_s else None},
        "same_greedy_tokens": {k: bool(np.array_equal(outputs["ours"], v))
                               for k, v in outputs.items() if k != "ours"},
        "greedy_token_agreement": {k: float(np.mean(outputs["ours"] == v))
                                   for k, v in outputs.items() if k != "ours"},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="t5_1_1_small", help="a sbs_jax.models config name")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    parser.add_argument("--scan_layers", action="store_true")
    parser.add_argument("--remat_policy", default="none", help="none, minimal, full")
    parser.add_argument("--num_microbatches", type=int, default=1)
    parser.add_argument("--rows_per_microbatch", type=int,
                        help="with --batches: micro-batches of this many rows (batch 64 / 4 = 16 "
                             "is what gin/sbs_large.gin runs) instead of --num_microbatches")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+",
                        help="a set of batch sizes, the peer in its own process (GPU runs)")
    parser.add_argument("--decode_batches", type=int, nargs="*", default=[8, 32],
                        help="with --batches: the batch sizes to decode")
    parser.add_argument("--input_len", type=int, default=256)
    parser.add_argument("--label_len", type=int, default=8)
    parser.add_argument("--rationale_len", type=int, default=64)
    parser.add_argument("--decode_len", type=int, default=64, help="new tokens per row")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle_s", type=float, default=0.5,
                        help="idle seconds before each timed call (lets spinning threads stop)")
    parser.add_argument("--no_hf", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--no_decode", action="store_true", help="time the train step only")
    parser.add_argument("--json_out", help="also write the JSON result to this file")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from sbs_jax import models
    from sbs_jax.runtime import malloc

    config = models.get_config(args.config, dtype=args.dtype, scan_layers=args.scan_layers,
                               remat_policy=args.remat_policy)
    # The peer's process runs (and exits) before this one's JAX takes the device.
    peer = None if args.no_hf or not args.batches else step_sweep.peer_process(args)
    run = (single_batch(args, config) if not args.batches
           else step_sweep.sweep(args, config, peer, ours_train))
    import jax

    device = jax.devices()[0]
    result = {
        "config": args.config, "dtype": args.dtype, "scan_layers": args.scan_layers,
        "remat_policy": args.remat_policy, "num_microbatches": args.num_microbatches,
        "rows_per_microbatch": args.rows_per_microbatch,
        "input_len": args.input_len, "label_len": args.label_len,
        "rationale_len": args.rationale_len, "decode_len": args.decode_len,
        "rounds": args.rounds,
        "device": {"platform": device.platform, "device_kind": device.device_kind,
                   "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "load_average": os.getloadavg(), "allocator": malloc.active_allocator(),
        "jax_version": jax.__version__, **run,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    return results.emit(result, args.json_out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sbs_jax.runtime import malloc

    malloc.ensure_preloaded()  # the allocator the jobs run on (sbs_jax/runtime/malloc.py)
    main()
