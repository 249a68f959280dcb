"""What the Pallas kernels share: where a GPU kernel runs (decided when lowering rather than when
tracing), and the layer index of a stacked cache as a kernel reads it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def triton_or_interpreted(run: Callable[..., Any], interpret: bool | None, *args: Any) -> Any:
    """`run(interpret, *args)`; `interpret=None` stages both through `lax.platform_dependent`:
    `run(False, ...)` (Triton) when lowered for CUDA, `run(True, ...)` (the Pallas interpreter)
    on every other platform. A trace-time `jax.default_backend()` test would pick the
    interpreter when compiling ahead of time for a GPU from a CPU host."""
    if interpret is None:
        return jax.lax.platform_dependent(
            *args, cuda=functools.partial(run, False), default=functools.partial(run, True)
        )
    return run(interpret, *args)


def layer_index(layer: jax.Array | int) -> jax.Array:
    """The layer of a stacked cache or state `[L, ...]` as the int32 `[1]` array a decode
    kernel takes (a scalar prefetch on TPU, a one-element block on GPU)."""
    return jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
