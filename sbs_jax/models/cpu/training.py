"""Training on the CPU backend: the projections' kernel gradients as one dot of the stored
operands.

JAX transposes `x [batch, length, in] @ kernel [in, out]` into a kernel gradient computed as
[out, in] and then transposed; XLA:CPU materialises the cotangent transposed for it, recomputing
the elementwise chain that produced it (GELU derivative, dropout mask) at a large read stride,
which makes CPU training steps markedly slower (benchmarks/README.md). Here the kernel gradient
is one dot contracting the leading axes of x and the cotangent as stored, into [in, out], summed
in float32 into the kernel's dtype; the values are the same products. The custom VJP hides the
dots from remat policies, so on the CPU `minimal` saves what `full` saves.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sbs_jax.models import layers
from sbs_jax.models.t5 import T5, T5Config


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, kernel: jax.Array, out_dtype: str | None) -> jax.Array:
    """`layers.dot(x, kernel, out_dtype=out_dtype)`, with the kernel gradient described above."""
    return layers.dot(x, kernel, out_dtype=out_dtype)


def _matmul_fwd(x, kernel, out_dtype):
    return matmul(x, kernel, out_dtype), (x, kernel)


def _matmul_bwd(out_dtype, residuals, grad):
    del out_dtype
    x, kernel = residuals
    grad = grad.astype(x.dtype)
    grad_x = jax.lax.dot_general(grad, kernel.astype(x.dtype), (((grad.ndim - 1,), (1,)), ((), ())))
    lead = tuple(range(x.ndim - 1))
    grad_kernel = jax.lax.dot_general(x, grad, ((lead, lead), ((), ())),
                                      preferred_element_type=jnp.float32)
    return grad_x, grad_kernel.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _projections(next_fun, args, kwargs, context):
    """Method interceptor: a `layers.Dense` call with its kernel in place becomes `matmul`."""
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, layers.Dense)
            or not module.has_variable("params", "kernel")):
        return next_fun(*args, **kwargs)
    kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
    return matmul(args[0].astype(module.config.dtype), kernel, module.out_dtype)


class CpuTrainingT5(T5):
    """`T5` whose projections take `matmul`'s gradient while it is applied."""

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(_projections):
            return super().apply(*args, **kwargs)


def training_model(config: T5Config) -> T5:
    """The model a training loop differentiates: `CpuTrainingT5` on the CPU backend, else `T5`
    (the same parameters and outputs)."""
    return CpuTrainingT5(config) if jax.default_backend() == "cpu" else T5(config)
