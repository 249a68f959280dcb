"""Build a model from a config (random or shape-only)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.model import Qwen35


def build(
    config: ModelConfig,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype | None = None,
    abstract: bool = False,
    seed: int = 0,
) -> Qwen35:
    """A model with HF-style random init; `abstract=True` gives shapes only (no memory).

    Args:
      config: the model configuration.
      dtype: compute dtype (activations and matmuls).
      param_dtype: parameter dtype, default `dtype` (use fp32 master weights with bf16 compute).
      abstract: return a model whose parameters are `jax.ShapeDtypeStruct`s.
      seed: PRNG seed for the initialisation.
    """
    make = lambda: Qwen35(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    return nnx.eval_shape(make) if abstract else make()


def param_count(model: Qwen35, *, include_mtp: bool = True) -> int:
    """Number of parameters in a (possibly abstract) model."""
    state = nnx.state(model, nnx.Param)
    total = 0
    for path, leaf in nnx.to_flat_state(state):
        if include_mtp or path[0] != "mtp":
            total += leaf.get_value().size if hasattr(leaf, "get_value") else leaf.value.size
    return total
