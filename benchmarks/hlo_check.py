"""Collectives and copies in the compiled sbs train step on a (data, fsdp, model) mesh.

Throughput with 1-8 virtual CPU devices is not a speed figure (they share the same cores), but
the compiled step shows what a real mesh would communicate: this compiles the production step
(`sbs_jax.train.step.train_step` with the trainer's shardings) and lists every all-gather,
all-reduce, reduce-scatter, all-to-all, collective-permute and copy with its shape, mesh groups
and the JAX operation it came from, grouped and counted. Prints JSON. On the 2x2x2 mesh the
step should gather every kernel over fsdp, all-reduce over model after the row-parallel
matmuls, and never gather an activation over the global batch: tests/test_hlo_check.py checks
that.

With `--microbatches M` it also reports where the fsdp all-gathers of the parameters run: all
inside the gradient-accumulation loop's body and no gathered parameter in its carry is what
keeps one micro-batch's gathered kernels, not all of them, live at a time.

    python benchmarks/hlo_check.py [--mesh 2 2 2] [--config t5_1_1_small --layers 2] [--pack]
        [--microbatches 2]
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
_FLOATS = ("f32", "bf16", "f16")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|"
                     r"called_computations)=(\{[^}]*\}|%[\w.\-]+)")
_WHILE = re.compile(r"=\s+(\(.*?\))\s+while\(.*?body=%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
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


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """The instruction lines of each computation of an HLO module text, and the entry's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def reachable(comps: dict[str, list[str]], root: str) -> set[str]:
    """`root` and every computation it calls, directly or not (loops, fusions, reductions)."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            for group in _CALLED.findall(line):
                todo.extend(n.lstrip("%") for n in re.findall(r"%[\w.\-]+", group))
    return seen


def microbatch_loop(hlo_text: str, num_microbatches: int) -> dict:
    """The gradient-accumulation loop: the entry computation's while loop that runs
    `num_microbatches` times with the largest carry. Returns its carried arrays
    ((dtype, dims) each) and its body's computations."""
    comps, entry = computations(hlo_text)
    loops = []
    for line in comps[entry]:
        match = _WHILE.search(line)
        trips = _TRIP_COUNT.search(line)
        if match and trips and int(trips.group(1)) == num_microbatches:
            loops.append((_leaves(match.group(1)), match.group(2)))
    if not loops:
        raise ValueError(f"no while loop of {num_microbatches} trips in the entry computation")
    carry, body = max(loops, key=lambda loop: len(loop[0]))
    return {"carry": carry, "body": reachable(comps, body), "entry": reachable(comps, entry),
            "computations": comps}


