"""What both decode kernels (Triton, Mosaic) share: the query-row layout and the online-softmax
step over one key block.

Query head n reads kv head n // G, so the T x G queries of kv head k form one tile of rows
(row t * G + g is query t, head k * G + g), padded to what the kernel's matmuls need. A program
then multiplies one [R, H] tile by each key block of its kv head, with no repeated K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MAX_ROWS = 128  # T x G query rows a kv head at most; longer calls take the xla path


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


def attend_block(q, k, v, visible, scale: float, m, den, acc):
    """One key block of the online softmax, inside a kernel: q `[R, H]`, k, v `[BLOCK, H]`,
    `visible [R, BLOCK]`; running max m and sum den `[R, 1]`, output acc `[R, H]`, all fp32.

        s = scale * q k^T (-inf where hidden)    m' = max(m, rowmax s)    p = exp(s - m')
        den' = den exp(m - m') + rowsum p        acc' = acc exp(m - m') + p v  (p in v's dtype)

    A row with no visible key yet keeps m = -inf and shifts by 0, so exp(-inf) = 0, never NaN.
    fp32 operands multiply at full precision (not tf32)."""
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    dot = functools.partial(
        jax.lax.dot_general, precision=precision, preferred_element_type=jnp.float32
    )
    s = jnp.where(visible, dot(q, k, (((1,), (1,)), ((), ()))) * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)
    den = alpha * den + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot(p.astype(v.dtype), v, (((1,), (0,)), ((), ())))
    return m_new, den, acc
