"""Attention over key blocks with an online softmax: never an [T, S] logits or mask array.

The reference materialises logits [B, K, G, T, S] and the mask [B, T, S]; at 16K patches of a
2048^2 image or a 32K-token prompt that is tens of GiB. Here a `lax.scan` walks the keys in
blocks of `block` (S padded with masked keys), keeping per query the running max m, the running
sum l of exp(logit - m) and the running output acc (FlashAttention's recurrence, in jnp):

    m'   = max(m, rowmax(s_j))
    acc' = acc * exp(m - m') + exp(s_j - m') V_j
    l'   = l * exp(m - m') + rowsum(exp(s_j - m'))          out = acc / l

with s_j the masked logits of block j in fp32. The body is rematerialised (`jax.checkpoint`), so
the backward also holds one block's logits at a time, plus the per-block carries. A query that
sees no key returns zeros, as the reference does. Probabilities are cast to the value dtype
before the product with V, like the reference (transformers' eager path).

Letters: B batch, T queries, S keys, K kv heads, G queries per kv head, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    causal: bool,
    scale: float,
    block: int = 512,
) -> jax.Array:
    """`q [B, T, N, H]` over `k, v [B, S, K, H]` in key blocks; the reference's mask rules."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    block = min(block, s)
    pad = -s % block
    nb = (s + pad) // block
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

    def blocks(x, fill=0):  # [B, S, ...] -> [nb, B, block, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(b, nb, block, *x.shape[2:]), 1, 0)

    real = blocks(jnp.ones((b, s), bool), fill=False)  # [nb, B, block] pads are never visible
    kv_seg = real if kv_segment_ids is None else blocks(kv_segment_ids)
    xs = (blocks(k), blocks(v), blocks(kv_positions), kv_seg, real)
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]

    @jax.checkpoint
    def step(carry, x):
        m, total, acc = carry  # [B, K, G, T], [B, K, G, T], [B, T, K, G, H]
        kb, vb, pos_b, seg_b, real_b = x
        visible = real_b[:, None, :]  # [B, T, block]
        if causal:
            visible = visible & (q_positions[:, :, None] >= pos_b[:, None, :])
        if q_segment_ids is not None:
            visible = visible & (q_segment_ids[:, :, None] == seg_b[:, None, :])
        logits = jnp.einsum("btkgh,bskh->bkgts", qg, kb, preferred_element_type=acc_dtype)
        logits = jnp.where(visible[:, None, None], logits * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # [B, K, G, T]
        # Rows with nothing visible so far keep m = -inf: shift by 0 there, not by -inf.
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(logits - shift[..., None])  # masked entries: exp(-inf) = 0
        rescale = jnp.exp(jnp.where(jnp.isfinite(m), m - shift, -jnp.inf))  # 0 where m = -inf
        total = total * rescale + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "bkgts,bskh->btkgh", p.astype(v.dtype), vb, preferred_element_type=acc_dtype
        )
        acc = acc * jnp.moveaxis(rescale, 3, 1)[..., None] + pv
        return (m_new, total, acc), None

    g = n // kh
    init = (
        jnp.full((b, kh, g, t), -jnp.inf, acc_dtype),
        jnp.zeros((b, kh, g, t), acc_dtype),
        jnp.zeros((b, t, kh, g, h), acc_dtype),
    )
    (_, total, acc), _ = jax.lax.scan(step, init, xs)
    total = jnp.moveaxis(total, 3, 1)[..., None]  # [B, T, K, G, 1]
    out = jnp.where(total > 0, acc / jnp.where(total > 0, total, 1.0), 0.0)
    return out.reshape(b, t, n, h).astype(v.dtype)
