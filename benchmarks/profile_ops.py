"""Where the time goes: per-HLO-op time of the sbs train step or of greedy decoding on this device.

Runs the program once to compile, once under `jax.profiler`, reads the trace (XPlane protobuf,
through TensorFlow's copy of the schema) and sums the executed thunk time per HLO instruction.
Each instruction is labelled from the optimised HLO (shape, opcode, the JAX op it came from) and
grouped by pass (forward / backward / other) and by JAX op, so "the backward of the MLP" or "the
decoder step's cross-attention" show up as one line. Times are summed over XLA's threads, so on
a loaded machine they measure contention too; compare shares, not seconds.

    python benchmarks/profile_ops.py                    # sbs train step, t5_1_1_small
    python benchmarks/profile_ops.py --what decode      # greedy decoding, 64 new tokens
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sbs_step
import hf_peer

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\(.*?op_name=\"([^\"]*)\"",
    re.MULTILINE)
_SKIP = ("ThunkExecutor", "SlinkyThreadPool", "end: ")


def instruction_labels(hlo_text: str) -> dict[str, tuple[str, str] | None]:
    """HLO instruction name -> (pass, JAX op path with layer numbers folded); None for control
    flow, whose thunk time already contains its body's."""
    labels: dict[str, tuple[str, str] | None] = {}
    for name, _shape, opcode, op_name in _INSTRUCTION.findall(hlo_text):
        if opcode in ("while", "conditional", "call"):
            labels[name] = None
            continue
        where = ("backward" if "transpose(jvp" in op_name
                 else "forward" if "jvp(" in op_name
                 else "loop body" if "while/body" in op_name else "other")
        op = re.sub(r"layers_\d+", "layers_N", op_name.split("/T5.")[-1])
        labels[name] = (where, op)
    return labels


def thunk_times_ms(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
    """Summed duration and count of each executed XLA thunk (by HLO instruction name)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = max(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    times: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if name and not name.startswith(_SKIP):
                    times[name] += event.duration_ps / 1e9
                    counts[name] += 1
    return times, counts


def _program(what: str, config, batch: int, input_len: int, target_lens: tuple[int, int],
             decode_len: int):
    """(callable running the program once, jitted function name in the dump)."""
    import jax

    from sbs_jax import models
    from sbs_jax.infer import decoding

    params = models.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batches = {view: hf_peer.random_view(rng, config.vocab_size, batch, input_len, length)
               for view, length in zip(("label", "rationale"), target_lens)}
    if what == "train":
        return bench_sbs_step.ours_train(config, params, batches, 0.5), "train_step"
    enc = batches["rationale"]["encoder_input_tokens"]
    return (lambda: np.asarray(decoding.generate(config, params, enc, decode_len, eos_id=-1)),
            "run")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=("train", "decode"), default="train")
    parser.add_argument("--config", default="t5_1_1_small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=256)
    parser.add_argument("--label_len", type=int, default=8)
    parser.add_argument("--rationale_len", type=int, default=64)
    parser.add_argument("--decode_len", type=int, default=64)
    parser.add_argument("--top", type=int, default=25, help="how many JAX ops to list")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="profile_ops_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={work}/hlo").strip()
    import jax

    from sbs_jax import models

    config = models.get_config(args.config, dtype=args.dtype)
    run, module = _program(args.what, config, args.batch, args.input_len,
                           (args.label_len, args.rationale_len), args.decode_len)
    run()
    jax.profiler.start_trace(f"{work}/trace")
    run()
    jax.profiler.stop_trace()

    dumps = glob.glob(f"{work}/hlo/*jit_{module}.cpu_after_optimizations.txt") or glob.glob(
        f"{work}/hlo/*jit_{module}*after_optimizations.txt")
    with open(max(dumps, key=os.path.getsize)) as f:
        labels = instruction_labels(f.read())
    times, _ = thunk_times_ms(f"{work}/trace")
    by_pass: dict[str, float] = collections.Counter()
    by_op: dict[tuple[str, str], float] = collections.Counter()
    for name, ms in list(times.items()):
        label = labels.get(name, ("other", name))
        if label is None or name.startswith(("while", "conditional")):
            del times[name]
            continue
        where, op = label
        by_pass[where] += ms
        by_op[(where, op)] += ms
    total = sum(times.values())
    print(f"{args.what}: {total:.0f} ms of thunk time (summed over threads), "
          f"load {os.getloadavg()[0]:.1f}")
    for where, ms in sorted(by_pass.items(), key=lambda kv: -kv[1]):
        print(f"  {where:9s} {ms:9.1f} ms {100 * ms / total:5.1f}%")
    for (where, op), ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {100 * ms / total:5.1f}%  {where:9s} {op}")
    result = {"what": args.what, "config": args.config, "total_ms": total,
              "by_pass_ms": dict(by_pass), "load_average": os.getloadavg(),
              "top_ops": [{"pass": w, "op": o, "ms": ms} for (w, o), ms in
                          sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]]}
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    from sbs_jax.runtime import malloc

    malloc.ensure_preloaded()  # the allocator the jobs run on (sbs_jax/runtime/malloc.py)
    main()
