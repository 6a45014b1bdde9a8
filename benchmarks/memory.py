"""Compile-only memory accounting of a run's sbs train step and greedy decoding, per device.

Compiles the real step (`sbs_jax.train.step.jit_train_step`: both views, the run's optimizer,
micro-batches, mesh and shardings, from the same gin files as `sbs_jax.train`) and the eval loop's
`decoding.generate`, from abstract shapes only: no data, no parameters, no accelerator. XLA's
`compiled.memory_analysis()` gives, per device, the arguments, outputs, aliases (donated state
reused for the new state) and temporaries; peak = arguments + outputs - aliases + temporaries.
Batches are the worst case a run meets: BATCH_SIZE rows at TASK_FEATURE_LENGTHS (the caps), or
the packed features at the same size with `RunConfig.pack`. The vocabulary is the model
config's (T5's 32,128 unless `RunConfig.model_overrides` says otherwise).

The mesh's devices are virtual CPU devices (`--xla_force_host_platform_device_count`), so any
mesh compiles on any machine. XLA:CPU's buffer assignment is not the GPU's or TPU's (it also
computes some bf16 operations in float32), so `fits` leaves 10% of the device's memory free.

    python benchmarks/memory.py --gin_file=gin/sbs_large.gin --device_memory_gb=80 \
        [--gin.X=...] [--mesh_shape=1,8,1 | --num_devices=8] [--json_out=F] [--no_generate]

Prints a table, then JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import results

FITS_FRACTION = 0.9
_GB = 1e9


def _mesh_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("(", "").replace(")", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh_shape={text!r}: write DATA,FSDP,MODEL") from None
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"--mesh_shape={text!r}: three sizes (data, fsdp, model)")
    return shape


def resolve_mesh(mesh_shape: tuple[int, ...], num_devices: int | None) -> tuple[int, int, int]:
    """MESH_SHAPE with its -1 resolved by `num_devices` (default: the -1 stands for 1)."""
    known = 1
    for size in mesh_shape:
        known *= size if size != -1 else 1
    if -1 not in mesh_shape:
        if num_devices not in (None, known):
            raise ValueError(f"--num_devices={num_devices} disagrees with MESH_SHAPE={mesh_shape}")
        return tuple(mesh_shape)
    total = num_devices or known
    if total % known:
        raise ValueError(f"--num_devices={total} is not divisible by MESH_SHAPE={mesh_shape}")
    return tuple(total // known if s == -1 else s for s in mesh_shape)


def memory_stats(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled program, and its peak."""
    stats = compiled.memory_analysis()
    out = {"argument_bytes": int(stats.argument_size_in_bytes),
           "output_bytes": int(stats.output_size_in_bytes),
           "alias_bytes": int(stats.alias_size_in_bytes),
           "temp_bytes": int(stats.temp_size_in_bytes)}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"])
    return out


def _compile(jitted: Any, args: tuple, context: Any) -> dict[str, Any]:
    start = time.perf_counter()
    with context:
        lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {**memory_stats(compiled), "lower_s": round(lowered_at - start, 2),
            "compile_s": round(done - lowered_at, 2)}


def feature_lengths(cfg: Any) -> dict[str, int]:
    """The run's caps; `rationale_targets` only for a run that trains on rationales."""
    from sbs_jax.data import packing

    lengths = packing.caps(cfg.task_feature_lengths)
    if cfg.rationale_mixture_name is None:
        del lengths["rationale_targets"]
    return lengths


def train_step_memory(cfg: Any, model_config: Any, partitioner: Any) -> dict[str, Any]:
    """Memory of the run's jitted train step on BATCH_SIZE rows at the feature caps."""
    from sbs_jax import models
    from sbs_jax.train import run_setup
    from sbs_jax.train import step as step_lib

    tx, schedule = run_setup.optimizer(cfg)
    jitted = step_lib.jit_train_step(partitioner, models.T5(model_config), tx, schedule,
                                     run_setup.step_options(cfg))
    lengths = feature_lengths(cfg)
    batches = {"label": step_lib.abstract_batch(partitioner.batch_sharding, cfg.batch_size,
                                                lengths["inputs"], lengths["targets"], cfg.pack)}
    if "rationale_targets" in lengths:
        batches["rationale"] = step_lib.abstract_batch(
            partitioner.batch_sharding, cfg.batch_size, lengths["inputs"],
            lengths["rationale_targets"], cfg.pack)
    return _compile(jitted, (partitioner.abstract_state(tx), batches), partitioner.context())


