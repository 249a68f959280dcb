"""Optimizer: global-norm clipping → AdamW with warmup + decay schedule and a weight-decay mask.

Weight decay applies to matrices only. Excluded, by their logical axis names:
  * vectors (norm weights, A_log, dt_bias; the stacked `layers` axis does not count as a dim):
    decaying them pulls a scale towards 0 or a decay rate off its trained value;
  * anything with a `vocab` axis (embedding, LM head): AdamW's decoupled decay shrinks every row
    every step, also rows of tokens that never occur in the fine-tuning data, which then drift
    from the pretrained values with no gradient to hold them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwenjax import sharding as ax

DECAYS = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters and the learning-rate schedule.

    The rate rises linearly over `warmup_steps` (reaching `lr` at the last warmup step), then
    decays from `lr` to `lr · end_lr_ratio` at `total_steps` and stays there.
    """

    lr: float = 1e-5
    warmup_steps: int = 0
    decay: str = "cosine"  # one of DECAYS
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; choose from {DECAYS}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})"
            )


def learning_rate(config: OptimConfig) -> optax.Schedule:
    """The schedule `step → lr` (step counts optimizer updates from 0)."""
    warmup, total = config.warmup_steps, config.total_steps

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = config.lr * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
        frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        shape = {
            "cosine": 0.5 * (1 + jnp.cos(math.pi * frac)),
            "linear": 1 - frac,
            "constant": jnp.ones_like(frac),
        }[config.decay]
        r = config.end_lr_ratio if config.decay != "constant" else 1.0
        return jnp.where(step < warmup, warm, config.lr * (r + (1 - r) * shape))

    return schedule


def decays(variable: nnx.Variable) -> bool:
    """Whether weight decay applies to this parameter (see the module docstring)."""
    names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
    dims = [n for n in names if n != ax.LAYERS]
    return len(dims) >= 2 and ax.VOCAB not in dims


def decay_mask(params: nnx.State) -> nnx.State:
    """`decays` for every variable of a parameter state (a tree of bools)."""
    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """`clip_by_global_norm → adamw(schedule, decay mask)` over an `nnx.State` of parameters."""
    adamw = optax.adamw(
        learning_rate(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
