"""Attention over key blocks with an online softmax: never an [T, S] logits or mask array.

The reference materialises logits [B, K, G, T, S] and the mask [B, T, S]; at 16K patches of a
2048^2 image or a 32K-token prompt that is tens of GiB. Here a `lax.scan` walks the keys in
blocks of `block` (S padded with masked keys), keeping per query the running max m, the running
sum l of exp(logit - m) and the running output acc (FlashAttention's recurrence, in jnp):

    m'   = max(m, rowmax(s_j))
    acc' = acc * exp(m - m') + exp(s_j - m') V_j
    l'   = l * exp(m - m') + rowsum(exp(s_j - m'))          out = acc / l

with s_j the masked logits of block j in fp32. The backward is FlashAttention's too (a
`custom_vjp`): the forward keeps only out and the log-sum-exp L = m + log l per query, and a
second scan over the key blocks recomputes P_j = exp(s_j - L) and accumulates

    dV_j = P_j^T dO     dS_j = P_j * (dO V_j^T - D)     dQ += dS_j K_j     dK_j = dS_j^T Q

with D = rowsum(dO * out). So the backward holds one block's logits at a time and O(T) carries:
under context parallelism at 262K tokens, autodiff through the scan would have stored the
[T, N, H] accumulator once per key block (hundreds of GiB). Blocks no query may see (causally
after every query, or holding none of the queries' documents) are skipped by a `lax.cond`, in
both passes. A query that sees no key returns zeros, as the reference does. Probabilities are
cast to the value dtype before the product with V, like the reference (transformers' eager path).

Letters: B batch, T queries, S keys, K kv heads, G queries per kv head, H head dim, s keys of
one block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LOGITS_PER_BLOCK = 2**26  # T * N * block fp32 logits held at once (256 MiB)


def default_block(t: int, n: int, s: int) -> int:
    """512 keys a block, halved (down to 128) while T * N * block passes LOGITS_PER_BLOCK."""
    block = 512
    while block > 128 and t * n * block > LOGITS_PER_BLOCK:
        block //= 2
    return min(block, s)


def attention_blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool,
    scale: float,
    block: int | None = None,
) -> jax.Array:
    """`q [B, T, N, H]` over `k, v [B, S, K, H]` in key blocks; the reference's mask rules."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    block = min(block, s) if block else default_block(t, n, s)
    pad = -s % block
    nb = (s + pad) // block

    def blocks(x, fill=0):  # [B, S, ...] -> [nb, B, block, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(b, nb, block, *x.shape[2:]), 1, 0)

    real = blocks(jnp.ones((b, s), bool), fill=False)  # [nb, B, block] pads are never visible
    kv_seg = real.astype(jnp.int32) if kv_segment_ids is None else blocks(kv_segment_ids)
    q_seg = jnp.ones((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids
    keys = (blocks(kv_positions), kv_seg, real)  # [nb, B, block] each
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    out = _flash(qg, blocks(k), blocks(v), (q_positions, q_seg), keys, causal, scale)
    return out.reshape(b, t, n, h)


def _visible(queries, key_block, causal: bool) -> jax.Array:
    """[B, T, block] which keys of the block each query may see: `queries` = (positions,
    segment ids) [B, T]; `key_block` = (positions, segment ids, real) [B, block]."""
    q_pos, q_seg = queries
    pos, seg, real = key_block
    visible = real[:, None, :] & (q_seg[:, :, None] == seg[:, None, :])
    if causal:
        visible = visible & (q_pos[:, :, None] >= pos[:, None, :])
    return visible


def _wide_dtype(x: jax.Array) -> jnp.dtype:
    """fp32 for logits and accumulators, or fp64 for fp64 inputs."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _logits(qg, kb, visible, scale):
    """[B, K, G, T, block] masked fp32 logits."""
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, kb, preferred_element_type=_wide_dtype(qg))
    return jnp.where(visible[:, None, None], logits * scale, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(qg, kb, vb, queries, keys, causal, scale):
    return _forward(qg, kb, vb, queries, keys, causal, scale)[0]


def _forward(qg, kb, vb, queries, keys, causal, scale):
    """(out [B, T, K, G, H] in v's dtype, log-sum-exp [B, K, G, T] fp32, +inf for rows that see
    no key so that the backward's exp(s - L) is 0 there)."""
    b, t, kh, g, h = qg.shape
    wide = _wide_dtype(qg)
    # Under `jax.checkpoint` in a scan (the model's remat'd layers), partial evaluation would
    # save what depends only on the integer positions / segment ids (the masks broadcast to the
    # logits' shape) for every key block of every layer instead of recomputing it: 500+ GiB at
    # 262K tokens. Tied to q by a barrier, the masks are recomputed like the logits.
    qg, kb, queries, keys = jax.lax.optimization_barrier((qg, kb, queries, keys))

    def step(carry, x):
        kj, vj, key_block = x
        visible = _visible(queries, key_block, causal)

        def attend(carry):
            m, total, acc = carry  # [B, K, G, T], [B, K, G, T], [B, T, K, G, H]
            logits = _logits(qg, kj, visible, scale)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            # Rows with nothing visible so far keep m = -inf: shift by 0 there, not by -inf.
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(logits - shift[..., None])  # masked entries: exp(-inf) = 0
            rescale = jnp.exp(jnp.where(jnp.isfinite(m), m - shift, -jnp.inf))  # 0 at m = -inf
            total = total * rescale + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bkgts,bskh->btkgh", p.astype(vj.dtype), vj, preferred_element_type=wide
            )
            return m_new, total, acc * jnp.moveaxis(rescale, 3, 1)[..., None] + pv

        return jax.lax.cond(jnp.any(visible), attend, lambda c: c, carry), None

    init = (
        jnp.full((b, kh, g, t), -jnp.inf, wide),
        jnp.zeros((b, kh, g, t), wide),
        jnp.zeros((b, t, kh, g, h), wide),
    )
    (m, total, acc), _ = jax.lax.scan(step, init, (kb, vb, keys))
    seen = total > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf)
    norm = jnp.moveaxis(jnp.where(seen, total, 1.0), 3, 1)[..., None]  # [B, T, K, G, 1]
    out = jnp.where(jnp.moveaxis(seen, 3, 1)[..., None], acc / norm, 0.0)
    return out.astype(vb.dtype), lse


def _flash_fwd(qg, kb, vb, queries, keys, causal, scale):
    out, lse = _forward(qg, kb, vb, queries, keys, causal, scale)
    return out, (qg, kb, vb, queries, keys, out, lse)


def _flash_bwd(causal, scale, residuals, d_out):
    qg, kb, vb, queries, keys, out, lse = residuals
    wide = _wide_dtype(qg)
    # D = rowsum(dO * O): the softmax Jacobian's correction term, [B, K, G, T].
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(wide), out.astype(wide))
    d_out_v = d_out.astype(vb.dtype)

    def step(dq, x):
        kj, vj, key_block = x
        visible = _visible(queries, key_block, causal)

        def attend(dq):
            p = jnp.exp(_logits(qg, kj, visible, scale) - lse[..., None])  # [B, K, G, T, s]
            dv = jnp.einsum(
                "bkgts,btkgh->bskh", p.astype(vj.dtype), d_out_v, preferred_element_type=wide
            )
            dp = jnp.einsum("btkgh,bskh->bkgts", d_out_v, vj, preferred_element_type=wide)
            ds = (p * (dp - delta[..., None]) * scale).astype(qg.dtype)
            dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds, kj, preferred_element_type=wide)
            dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg, preferred_element_type=wide)
            return dq, (dk.astype(kj.dtype), dv.astype(vj.dtype))

        def skip(dq):
            return dq, (jnp.zeros_like(kj), jnp.zeros_like(vj))

        return jax.lax.cond(jnp.any(visible), attend, skip, dq)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, wide), (kb, vb, keys))
    return dq.astype(qg.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
