"""Decoding caches: what each layer keeps between forward calls, stacked like the scanned blocks.

Per attention layer, a preallocated KV cache (after k_norm and RoPE) `[B, K, S, H]`; per Gated
DeltaNet layer, the conv state (the last W−1 pre-conv inputs) `[B, W−1, C]` in the model dtype
and the recurrent state `[B, N, E, H]` in fp32. `Cache.length [B]` counts the tokens each row
holds; the next token of row b goes to slot `length[b]`, so rows may be at different lengths.
The rotary position of slot p is `p + rope_delta[b]`: 0 for text, and for a row whose prompt
held images or videos the mRoPE delta of that prompt (`vision.rope_index`), so decoding
continues after the prompt's largest 3-D position, as transformers does.

Slots at or beyond a row's length may hold stale entries (padding of a prefill, rejected draft
tokens); they are never read, because a query at slot p attends to slots ≤ p only, and every
slot < p was written by a kept token.

Heads before slots: a KV head's keys are one `[S, H]` matrix, as attention's dots take them (from
`[B, S, K, H]` caches, XLA copied (v5p) or transposed (H100) each layer's keys and values to that
order every step, 2 x 256 MiB at 32 rows x 4096 slots of the 27B) and as the decode kernels read
them, a block of slots of one head at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qwenjax import sharding as ax
from qwenjax.config import FULL_ATTENTION, ModelConfig

KV_CACHE = (ax.BATCH, ax.KV_HEADS, ax.CACHE_LENGTH, ax.HEAD_DIM)  # [B, K, S, H]
CONV_STATE = (ax.BATCH, None, ax.GDN_CHANNELS)  # [B, W-1, C]
GDN_STATE = (ax.BATCH, ax.GDN_V_HEADS, None, None)  # [B, N, E, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [B, K, S, H]
    v: jax.Array  # [B, K, S, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaNetCache:
    conv: jax.Array  # [B, W-1, C] pre-conv inputs, model dtype
    state: jax.Array  # [B, N, E, H] fp32


LayerCache = KVCache | DeltaNetCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """The whole model's cache.

    blocks: one entry per layer of `config.block_pattern`, each stacked over the scanned blocks
      (leading axis `num_blocks`).
    mtp: the MTP layer's own KV cache (speculative decoding), or None.
    length: `[B]` int32 tokens held per row.
    rope_delta: `[B]` int32 rotary position minus slot of the next tokens (set by a multimodal
      prefill), or None: 0 for every row (text only).
    """

    blocks: tuple[LayerCache, ...]
    mtp: KVCache | None
    length: jax.Array
    rope_delta: jax.Array | None = None

    @property
    def max_length(self) -> int:
        for layer in self.blocks:
            if isinstance(layer, KVCache):
                return layer.k.shape[3]  # [NB, B, K, S, H]
        raise ValueError("a cache without attention layers has no length limit")

    def next_positions(self, t: int) -> jax.Array:
        """`[B, t]` rotary positions of the next t tokens of each row."""
        return rope_positions(self.length, t, self.rope_delta)


def rope_positions(start: jax.Array, t: int, rope_delta: jax.Array | None = None) -> jax.Array:
    """`[B, t]` rotary positions of t tokens at slots `start[b]`, `start[b] + 1`, … of each row."""
    slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return slots if rope_delta is None else slots + rope_delta[:, None]


# Slots are allocated in multiples of this. TPU tiles an array's two minor dims, here [S, H],
# in 8 rows (of 8 or 16 bytes' worth); for a slot count off that grid XLA's default layout for
# the cache put K minor of S instead (no padding), which the decode kernel cannot read: a
# relayout copy of the whole cache every step (4 GiB at 32 rows x 32774 slots).
SLOT_MULTIPLE = 16


def _kv(config: ModelConfig, batch: int, max_length: int, dtype, lead: tuple[int, ...]) -> KVCache:
    slots = -(-max_length // SLOT_MULTIPLE) * SLOT_MULTIPLE
    shape = (*lead, batch, config.num_key_value_heads, slots, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def init_cache(
    config: ModelConfig, batch: int, max_length: int, dtype=jnp.bfloat16, *, mtp: bool = False
) -> Cache:
    """An empty cache for `batch` rows of up to `max_length` tokens (call inside jit to shard);
    the KV caches hold `max_length` rounded up to a multiple of `SLOT_MULTIPLE` slots."""
    nb, c = config.num_blocks, config.conv_dim
    n, e, h = (
        config.linear_num_value_heads,
        config.linear_key_head_dim,
        config.linear_value_head_dim,
    )
    layers = []
    for kind in config.block_pattern:
        if kind == FULL_ATTENTION:
            layers.append(_kv(config, batch, max_length, dtype, (nb,)))
        else:
            conv = jnp.zeros((nb, batch, config.linear_conv_kernel_dim - 1, c), dtype)
            layers.append(
                DeltaNetCache(conv=conv, state=jnp.zeros((nb, batch, n, e, h), jnp.float32))
            )
    return Cache(
        blocks=tuple(layers),
        mtp=_kv(config, batch, max_length, dtype, ()) if mtp else None,
        length=jnp.zeros((batch,), jnp.int32),
    )


def logical_axes(cache: Cache) -> Any:
    """The cache's tree with a logical-axis tuple per leaf (for `sharding` rules)."""

    def kv(c: KVCache, lead):
        return KVCache(k=(*lead, *KV_CACHE), v=(*lead, *KV_CACHE))

    blocks = tuple(
        kv(layer, (ax.LAYERS,))
        if isinstance(layer, KVCache)
        else DeltaNetCache(conv=(ax.LAYERS, *CONV_STATE), state=(ax.LAYERS, *GDN_STATE))
        for layer in cache.blocks
    )
    return Cache(
        blocks=blocks,
        mtp=None if cache.mtp is None else kv(cache.mtp, ()),
        length=(ax.BATCH,),
        rope_delta=None if cache.rope_delta is None else (ax.BATCH,),
    )


