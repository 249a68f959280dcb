"""Attention of a few queries per row over a KV cache, in Pallas Mosaic (TPU): the twin of
`decode_pallas_gpu.py`, reading only the key blocks each row can see.

The grid is (row b, kv head k, key block i). Each row's number of keys
n_b = 1 + max_t position[b, t] and the layer to read of the stacked caches `[L, B, K, S, H]`
(the model's scanned blocks; a slice of the stack would be a copy) are prefetched into SMEM,
and the K/V block index map clamps i to the row's last block: a block past it maps to the one
already in VMEM, so the pipeline fetches nothing for it, and the body skips it (`pl.when`).
A block is `[BLOCK, H]` of one head, a run of the cache's two minor dims (Mosaic tiles those).
For the blocks it runs:

    s  = scale * Q_k K_i^T                     [R, BLOCK] fp32, R = the T x G queries of head k
    s  = -inf where key > query position or past the cache (the edge block's tail)
    m' = max(m, rowmax s)      p = exp(s - m')      l' = l exp(m - m') + rowsum p
    acc' = acc exp(m - m') + p V_i             p in V's dtype, V's rows past the cache zeroed

with m, l, acc in VMEM scratch, and out = acc / l written at the last block (zeros for a query
that sees no key, as the reference). A row's result depends on its own queries and keys and on
S alone (the block size follows from S): the same next to any batch. Rows and kv heads are
parallel grid axes, the key blocks sequential.

Shapes Mosaic needs: the query rows padded to a multiple of 8 (sublanes), the query positions
broadcast over 128 lanes; a block of 512 keys (or the whole cache when shorter).

Not timed (no TPU here): opt-in. `interpret=None` stages the call through
`lax.platform_dependent`: Mosaic when lowered for TPU (also ahead of time from a CPU host), the
Pallas HLO interpreter elsewhere (tests); True: the TPU interpreter.

Letters: B batch, T queries a row, S cache slots, K kv heads, G queries per kv head, H head dim,
R padded query rows of one kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwenjax.kernels.attention.decode_common import MAX_ROWS, attend_block, from_rows, to_rows
from qwenjax.kernels.platform import layer_index

BLOCK = 512  # keys a grid step: K and V blocks of 512 x 256 bf16, 256 KiB each
LANES = 128


def supports(q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> bool:
    """Whether the kernel takes q `[B, T, N, H]` over a cache `[B, K, S, H]`."""
    _, t, n, _ = q_shape
    return t * (n // k_shape[1]) <= MAX_ROWS


def _block(s: int) -> int:
    return BLOCK if s > BLOCK else s  # a block dim must be a multiple of 8 or the whole axis


def _kernel(
    n_ref,  # SMEM [B]: keys each row may see
    layer_ref,  # SMEM [1]: the layer of the stacked caches (read by the index maps only)
    q_ref,  # [R, H] the queries of row b, kv head k
    pos_ref,  # [R, LANES] query row positions (-1: padding), broadcast over lanes
    k_ref,  # [BLOCK, H] key block i of row b, head k of the layer
    v_ref,  # [BLOCK, H]
    o_ref,  # [R, H] out
    m_sc,  # [R, LANES] running max, broadcast over lanes
    l_sc,  # [R, LANES] running sum of exp
    acc_sc,  # [R, H] running output, fp32
    *,
    scale: float,
    block: int,
    s_len: int,
):
    b, i = pl.program_id(0), pl.program_id(2)
    rows = q_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(i * block < n_ref[b])
    def _attend():
        key = i * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)  # [1, BLOCK]
        visible = (key <= pos_ref[:, :1]) & (key < s_len)  # [R, BLOCK]
        in_cache = i * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0) < s_len
        v = jnp.where(in_cache, v_ref[...], 0)  # the edge block's tail
        m, total, acc_sc[...] = attend_block(
            q_ref[...], k_ref[...], v, visible, scale, m_sc[:, :1], l_sc[:, :1], acc_sc[...]
        )
        m_sc[...] = jnp.broadcast_to(m, (rows, LANES))
        l_sc[...] = jnp.broadcast_to(total, (rows, LANES))

    @pl.when(i == pl.num_programs(2) - 1)
    def _write():
        total = l_sc[:, :1]
        out = acc_sc[...] / jnp.where(total > 0, total, 1.0)
        o_ref[...] = jnp.where(total > 0, out, 0.0).astype(o_ref.dtype)


def decode_attention_pallas_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer: jax.Array,
    *,
    q_positions: jax.Array,
    scale: float,
    interpret: bool | None = None,
) -> jax.Array:
    """q `[B, T, N, H]` at `q_positions [B, T]` over layer `layer` (an int32 scalar) of the
    stacked caches k, v `[L, B, K, S, H]`, whose slot s holds position s; causal. Returns
    `[B, T, N, H]` in v's dtype."""
    if not supports(q.shape, k.shape[1:]):
        raise ValueError(
            f"decode attention kernel: needs T x G <= {MAX_ROWS}; got q {q.shape}, cache {k.shape}"
        )
    b, t, n, h = q.shape
    kv, s = k.shape[2], k.shape[3]
    g = n // kv
    rows = -(-t * g // 8) * 8
    block = _block(s)
    blocks = -(-s // block)

    qr, pos, n_keys = to_rows(q, q_positions, kv, s, rows)  # [B, K, R, H], [B, R], [B]
    pos = jnp.broadcast_to(pos[:, :, None], (b, rows, LANES))

    def kv_block(r, x, i, n_ref, layer_ref):  # past the row's last block: the same, no DMA
        # lax.div (truncating, the same on n >= 0): Mosaic lowers jnp's floor division by
        # asking for the TPU of the default device, which fails compiling from a CPU host.
        last = jnp.maximum(jax.lax.div(n_ref[r] + block - 1, block) - 1, 0)
        return layer_ref[0], r, x, jnp.minimum(i, last), 0

    head = lambda r, x, i, *_: (r, x, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, kv, blocks),
        in_specs=[
            pl.BlockSpec((None, None, rows, h), head),
            pl.BlockSpec((None, rows, LANES), lambda r, x, i, *_: (r, 0, 0)),
            pl.BlockSpec((None, None, None, block, h), kv_block),
            pl.BlockSpec((None, None, None, block, h), kv_block),
        ],
        out_specs=pl.BlockSpec((None, None, rows, h), head),
        scratch_shapes=[
            pltpu.VMEM((rows, LANES), jnp.float32),
            pltpu.VMEM((rows, LANES), jnp.float32),
            pltpu.VMEM((rows, h), jnp.float32),
        ],
    )
    kernel = functools.partial(_kernel, scale=scale, block=block, s_len=s)

    def call(mode: str, *args):
        return pl.pallas_call(
            kernel,
            grid_spec=grid_spec,
            out_shape=jax.ShapeDtypeStruct((b, kv, rows, h), v.dtype),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")
            ),
            interpret={"mosaic": False, "hlo": True, "tpu": pltpu.InterpretParams()}[mode],
            name="decode_attention_mosaic",
        )(*args)

    layer = layer_index(layer)
    args = (n_keys, layer, qr, pos, k, v)
    if interpret is None:
        out = jax.lax.platform_dependent(
            *args, tpu=functools.partial(call, "mosaic"), default=functools.partial(call, "hlo")
        )
    else:
        out = call("tpu" if interpret else "mosaic", *args)
    return from_rows(out, t, n)
