"""Collectives and copies in the compiled sbs train step on a (data, fsdp, model) mesh.

Throughput with 1-8 virtual CPU devices is not a speed figure (they share the same cores), but
the compiled step shows what a real mesh would communicate: this compiles the production step
(`sbs_jax.trainer.train_step` with the trainer's shardings) and lists every all-gather,
all-reduce, reduce-scatter, all-to-all, collective-permute and copy with its shape, mesh groups
and the JAX operation it came from, grouped and counted. Prints JSON. WORKSPACE.md records what
was found for the 2x2x2 mesh.

    python benchmarks/hlo_check.py [--mesh 2 2 2] [--config t5_1_1_small --layers 2] [--pack]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = f32[2,64]{1,0} all-gather(...)` or a tuple `%name = (f32[2], /*index=5*/f32[]) ...`,
# also the -start halves of async collectives.
_OP = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s+=\s+(.+?)\s+(" + "|".join(COLLECTIVES)
                 + r"|copy)(?:-start)?\(")
_LEAF = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_GROUPS = re.compile(r"replica_groups=(\S+?)(?:,\s*\w+=|\s*$|,\s*metadata)")


def _source(line: str) -> str:
    """The JAX operation an HLO instruction came from, trimmed to its last path parts."""
    match = _OP_NAME.search(line)
    if not match:
        return "?"
    parts = [p for p in match.group(1).split("/") if p and not p.startswith("jit(")]
    return "/".join(parts[-4:])


def collectives(hlo_text: str) -> dict[str, list[dict]]:
    """Every collective / copy instruction of an HLO module text, grouped by kind, with counts
    of identical (shape, groups, source) entries."""
    found: dict[str, collections.Counter] = {k: collections.Counter()
                                              for k in (*COLLECTIVES, "copy")}
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match or "-done(" in line:
            continue
        shape, kind = match.group(1), match.group(2)
        groups = _GROUPS.search(line)
        found[kind][(shape, groups.group(1) if groups else "", _source(line))] += 1
    return {kind: [{"shape": s, "groups": g, "source": src, "count": n}
                   for (s, g, src), n in sorted(counter.items(), key=lambda kv: -kv[1])]
            for kind, counter in found.items()}


def _leaves(shape: str) -> list[tuple[str, list[int]]]:
    """(dtype, dims) of each array of an HLO result shape (one, or each of a tuple's)."""
    return [(dtype, [int(d) for d in dims.split(",") if d])
            for dtype, dims in _LEAF.findall(shape)]


def result_bytes(found: dict[str, list[dict]]) -> dict[str, int]:
    """Bytes of the results of each kind of instruction, summed over the step: what the
    collectives deliver, independent of how XLA's combiners group them into tuples."""
    return {kind: sum(e["count"] * _DTYPE_BYTES.get(dtype, 4) * int(np.prod(dims, dtype=np.int64))
                      for e in entries for dtype, dims in _leaves(e["shape"]))
            for kind, entries in found.items()}


def batch_all_gathers(found: dict[str, list[dict]], global_batch: int) -> list[dict]:
    """All-gathers of activations over the batch: rank >= 3 results whose leading dimension is
    the global batch (every rank then holds every example's activations)."""
    return [e for e in found["all-gather"]
            if any(len(dims) >= 3 and dims[0] == global_batch for _, dims in _leaves(e["shape"]))]


def compiled_step_text(config_name: str, layers: int, mesh_shape: tuple[int, int, int],
                       batch: int, input_len: int, label_len: int, rationale_len: int,
                       packed: bool = False, **config_overrides) -> str:
    """HLO text of the compiled sbs step (AdamW, both views) on the given mesh; `packed` adds
    the segment ids of packed batches (`RunConfig.pack`)."""
    import functools

    import jax

    from sbs_jax import models, optim, partitioning, trainer

    config = models.get_config(config_name, num_encoder_layers=layers,
                               num_decoder_layers=layers, **config_overrides)
    mesh = partitioning.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    part = trainer.Partitioner(mesh, partitioning.logical_axis_rules(), config)
    schedule = optim.make_schedule("linear", 1e-4, total_steps=100)
    tx = optim.make_optimizer(schedule)
    step = functools.partial(trainer.train_step, model=models.T5(config), tx=tx,
                             schedule=schedule, options=trainer.StepOptions(),
                             batch_sharding=part.batch_sharding)
    shardings = part.state_shardings(tx)
    jitted = jax.jit(step, in_shardings=(shardings, part.batch_sharding),
                     out_shardings=(shardings, part.replicated), donate_argnums=(0,))
    abstract_state = trainer.TrainState(
        step=jax.ShapeDtypeStruct((), np.int32, sharding=part.replicated),
        params=part.abstract_params,
        opt_state=jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(tx.init, part.abstract_params), shardings.opt_state))

    def view(length):
        spec = jax.ShapeDtypeStruct((batch, length), np.int32, sharding=part.batch_sharding)
        inputs = jax.ShapeDtypeStruct((batch, input_len), np.int32, sharding=part.batch_sharding)
        features = {"encoder_input_tokens": inputs, "decoder_input_tokens": spec,
                    "decoder_target_tokens": spec, "decoder_loss_weights": spec}
        if packed:
            features.update(encoder_segment_ids=inputs, decoder_segment_ids=spec)
        return features

    with part.context():
        lowered = jitted.lower(abstract_state, {"label": view(label_len),
                                                "rationale": view(rationale_len)})
        return lowered.compile().as_text()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", type=int, nargs=3, default=(2, 2, 2),
                        metavar=("DATA", "FSDP", "MODEL"))
    parser.add_argument("--config", default="t5_1_1_small")
    parser.add_argument("--layers", type=int, default=2, help="layers per stack")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=64)
    parser.add_argument("--label_len", type=int, default=8)
    parser.add_argument("--rationale_len", type=int, default=32)
    parser.add_argument("--pack", action="store_true", help="packed batches (segment ids)")
    parser.add_argument("--hlo_out", help="also write the compiled HLO text here")
    args = parser.parse_args(argv)

    devices = 1
    for size in args.mesh:
        devices *= size
    flag = f"--xla_force_host_platform_device_count={devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    text = compiled_step_text(args.config, args.layers, tuple(args.mesh), args.batch,
                              args.input_len, args.label_len, args.rationale_len,
                              packed=args.pack)
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(text)
    found = collectives(text)
    result = {"mesh": list(args.mesh), "config": args.config, "layers": args.layers,
              "packed": args.pack,
              "totals": {k: sum(e["count"] for e in v) for k, v in found.items()},
              "result_bytes": result_bytes(found),
              "batch_all_gathers": batch_all_gathers(found, args.batch),
              "collectives": found}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
