"""The layout both decode kernels take: a row's queries grouped by the kv head they read.

Query head n reads kv head n // G, so the T x G queries of kv head k form one tile of rows
(row t * G + g is query t, head k * G + g), padded to what the kernel's matmuls need. A program
then multiplies one [R, H] tile by each key block of its kv head, with no repeated K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_rows(q: jax.Array, q_positions: jax.Array, kv_heads: int, cache_len: int, rows: int):
    """q `[B, T, N, H]` at `q_positions [B, T]` as `(queries [B, K, R, H], their positions
    [B, R] (-1 on padding rows), keys each row may see [B]: 1 + its last position, within the
    cache)`; R = `rows` >= T x G."""
    b, t, n, h = q.shape
    g = n // kv_heads
    qr = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, h)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    pos = jnp.repeat(q_positions.astype(jnp.int32), g, axis=1)
    pos = jnp.pad(pos, ((0, 0), (0, rows - t * g)), constant_values=-1)
    n_keys = jnp.clip(jnp.max(q_positions, axis=1) + 1, 0, cache_len).astype(jnp.int32)
    return qr, pos, n_keys


def from_rows(out: jax.Array, t: int, n: int) -> jax.Array:
    """`[B, K, R, H]` rows back to `[B, T, N, H]` (padding rows dropped)."""
    b, kv, _, h = out.shape
    g = n // kv
    out = out[:, :, : t * g].reshape(b, kv, t, g, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, n, h)
