"""SwiGLU feed-forward: `down(silu(x @ Wg) ⊙ (x @ Wu))`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import ModelConfig
from qwenjax.model.params import normal_002, param


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.dtype = dtype
        self.gate_proj = param(rngs, normal_002, (d, f), (ax.EMBED, ax.MLP), param_dtype)
        self.up_proj = param(rngs, normal_002, (d, f), (ax.EMBED, ax.MLP), param_dtype)
        self.down_proj = param(rngs, normal_002, (f, d), (ax.MLP, ax.EMBED), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        cast = lambda p: p[...].astype(self.dtype)
        gate = jnp.einsum("btd,df->btf", x, cast(self.gate_proj))
        up = jnp.einsum("btd,df->btf", x, cast(self.up_proj))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, cast(self.down_proj))
