"""Peak FLOP/s to divide by for MFU: measured on a CPU, published for GPUs and TPUs.

A CPU has no meaningful datasheet figure (turbo, AVX-512 down-clocking, other tenants), so its
peak is measured in the same run as the benchmark: the best of a few large matmuls in the
compute dtype (fp32 by default) through XLA (the engine our model runs on) and, when installed,
PyTorch (MKL / oneDNN, which uses AMX for bf16 where XLA:CPU does not), whichever is faster. Accelerators use the published dense bf16 peak of their `jax.Device.device_kind`.

    python benchmarks/peak.py [--size 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

# Dense (no sparsity) bf16 peak FLOP/s per JAX device, from the vendors' datasheets. Matched by
# substring of `device_kind`, first match wins, so more specific names come first. TPU v2/v3
# expose each core as a device (half a chip); v4 and later one chip (megacore) per device.
PUBLISHED_BF16_PEAK: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("H20", 148e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v2", 22.5e12),
    ("TPU v3", 61.5e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


def published_peak(device_kind: str) -> float | None:
    """Published dense bf16 FLOP/s of one device of this kind, or None when unknown."""
    for name, peak in PUBLISHED_BF16_PEAK:
        if name.lower() in device_kind.lower():
            return peak
    return None


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def jax_matmul_flops_per_s(size: int, repeats: int, dtype: str = "float32") -> float:
    """Best FLOP/s of a jitted [size, size] @ [size, size] on the default JAX device."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
    # Returned in float32: the fastest form of a bf16 dot on XLA:CPU (only that one reaches its
    # bf16 matmul kernels), so the peak is the best the device gives.
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    seconds = _best_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
    return 2 * size ** 3 / seconds


def torch_matmul_flops_per_s(size: int, repeats: int, dtype: str = "float32") -> float | None:
    """Best FLOP/s of a [size, size] matmul in PyTorch on the CPU, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(getattr(torch, dtype)) for _ in range(2))
    seconds = _best_seconds(lambda: torch.mm(a, b), repeats)
    return 2 * size ** 3 / seconds


def device_peak(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict[str, Any]:
    """The peak FLOP/s to report MFU against, with how it was obtained.

    CPU: measured matmul peak in `dtype` (max over XLA and PyTorch). GPU/TPU: published bf16
    peak of the device kind (`peak_flops_per_s` None when the kind is not in the table), plus
    the measured bf16 matmul rate for reference.
    """
    import jax

    device = jax.devices()[0]
    info: dict[str, Any] = {"platform": device.platform, "device_kind": device.device_kind,
                            "matmul_size": size}
    if device.platform == "cpu":
        info["dtype"] = dtype
        info["xla_matmul_flops_per_s"] = jax_matmul_flops_per_s(size, repeats, dtype)
        info["torch_matmul_flops_per_s"] = torch_matmul_flops_per_s(size, repeats, dtype)
        measured = [v for v in (info["xla_matmul_flops_per_s"],
                                info["torch_matmul_flops_per_s"]) if v]
        info["peak_flops_per_s"] = max(measured)
        info["peak_source"] = f"measured {dtype} matmul (best of XLA and PyTorch), this run"
    else:
        info["xla_bf16_matmul_flops_per_s"] = jax_matmul_flops_per_s(
            max(size, 8192), repeats, "bfloat16")
        info["peak_flops_per_s"] = published_peak(device.device_kind)
        info["peak_source"] = "published dense bf16 peak of the device kind"
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="matmul side length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="CPU matmul dtype (float32, bfloat16)")
    args = parser.parse_args(argv)
    info = device_peak(args.size, args.repeats, args.dtype)
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
    sys.exit(0)
