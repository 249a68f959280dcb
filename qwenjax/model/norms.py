"""RMSNorm variants of Qwen3.5: zero-centred `(1 + w)` and the gated norm of the GDN output.

Both compute in fp32 and cast back to the input dtype, as transformers does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.model.params import ones, param, zeros


def upcast(x: jax.Array) -> jax.Array:
    """At least fp32 (float64 stays float64, which lets tests check the algebra exactly)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    xf = upcast(x)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """`y = x / rms(x) * (1 + w)`; the checkpoint stores w (initialised to 0), not the scale."""

    def __init__(self, dim: int, eps: float, *, axis_name: str | None, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, zeros, (dim,), (axis_name,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = 1.0 + upcast(self.weight[...])
        return (_normalize(x, self.eps) * scale).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """`y = (w · norm(x)) · silu(z)`: norm first, then gate; plain weight (initialised to 1)."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, ones, (dim,), (None,), dtype)

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        # transformers multiplies the weight in the input dtype, then gates in fp32.
        y = self.weight[...].astype(x.dtype) * _normalize(x, self.eps).astype(x.dtype)
        return (upcast(y) * jax.nn.silu(upcast(z))).astype(x.dtype)
