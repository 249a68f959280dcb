"""Parameter constructors: every parameter gets an initialiser, a dtype and logical axis names."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Init = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

normal_002: Init = nnx.initializers.normal(0.02)  # HF init for Linear, Conv and Embedding
zeros: Init = nnx.initializers.zeros
ones: Init = nnx.initializers.ones


def param(
    rngs: nnx.Rngs,
    init: Init,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
    """A parameter annotated with logical axis names (placed on devices later, by the mesh rules)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False
    )