def write_rows(
    buffer: jax.Array,
    update: jax.Array,
    start: jax.Array,
    layer: jax.Array | None = None,
    *,
    slot_axis: int = 1,
) -> jax.Array:
    """`buffer [B, S, ...]` with `update [B, T, ...]` written at slots `start[b]`... per row.
    `slot_axis`: where S is, when dims sit between it and B (a KV cache `[B, K, S, H]`, axis 2,
    takes `update [B, T, K, H]`). With `layer`, `buffer` is a stack `[L, B, ...]` and only
    `buffer[layer]` is written: the T new slots of each row, not a copy of the layer's whole
    cache. Slots past S are dropped (a clamped slice update would shift them onto the row's
    earlier slots)."""
    # One scatter: vmapping a slice update over the row axis made XLA move that axis to the
    # front of the stack, a transposed copy of the whole stack.
    b, t = update.shape[:2]
    lead = 0 if layer is None else 1
    between = buffer.shape[lead + 1 : lead + slot_axis]  # dims between B and S: K of a KV cache
    # Every dim before S indexed, so a scattered window is only the (contiguous) dims after S:
    # windows of [K, H] across S made XLA on TPU relay out the whole stack for the scatter.
    grid = lambda i, n: jnp.arange(n).reshape([n if j == i else 1 for j in range(slot_axis + 1)])
    rows = grid(0, b)
    slots = start.reshape(rows.shape) + grid(slot_axis, t)  # [B, 1.., T]
    index = (rows, *(grid(i + 1, n) for i, n in enumerate(between)), slots)  # -> [B, K.., T]
    index = index if layer is None else (layer, *index)
    update = jnp.moveaxis(update.astype(buffer.dtype), 1, slot_axis)  # [B, K.., T, ...]
    out = buffer.at[index].set(update, mode="drop")
    if layer is None:  # (a constrained jit output cannot take a donated buffer's place)
        return out
    # A stack carried by the scan over blocks stays row-major, its layout outside the step.
    # Left free, XLA on GPU gave the carried KV stacks the layout attention's dots prefer: a
    # transposed copy of the whole cache at the loop's entry and another at its exit, every
    # step (4692 MiB of temporaries at 32 rows x 4096 slots for the 27B).
    return ax.row_major(out)


def read_rows(buffer: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """`buffer [B, S, ...]` slots `[start[b], start[b] + size)` per row → `[B, size, ...]`."""
    take = lambda buf, s: jax.lax.dynamic_slice_in_dim(buf, s, size, axis=0)
    return jax.vmap(take)(buffer, start)
