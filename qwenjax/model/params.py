"""Parameter constructors (initialiser, dtype, logical axis names) and the LoRA-aware projection."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.sharding import ACT_EMBED, BATCH, EMBED, LORA_RANK, SHARD_UNITS, row_major

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
    units: Sequence[int | None] | None = None,
) -> nnx.Param:
    """A parameter annotated with logical axis names (placed on devices later, by the mesh rules).

    `units` gives, per dim, how many whole pieces a mesh axis may split it into when that is
    fewer than its size: a flattened `[N·H]` dim has N units, since a shard must hold whole heads.
    """
    if len(axes) != len(shape) or (units is not None and len(units) != len(shape)):
        raise ValueError(f"axes {tuple(axes)} or units {units} do not match shape {tuple(shape)}")
    extra = {} if units is None else {SHARD_UNITS: tuple(units)}
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype),
        out_sharding=tuple(axes),
        eager_sharding=False,
        **extra,
    )


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the projection matrices: `W x + (x A) B · alpha / rank`."""

    rank: int
    alpha: float

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")


class LoRA(nnx.Module):
    """The adapter of one projection `W [in..., out...]`: `A [in..., r]`, `B [r, out...]`.

    A starts normal with std 1/√fan_in and B at zero, so an adapted model starts equal to its
    base. A draws from the `lora` rng stream, so adding adapters leaves the base's random init
    unchanged when that stream exists (`api.build` makes it). Both are `nnx.LoRAParam`s in at
    least fp32 (fp32 master weights even over a bf16 base) and carry the base's logical axis
    names on their in/out dims, so they shard like the base.
    """

    def __init__(self, base: nnx.Param, num_in: int, config: LoRAConfig, *, rngs: nnx.Rngs):
        meta = base.get_metadata()
        shape, axes = base.shape, meta["out_sharding"]
        units = meta.get(SHARD_UNITS)
        a_extra = {} if units is None else {SHARD_UNITS: (*units[:num_in], None)}
        b_extra = {} if units is None else {SHARD_UNITS: (None, *units[num_in:])}
        dtype = jnp.promote_types(base.dtype, jnp.float32)
        fan_in = math.prod(shape[:num_in])
        a_init = nnx.initializers.normal(fan_in**-0.5)
        self.a = nnx.LoRAParam(
            a_init(rngs.lora(), (*shape[:num_in], config.rank), dtype),
            out_sharding=(*axes[:num_in], LORA_RANK),
            eager_sharding=False,
            **a_extra,
        )
        self.b = nnx.LoRAParam(
            jnp.zeros((config.rank, *shape[num_in:]), dtype),
            out_sharding=(LORA_RANK, *axes[num_in:]),
            eager_sharding=False,
            **b_extra,
        )
        self.scale = config.alpha / config.rank

    def __call__(self, eq: str, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """The update `(x A) B · scale` for the projection `einsum(eq, x, W)`."""
        lhs, out = eq.split("->")
        xs, ws = lhs.split(",")
        if "r" in eq:
            raise ValueError(f"einsum {eq!r} uses 'r', the LoRA rank letter")
        w_in, w_out = ws[: self.a.ndim - 1], ws[self.a.ndim - 1 :]  # "btnh,nhd->btd": nh | d
        rest = "".join(c for c in xs if c not in w_in)  # x's uncontracted letters: bt
        xa = jnp.einsum(f"{xs},{w_in}r->{rest}r", x, self.a[...].astype(dtype))  # [B, T, r]
        y = jnp.einsum(f"{rest}r,r{w_out}->{out}", xa, self.b[...].astype(dtype))
        return y * jnp.asarray(self.scale, dtype)


def lora(base: nnx.Param, num_in: int, config: LoRAConfig | None, rngs: nnx.Rngs) -> LoRA | None:
    """An adapter for `base` (whose first `num_in` dims are contracted), or None without LoRA."""
    return None if config is None else LoRA(base, num_in, config, rngs=rngs)


def dense(eq: str, x: jax.Array, w: nnx.Param, adapter: LoRA | None, dtype: jnp.dtype) -> jax.Array:
    """The projection `einsum(eq, x, w)` in the compute dtype, plus its LoRA update if any.

    A result smaller than the weight (decoding, draft verification) is pinned row-major. Left
    free, XLA gives a projection the layout its consumers prefer, and on TPU attention and the
    gated norm prefer heads-major `[N, B, H]`: the dot then runs per head on a transposed copy
    of the whole weight (120 MiB for the 27B's q_proj) every layer of every decode step, where
    transposing the output is a few KiB. A larger result (training, prefill) is left to XLA:
    there transposing the weight is the cheaper of the two.
    """
    y = jnp.einsum(eq, x, w[...].astype(dtype))
    y = y if adapter is None else y + adapter(eq, x, dtype)
    return row_major(y, _result_names(eq, w)) if y.size < math.prod(w.shape) else y


def _result_names(eq: str, w: nnx.Param) -> tuple[str | None, ...] | None:
    """Logical names of `einsum(eq, x, w)`: b is the batch, the weight's dims name theirs (its
    model width D being the activations' ACT_EMBED), and the tokens t stay whole, as the
    attention kernels take them: a decode step's one token cannot be split over a `sequence`
    axis. None for a weight without names."""
    stored = w.get_metadata().get("out_sharding")
    if stored is None:
        return None
    lhs, out = eq.split("->")
    weight_names = zip(lhs.split(",")[1], stored[-w.ndim :], strict=True)
    by_letter = {"b": BATCH, "t": None, **dict(weight_names)}
    return tuple(ACT_EMBED if by_letter[c] == EMBED else by_letter[c] for c in out)
