"""The one attention entry point the model calls.

Backends: "xla" (the reference math, jitted by XLA; runs everywhere). The kernels issue adds
flash/splash backends behind this same signature.
"""

from __future__ import annotations

import jax

from qwenjax.kernels.attention.reference import attention_mask, attention_reference

BACKENDS = ("xla",)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: `[B, T, N, H]` queries; N must be a multiple of the kv heads K.
      k, v: `[B, S, K, H]` keys and values.
      q_positions, kv_positions: `[B, T]`, `[B, S]` token indices used for the causal rule.
      q_segment_ids, kv_segment_ids: `[B, T]`, `[B, S]` document ids; attention never crosses a
        document. Both or neither.
      causal: hide keys whose position is after the query's.
      scale: logit scale, default `H ** -0.5`.
      backend: "auto" or one of `BACKENDS`.

    Returns:
      `[B, T, N, H]` in the dtype of `v`.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention expects q [B,T,N,H] and k = v [B,S,K,H] with N % K == 0; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)
    return attention_reference(q, k, v, mask, scale)
