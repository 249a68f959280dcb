"""The one attention entry point the model calls.

Backends:
  "xla"    the reference math (materialised [B, T, S] mask and logits), jitted by XLA; runs
           everywhere and handles every mask (decode over a cache, packed documents).
  "chunked" the same math over key blocks with an online softmax (`blockwise.py`): memory
           O(T * block) instead of O(T * S); any mask.
  "cudnn"  cuDNN's fused flash attention through `jax.nn.dot_product_attention`, for self
           attention whose positions are in order (training and prefill from scratch): causal by
           index, packed documents as a segment mask. Measured on an H100 at head dim 256 and
           GQA 24:4 at 0.92-0.99x torch's SDPA (benchmarks/results/); the XLA path runs out of
           memory there at 32K tokens.
"auto" picks "cudnn" on GPU when the call allows it, else "chunked" once T * S reaches
`CHUNKED_MIN_ELEMENTS` (8192 x 8192: 256 MiB of fp32 logits per head), else "xla".
"""

from __future__ import annotations

import jax

from qwenjax.kernels.attention.blockwise import attention_blockwise
from qwenjax.kernels.attention.reference import attention_mask, attention_reference

BACKENDS = ("xla", "chunked", "cudnn")
CHUNKED_MIN_ELEMENTS = 8192 * 8192  # the reference holds T * S logits per head


def _cudnn(q, k, v, q_segment_ids, kv_segment_ids, scale):
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=True, implementation="cudnn"
    )


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
    positions_in_order: bool = False,
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
      positions_in_order: the caller promises q_positions == kv_positions == arange(T) per row
        (self attention from scratch), so "causal" is causal by index; this lets "auto" use a
        fused kernel that takes no positions.
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
    fused_ok = positions_in_order and causal and q.shape[1] == k.shape[1]
    if backend == "cudnn" and not fused_ok:
        raise ValueError("the cudnn backend needs causal self attention with positions_in_order")
    if backend == "cudnn" or (backend == "auto" and fused_ok and jax.default_backend() == "gpu"):
        return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, scale)
    if backend == "chunked" or (
        backend == "auto" and q.shape[1] * k.shape[1] >= CHUNKED_MIN_ELEMENTS
    ):
        return attention_blockwise(
            q,
            k,
            v,
            q_positions=q_positions,
            kv_positions=kv_positions,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            causal=causal,
            scale=scale,
        )
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)
    return attention_reference(q, k, v, mask, scale)
