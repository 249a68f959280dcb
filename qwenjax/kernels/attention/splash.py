"""Causal self attention through splash attention: JAX's Pallas Mosaic TPU flash kernels.

`jax.experimental.pallas.ops.tpu.splash_attention` runs the forward and both backward kernels
(dq; dk and dv) block by block over (head, query block, key block), skipping the blocks that the
causal mask hides entirely; it never holds a [T, S] array. It is used as is:

  * grouped heads: splash's multi-head kernel takes q [N, T, H] and k, v [K, T, H] with N a
    multiple of K, reads kv head n // (N / K) through its index maps and sums dk, dv over each
    group in VMEM, so K/V are never repeated. Rows are `jax.vmap`ped (a grid axis).
  * packed documents: `SegmentIds`, and-ed in-kernel with the causal mask. In self attention
    (the same ids for q and kv) every query sees at least itself, so no softmax row is empty;
    splash would average the masked values of an empty row where the reference returns zeros.
  * scale: splash does not scale logits, so q is multiplied by it first, in q's dtype (exact for
    the model's 256 ** -0.5 = 1 / 16; one extra rounding of q otherwise).
  * layout: [B, T, N, H] is transposed to the kernel's [B, N, T, H] and back (XLA copies).
  * length: T is zero-padded at the end to a multiple of the largest block (the LCM of the block
    sizes), wasting less than one block; when T is shorter, every block shrinks to T rounded up
    to 128 (the lane width). Causal by index hides the padded keys from every real query; the
    padded queries' rows are dropped, so their cotangents are zero and they add nothing to dk, dv.

Where it runs: `interpret=None` stages the call through `lax.platform_dependent`, so the choice is
made at lowering: Mosaic when lowering for TPU (also ahead of time on a CPU host, where
`jax.default_backend()` is "cpu"), the Pallas HLO interpreter everywhere else (tests). Both
branches are the same kernel with the same residuals, so differentiating the conditional stores
nothing extra.

The mask bookkeeping (which blocks are empty, full or partial) is NumPy at trace time and
evaluates the causal mask on every block, T^2 elements in all: ~7 s at T = 32768, so kernels are
cached per (heads, length, blocks). "auto" traces this branch on every platform.

Letters: B batch, T tokens, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
    SplashAttentionKernel,
)

BlockSizes = splash.BlockSizes
LANES = 128


def default_block_sizes(t: int) -> BlockSizes:
    """Block sizes for T tokens at the 27B geometry (head dim 256); not yet timed on a TPU.

    512 everywhere up to 8K tokens: 512 x 256 bf16 tiles, a 512 x 512 fp32 logits tile. Above,
    1024-token q / kv blocks with 512-key compute slices: a quarter of the grid steps at the same
    logits tile (at the ~0.35 us per step that the Pallas TPU docs quote, 24 heads x 64^2 steps
    of 512 at T = 32768 would cost ~35 ms per call, about the forward's matmul time on a v5p).
    The fused backward is not used: it keeps a dq partial per key block, [T / block_kv, N, T, H]
    fp32, which is O(T^2).
    """
    q, kv, compute = (512, 512, 512) if t <= 8192 else (1024, 1024, 512)
    return BlockSizes(
        block_q=q,
        block_kv=kv,
        block_kv_compute=compute,
        block_q_dkv=q,
        block_kv_dkv=kv,
        block_kv_dkv_compute=compute,
        block_q_dq=q,
        block_kv_dq=kv,
    )


def _sizes(blocks: BlockSizes) -> tuple[int, ...]:
    return (
        blocks.block_q,
        blocks.block_kv,
        blocks.block_kv_compute,
        blocks.block_q_dkv,
        blocks.block_kv_dkv,
        blocks.block_kv_dkv_compute,
        blocks.block_q_dq,
        blocks.block_kv_dq,
    )


def fit_blocks(t: int, blocks: BlockSizes) -> tuple[BlockSizes, int]:
    """(block sizes, padded length) for T tokens: see the module docstring on length."""
    sizes = _sizes(blocks)
    if blocks.use_fused_bwd_kernel or any(s is None or s % LANES for s in sizes):
        raise ValueError(
            f"splash block sizes must all be set, be multiples of {LANES}, and use the unfused "
            f"backward (the fused one keeps O(T^2) dq partials); got {blocks}"
        )
    quantum = math.lcm(*sizes)
    short = -(-t // LANES) * LANES
    if short < quantum:
        return BlockSizes(*[short] * len(sizes)), short
    return blocks, -(-t // quantum) * quantum


@functools.lru_cache(maxsize=32)
def _kernels(heads: int, t: int, blocks: BlockSizes) -> tuple[SplashAttentionKernel, ...]:
    """(Mosaic, interpreted) causal kernels for `heads` query heads over `t` tokens."""
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * heads)
    # Outside any trace: the mask tables must be constants, not tracers kept in the cache.
    with jax.ensure_compile_time_eval():
        mosaic = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1)
    infos = (mosaic.fwd_mask_info, mosaic.dq_mask_info, mosaic.dkv_mask_info)
    return mosaic, SplashAttentionKernel(*infos, **{**mosaic.kwargs, "interpret": True})


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    scale: float,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal self attention of `q [B, T, N, H]` over `k, v [B, T, K, H]`.

    Args:
      q_segment_ids, kv_segment_ids: `[B, T]` document ids of packed rows (the same ids in self
        attention: a query whose document has no key at or before it gets splash's average of
        masked values, not the reference's zeros), or both None.
      scale: logit scale.
      block_sizes: splash tile sizes, multiples of 128; `default_block_sizes(T)` if None.
      interpret: None: Mosaic when lowered for TPU, the interpreter elsewhere; True / False
        force the interpreter / Mosaic.

    Returns:
      `[B, T, N, H]` in the dtype of `v`.
    """
    _, t, n, _ = q.shape
    blocks, tp = fit_blocks(t, block_sizes or default_block_sizes(t))
    mosaic, interpreted = _kernels(n, tp, blocks)

    def heads_major(x):  # [B, T, heads, H] -> [B, heads, Tp, H], zero keys/queries at the end
        return jnp.pad(x, [(0, 0), (0, tp - t), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    args = [heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v)]
    if q_segment_ids is not None:
        for seg in (q_segment_ids, kv_segment_ids):
            args.append(jnp.pad(seg, [(0, 0), (0, tp - t)], mode="edge"))

    def run(kernel, q, k, v, q_seg=None, kv_seg=None):
        segments = None if q_seg is None else splash.SegmentIds(q=q_seg, kv=kv_seg)
        return kernel(q, k, v, segments)

    def batched(kernel):
        return jax.vmap(functools.partial(run, kernel))

    if interpret is None:
        out = jax.lax.platform_dependent(*args, tpu=batched(mosaic), default=batched(interpreted))
    else:
        out = batched(interpreted if interpret else mosaic)(*args)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(v.dtype)  # [B, T, N, H]