def gathered_param_shapes(partitioner) -> set[tuple[int, ...]]:
    """Per-device shapes of parameters gathered over the fsdp axis (still split over the
    model axis), per layer too for scanned stacks; shapes that some parameter also has
    as its own shard are left out, so finding one means a gathered copy."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    def without_fsdp(spec):
        def drop(axes):
            if isinstance(axes, tuple):
                kept = tuple(a for a in axes if a != "fsdp")
                return kept or None
            return None if axes == "fsdp" else axes
        return PartitionSpec(*(drop(axes) for axes in spec))

    from sbs_jax import models

    params = jax.tree.leaves(partitioner.abstract_params)
    names = [box.names for box in jax.tree.leaves(
        models.abstract_params(partitioner.config), is_leaf=lambda x: hasattr(x, "names"))]
    shards = {tuple(p.sharding.shard_shape(p.shape)) for p in params}
    gathered = set()
    for p, axes in zip(params, names, strict=True):
        full = NamedSharding(partitioner.mesh, without_fsdp(p.sharding.spec))
        shape = tuple(full.shard_shape(p.shape))
        if shape != tuple(p.sharding.shard_shape(p.shape)):
            gathered.add(shape)
            if axes[0] == "layers":
                gathered.add(shape[1:])
    return gathered - shards


def loop_report(hlo_text: str, num_microbatches: int,
                gathered_shapes: set[tuple[int, ...]]) -> dict:
    """Where the fsdp all-gathers of a micro-batched step run: gathered parameters carried
    through the accumulation loop (live for all of it), and all-gathers of parameters inside
    the loop body vs outside it."""
    loop = microbatch_loop(hlo_text, num_microbatches)
    comps = loop["computations"]

    def gathers(names):
        found = collectives("\n".join(line for n in names for line in comps[n]))
        return [e for e in found["all-gather"]
                if any(tuple(dims) in gathered_shapes for _, dims in _leaves(e["shape"]))]

    return {
        "carried_gathered_params": [f"{dtype}{list(dims)}" for dtype, dims in loop["carry"]
                                    if dtype in _FLOATS and tuple(dims) in gathered_shapes],
        "param_all_gathers_in_loop": sum(e["count"] for e in gathers(loop["body"])),
        "param_all_gathers_outside_loop": gathers(loop["entry"] - loop["body"]),
    }


def _step_setup(config_name: str, layers: int, mesh_shape: tuple[int, int, int],
                **config_overrides):
    import jax

    from sbs_jax import models
    from sbs_jax.train import partitioning

    config = models.get_config(config_name, num_encoder_layers=layers,
                               num_decoder_layers=layers, **config_overrides)
    mesh = partitioning.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    return config, partitioning.Partitioner(mesh, partitioning.logical_axis_rules(), config)


def compiled_step_text(config_name: str, layers: int, mesh_shape: tuple[int, int, int],
                       batch: int, input_len: int, label_len: int, rationale_len: int,
                       packed: bool = False, num_microbatches: int = 1,
                       **config_overrides) -> str:
    """HLO text of the compiled sbs step (`step_lib.jit_train_step`, AdamW, both views) on the
    given mesh; `packed` adds the segment ids of packed batches (`RunConfig.pack`)."""
    from sbs_jax import models
    from sbs_jax.train import optim
    from sbs_jax.train import step as step_lib

    config, part = _step_setup(config_name, layers, mesh_shape, **config_overrides)
    schedule = optim.make_schedule("linear", 1e-4, total_steps=100)
    tx = optim.make_optimizer(schedule)
    jitted = step_lib.jit_train_step(part, models.T5(config), tx, schedule,
                                     step_lib.StepOptions(num_microbatches=num_microbatches))
    batches = {view: step_lib.abstract_batch(part.batch_sharding, batch, input_len, length,
                                             packed)
               for view, length in (("label", label_len), ("rationale", rationale_len))}
    with part.context():
        return jitted.lower(part.abstract_state(tx), batches).compile().as_text()


def gathered_shapes_of(config_name: str, layers: int, mesh_shape: tuple[int, int, int],
                       **config_overrides) -> set[tuple[int, ...]]:
    """`gathered_param_shapes` of the step `compiled_step_text` compiles with these settings."""
    return gathered_param_shapes(_step_setup(config_name, layers, mesh_shape,
                                             **config_overrides)[1])


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
    parser.add_argument("--microbatches", type=int, default=1,
                        help="gradient accumulation steps; > 1 also reports where the fsdp "
                             "all-gathers run relative to the accumulation loop")
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
                              packed=args.pack, num_microbatches=args.microbatches)
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(text)
    found = collectives(text)
    result = {"mesh": list(args.mesh), "config": args.config, "layers": args.layers,
              "packed": args.pack,
              "totals": {k: sum(e["count"] for e in v) for k, v in found.items()},
              "result_bytes": result_bytes(found),
              "batch_all_gathers": batch_all_gathers(found, args.batch),
              "microbatch_loop": (loop_report(text, args.microbatches, gathered_shapes_of(
                  args.config, args.layers, tuple(args.mesh))) if args.microbatches > 1
                                  else None),
              "collectives": found}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