def generate_memory(cfg: Any, model_config: Any, partitioner: Any) -> dict[str, Any]:
    """Memory of greedy decoding as the eval loop runs it: EVAL_BATCH_SIZE rows of inputs at
    the input cap, `max_decode_len` new tokens, params at the run's shardings."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from sbs_jax.infer import decoding

    shards = partitioner.num_data_shards
    rows = -(-cfg.eval_batch_size // shards) * shards
    tokens = jax.ShapeDtypeStruct((rows, int(cfg.task_feature_lengths["inputs"])), jnp.int32,
                                  sharding=partitioner.batch_sharding)
    replicated = NamedSharding(partitioner.mesh, PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    # The jitted decoder `generate` runs (greedy, on the run's mesh and rules).
    jitted = decoding.jitted_decoder(model_config, int(cfg.max_decode_len), "greedy",
                                     mesh=partitioner.mesh, axis_rules=partitioner.rules)
    return _compile(jitted, (partitioner.abstract_params, tokens, scalar, key),
                    partitioner.context())


def _gb(value: float) -> str:
    return f"{value / _GB:.2f}"


def markdown_table(result: dict[str, Any]) -> str:
    lines = [("| program | arguments GB | outputs GB | aliased GB | temporaries GB | peak GB | "
              "fits | compile s |"), "|---|---|---|---|---|---|---|---|"]
    for name in ("train_step", "generate"):
        r = result.get(name)
        if r is None:
            continue
        fits = r["peak_bytes"] <= FITS_FRACTION * result["device_memory_bytes"]
        lines.append(f"| {name} | {_gb(r['argument_bytes'])} | {_gb(r['output_bytes'])} | "
                     f"{_gb(r['alias_bytes'])} | {_gb(r['temp_bytes'])} | {_gb(r['peak_bytes'])} "
                     f"| {'yes' if fits else 'NO'} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from sbs_jax.runtime import gin_utils

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gin_utils.add_gin_flags(parser)
    parser.add_argument("--device_memory_gb", type=float, required=True,
                        help="memory of one device in GB (1e9 bytes), e.g. 80 for an H100/A100 "
                             "80GB, 32 for a TPU v4 chip")
    parser.add_argument("--mesh_shape", type=_mesh_shape,
                        help="DATA,FSDP,MODEL (default: the gin MESH_SHAPE)")
    parser.add_argument("--num_devices", type=int,
                        help="devices a -1 in the mesh shape stands for (default: 1)")
    parser.add_argument("--no_generate", action="store_true", help="account the train step only")
    parser.add_argument("--json_out", help="also write the JSON result to this file")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sbs_jax.runtime import gin_utils
    from sbs_jax.train import run_config

    parser = build_parser()
    args = gin_utils.parse_gin_flags(parser, argv)
    import gin

    if gin.query_parameter("%MODEL_DIR") is None:  # required by RunConfig, never written here
        gin.parse_config("MODEL_DIR = '(not used by memory.py)'")
    try:
        cfg = run_config.from_gin()
        mesh_shape = resolve_mesh(args.mesh_shape or cfg.mesh_shape, args.num_devices)
    except ValueError as exc:
        gin_utils.fail(parser, exc)
    num_devices = mesh_shape[0] * mesh_shape[1] * mesh_shape[2]
    # Before any JAX backend starts (parsing gin imported jax but started none).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={num_devices}").strip()
    import jax

    jax.config.update("jax_platforms", "cpu")
    from sbs_jax import models
    from sbs_jax.train import partitioning
    from sbs_jax.train import step as step_lib

    model_config = models.get_config(cfg.model_name, **cfg.model_overrides)
    mesh = partitioning.make_mesh(mesh_shape, jax.devices()[:num_devices])
    try:
        step_lib.check_batch_size(cfg.batch_size, mesh, cfg.num_microbatches)
    except ValueError as exc:
        gin_utils.fail(parser, exc)
    partitioner = partitioning.Partitioner(mesh, partitioning.logical_axis_rules(cfg.fsdp),
                                           model_config)
    programs = {"train_step": train_step_memory(cfg, model_config, partitioner)}
    if not args.no_generate:
        programs["generate"] = generate_memory(cfg, model_config, partitioner)
    device_bytes = int(args.device_memory_gb * _GB)
    peak = max(p["peak_bytes"] for p in programs.values())
    result = {
        "gin_files": args.gin_file, "model_name": cfg.model_name,
        "dtype": model_config.dtype, "param_dtype": model_config.param_dtype,
        "scan_layers": model_config.scan_layers, "remat_policy": model_config.remat_policy,
        "num_microbatches": cfg.num_microbatches, "batch_size": cfg.batch_size,
        "feature_lengths": feature_lengths(cfg), "pack": cfg.pack,
        "eval_batch_size": cfg.eval_batch_size, "max_decode_len": cfg.max_decode_len,
        "vocab_size": model_config.vocab_size, "mesh_shape": list(mesh_shape), "fsdp": cfg.fsdp,
        "optimizer": cfg.optimizer, "num_devices": num_devices,
        "num_params": int(sum(x.size for x in jax.tree.leaves(partitioner.abstract_params))),
        **programs,
        "peak_bytes_per_device": peak, "peak_gb_per_device": round(peak / _GB, 2),
        "device_memory_bytes": device_bytes, "fits_fraction": FITS_FRACTION,
        "fits": peak <= FITS_FRACTION * device_bytes,
        "compile_s": round(sum(p["lower_s"] + p["compile_s"] for p in programs.values()), 2),
        "compiled_on": f"XLA:{jax.devices()[0].platform.upper()} ({num_devices} virtual devices)",
        "jax_version": jax.__version__,
    }
    print(markdown_table(result))
    return results.emit(result, args.json_out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
    sys.exit(0)
