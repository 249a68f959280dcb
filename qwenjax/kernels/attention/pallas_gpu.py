"""Causal self attention through JAX's Pallas Triton flash attention (GPU), for packed documents.

cuDNN through `jax.nn.dot_product_attention` takes packed documents only as a dense [B, 1, T, T]
mask, which ran at 0.34-0.48x of unmasked attention on an H100 (benchmarks/results/). This
backend runs `jax.experimental.pallas.ops.gpu.attention.mha` (a forward kernel and a fused
backward, in Triton) as is, with the segment ids compared inside the kernel:

  * grouped heads: `mha` has none, so K/V are repeated to the N query heads (N / K times the
    K/V memory, 6x at the 27B's 24:4; their gradients are summed back by the repeat's transpose).
  * segments: one `[B, T]` array for queries and keys (self attention).
  * blocks: 64 x 64 in every kernel. At head dim 256 the default 128-query blocks ask for 320 KB
    of shared memory on an H100 (measured), where 64 x 64 compiles (`qwenjax.kernels.gpu_target`,
    tested); the fused backward needs as many query blocks as key blocks.
  * length: T is zero-padded to a multiple of the block. Causal by index hides the padded keys
    from every real query; the padded queries (their own segment id, so no softmax row is
    empty) are dropped, so their cotangents are zero.

Not timed yet: `auto` keeps cuDNN on GPU until `benchmarks/attention.py` shows this is faster for
packed documents. Where it runs: `interpret=None` stages the call through
`lax.platform_dependent`: Triton when lowered for CUDA, the Pallas interpreter elsewhere (tests).

Letters: B batch, T tokens, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention

from qwenjax.kernels.platform import triton_or_interpreted

BLOCK = 64


def pallas_gpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
    block: int = BLOCK,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal self attention of q `[B, T, N, H]` over k, v `[B, T, K, H]` (positions 0..T-1
    in order), documents by `segment_ids [B, T]`; returns `[B, T, N, H]` in q's dtype."""
    b, t, n, _ = q.shape
    k, v = (jnp.repeat(x, n // k.shape[2], axis=2) for x in (k, v))  # [B, T, N, H]
    pad = -t % block
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if segment_ids is not None:
            fill = jnp.max(segment_ids) + 1  # a document of its own: never a real query's
            segment_ids = jnp.concatenate(
                [segment_ids, jnp.broadcast_to(fill, (b, pad)).astype(segment_ids.dtype)], axis=1
            )
    blocks = triton_attention.BlockSizes(*[block] * 6)

    def run(interpret: bool, q, k, v, segment_ids):
        return triton_attention.mha(
            q,
            k,
            v,
            segment_ids,
            sm_scale=scale,
            causal=True,
            block_sizes=blocks,
            interpret=interpret,
        )

    return triton_or_interpreted(run, interpret, q, k, v, segment_ids)[:, :t]
