"""Where a Pallas GPU kernel runs, decided when lowering rather than when tracing."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax


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
