"""The dots of a bf16 decoding step on AVX-512 BF16 CPUs: projections of a few rows and the
cross-attention of one query.

A greedy decoding step multiplies 8-32 rows by every decoder kernel and the LM head and reads
every layer's cross-attention keys and values, so it is bound by how fast those stream through
the dots. XLA:CPU's library dots stream 4-10 GB/s of bf16 weights at 8 rows and read float32
caches; `csrc/decode_kernels.cc` streams 20-35 GB/s on the same 2-core EPYC
(benchmarks/README.md) from operands laid out once per `generate` call for VDPBF16PS
(`pack_rows_kernel`, `pack_keys`, `pack_values`): the same products as XLA's dots, summed in
float32 in another order.

The kernels are XLA FFI custom calls, compiled with the system C++ compiler on first use into
`$SBS_JAX_KERNEL_CACHE` (default ~/.cache/sbs_jax/kernels), keyed by the source, the flags and
the jax version. They run only where they help and are sure to run: the CPU backend, bf16
compute, a CPU with AVX-512 BF16, a compiler that built them, and arrays on one device
(cross-attention also needs head_dim <= 128). Anything else (or SBS_JAX_ROWS_KERNEL=0) keeps
XLA's dots, with the reason logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

Array = jax.Array
TARGET = "sbs_rows_matmul_bf16"
_TARGETS = {TARGET: "SbsRowsMatmulBf16", "sbs_attention_scores_bf16": "SbsAttentionScoresBf16",
            "sbs_weighted_values_bf16": "SbsWeightedValuesBf16"}
PANEL = 32  # columns per panel (two 16-lane float32 accumulators per row)
KEY_BLOCK = 128  # keys per pass of the scores kernel
MAX_HEAD_DIM = 128  # the weighted-values kernel keeps a head's output in 8 registers
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "decode_kernels.cc"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512bf16")


def _cpu_has_avx512_bf16() -> bool:
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags


def _library_path(compiler: str) -> pathlib.Path:
    include = jax.ffi.include_dir()
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(" ".join((compiler, *_FLAGS, include, jax.__version__)).encode())
    cache = pathlib.Path(os.environ.get("SBS_JAX_KERNEL_CACHE",
                                        pathlib.Path.home() / ".cache" / "sbs_jax" / "kernels"))
    return cache / f"decode_kernels_{digest.hexdigest()[:16]}.so"


def build_library() -> pathlib.Path:
    """The compiled kernel library, built now if this source and jaxlib have no cached build.

    Raises RuntimeError naming the compiler and its message when the build fails.
    """
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    path = _library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = pathlib.Path(tmp) / path.name
        command = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCE),
                   "-o", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"building {_SOURCE.name} failed: {' '.join(command)}\n"
                               f"{done.stderr[-2000:]}")
        os.replace(out, path)  # atomic: concurrent builders each install a whole library
    return path


@functools.cache
def _registered() -> str | None:
    """None once the FFI target is registered, else why the kernel cannot be used here."""
    if jax.default_backend() != "cpu":
        return f"backend is {jax.default_backend()}"
    if not _cpu_has_avx512_bf16():
        return "this CPU has no AVX-512 BF16"
    try:
        library = ctypes.CDLL(str(build_library()))
    except (RuntimeError, OSError) as error:
        return str(error)
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return None


def _call(target: str, out: jax.ShapeDtypeStruct, *operands: Array) -> Array:
    reason = _registered()
    if reason is not None:
        raise RuntimeError(f"cpu_kernels: {target} cannot run here: {reason}")
    return jax.ffi.ffi_call(target, out)(*operands)


@functools.cache
def _log_once(reason: str) -> None:
    logging.getLogger(__name__).info("decoding uses XLA's dot, not the rows kernel: %s", reason)


def rows_kernel_usable(dtype: str, *trees: object) -> bool:
    """Whether decoding in `dtype` can use the rows kernel for these arrays (params, inputs)."""
    if os.environ.get("SBS_JAX_ROWS_KERNEL", "1").lower() in ("0", "false", "off", "no"):
        return False
    if jnp.dtype(dtype) != jnp.bfloat16:
        return False
    for leaf in jax.tree_util.tree_leaves(trees):
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
            return False  # the custom call has no partitioning rule: keep XLA's sharded dot
    reason = _registered()
    if reason is not None:
        _log_once(reason)
    return reason is None


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
    """x zero-padded at the end of `axis` to a multiple of `multiple`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, -x.shape[axis] % multiple)
    return jnp.pad(x, widths)


def pack_rows_kernel(kernel: Array) -> Array:
    """[in, out] kernel -> bf16 panels [ceil(out / 32), in / 2, 32, 2] for `rows_matmul`
    (`in` is padded to even, `out` to whole panels, with zeros)."""
    kernel = _pad_to(_pad_to(kernel.astype(jnp.bfloat16), 0, 2), 1, PANEL)
    return kernel.reshape(-1, 2, kernel.shape[1] // PANEL, PANEL).transpose(2, 0, 3, 1)


def rows_matmul(x: Array, packed: Array, features: int) -> Array:
    """float32 `x @ kernel` [..., features] for bf16 rows x [..., in] and the packed kernel."""
    x = _pad_to(x.astype(jnp.bfloat16), x.ndim - 1, 2)
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (features,), jnp.float32)
    return _call(TARGET, out, x, packed)


def pack_keys(keys: Array) -> Array:
    """Cross-attention keys [B, H, L, D] -> bf16 [B, H, D/2, L, 2] (D padded to even, L to
    whole passes of 128, with zeros) for `attention_scores`."""
    keys = _pad_to(_pad_to(keys.astype(jnp.bfloat16), 3, 2), 2, KEY_BLOCK)
    b, h, length, d = keys.shape
    return keys.reshape(b, h, length, d // 2, 2).transpose(0, 1, 3, 2, 4)


def attention_scores(query: Array, packed_keys: Array, length: int) -> Array:
    """float32 q . k [B, H, length] of one bf16 query [B, H, D] per head against packed keys."""
    query = _pad_to(query.astype(jnp.bfloat16), 2, 2)
    b, h, _, padded, _ = packed_keys.shape
    out = jax.ShapeDtypeStruct((b, h, padded), jnp.float32)
    return _call("sbs_attention_scores_bf16", out, query, packed_keys)[..., :length]


def pack_values(values: Array) -> Array:
    """Cross-attention values [B, H, L, D] -> bf16, D padded to a multiple of 16 (<= 128)."""
    if values.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"pack_values: head_dim {values.shape[-1]} > {MAX_HEAD_DIM}")
    return _pad_to(values.astype(jnp.bfloat16), 3, 16)


def weighted_values(weights: Array, packed_values: Array, head_dim: int) -> Array:
    """float32 sum_l w[l] v[l] [B, H, head_dim] for float32 weights [B, H, L] and packed values."""
    out = jax.ShapeDtypeStruct(packed_values.shape[:2] + packed_values.shape[3:], jnp.float32)
    weights = weights.astype(jnp.float32)
    return _call("sbs_weighted_values_bf16", out, weights, packed_values)[..., :head_dim]
