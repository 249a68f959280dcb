"""Masked softmax attention with grouped KV heads: the readable reference every kernel matches.

Letters: B batch, T query tokens, S key tokens, K kv heads, G queries per kv head, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    causal: bool,
) -> jax.Array:
    """`[B, T, S]` boolean: key s is visible to query t (same document, and not in its future)."""
    mask = jnp.ones((q_positions.shape[0], q_positions.shape[1], kv_positions.shape[1]), bool)
    if causal:
        mask &= q_positions[:, :, None] >= kv_positions[:, None, :]
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask


def attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
    """Softmax attention of `q [B, T, N, H]` over `k, v [B, S, K, H]` under `mask [B, T, S]`.

    Logits and softmax are fp32; the probabilities are cast to the value dtype (transformers'
    eager path). A query with no visible key returns zeros.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=acc) * scale
    visible = mask[:, None, None, :, :]
    logits = jnp.where(visible, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1, where=visible)
    probs = jnp.where(visible, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)
