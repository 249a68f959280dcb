"""Attention of a few queries per row over a KV cache (decoding, speculative verification), in
Pallas Triton (GPU): each row reads only the keys it can see, never the whole cache.

The xla path computes every row's logits over all S cache slots, so a decode step reads the
whole cache whatever the rows' lengths (32 slots x 32K slots of the 27B: ~34 GB a step, beside
54 GB of weights). Here the program of row b, kv head k and key split j walks key blocks

    for i in blocks of split j below ceil(n_b / BLOCK):        n_b = 1 + max_t position[b, t]
        s    = scale * Q K_i^T                 [R, BLOCK] fp32, R = the T x G queries of head k
        s    = -inf where key > query position (and on a clamped block's overlap)
        m'   = max(m, rowmax s)       p = exp(s - m')
        l'   = l exp(m - m') + rowsum p       o' = o exp(m - m') + p V_i  (p in V's dtype)

and writes its split's (o, m, l); the splits are merged in jnp, in their fixed order:
out = sum_j o_j e^(m_j - M) / sum_j l_j e^(m_j - M), zeros for a query that sees no key (as the
reference). Blocks past n_b are never read. The cache is the stacked caches of the model's
scanned blocks `[L, B, K, S, H]` (L = 1 for a lone cache) and the kernel reads layer `layer`
itself: a slice handed to it would be a copy of the layer's whole cache every step. A row's
result depends on its own queries and keys and on S alone (block and split sizes follow from
S), not on the batch it is in, so a request decodes the same next to any others.

Shapes Triton needs: the T x G query rows are padded to a power of two of at least 16 (tl.dot's
smallest), H must be a power of two. S need not be a multiple of the block: the last block is
read from S - BLOCK (in bounds) and its keys below i * BLOCK, already counted, are masked.

Not timed yet: "auto" keeps the xla path until `benchmarks/decode_attention.py` shows this is
faster on a GPU. Where it runs: Triton when lowered for CUDA, the interpreter elsewhere.

Letters: B batch, T queries a row, S cache slots, K kv heads, G queries per kv head, H head dim,
R = padded T x G query rows of one kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwenjax.kernels.attention.decode_common import MAX_ROWS, attend_block, from_rows, to_rows
from qwenjax.kernels.platform import layer_index, triton_or_interpreted

BLOCK = 64  # keys a loop step: K and V blocks of 64 x 256 bf16, 64 KB with two pipeline stages
SPLIT = 1024  # keys a program: splits spread a short batch over the SMs


def supports(q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> bool:
    """Whether the kernel takes q `[B, T, N, H]` over a cache `[B, K, S, H]`."""
    _, t, n, h = q_shape
    kv, s = k_shape[1], k_shape[2]
    pow2 = lambda x: x & (x - 1) == 0
    return pow2(h) and h >= 16 and s >= 16 and t * (n // kv) <= MAX_ROWS


def _rows(t: int, g: int) -> int:
    return max(16, 1 << (t * g - 1).bit_length())


def _block(s: int) -> int:
    return min(BLOCK, 1 << (s.bit_length() - 1))  # at most S, so a clamped block stays in bounds


def _split_kernel(
    layer_ref,  # [1] the layer of the stack to read
    n_ref,  # [1] keys row b may see: 1 + its last query's position
    pos_ref,  # [R] each query row's position (-1: a padding row)
    q_ref,  # [R, H]
    k_ref,  # [L, B, K, S, H] the whole stack, of which [layer, b, k] is read
    v_ref,  # [L, B, K, S, H]
    o_ref,  # [R, H] out: unnormalised output of split j, fp32
    m_ref,  # [R, 1] out: running max
    l_ref,  # [R, 1] out: running sum of exp
    *,
    scale: float,
    block: int,
    split_blocks: int,
):
    s_len = k_ref.shape[3]
    at = (layer_ref[0], pl.program_id(0), pl.program_id(1))  # layer, row, kv head: outside the loop
    first = pl.program_id(2) * split_blocks
    last = jnp.minimum(first + split_blocks, (n_ref[0] + block - 1) // block)
    q = q_ref[...]
    pos = pos_ref[...]
    cols = jnp.arange(block)

    def step(i, carry):
        start = jnp.minimum(i * block, s_len - block)
        idx = start + cols  # [BLOCK] cache slots read
        visible = (idx[None, :] <= pos[:, None]) & (idx[None, :] >= i * block)
        k = k_ref[(*at, pl.ds(start, block), slice(None))]
        v = v_ref[(*at, pl.ds(start, block), slice(None))]
        return attend_block(q, k, v, visible, scale, *carry)

    rows, h = q_ref.shape
    init = (
        jnp.full((rows, 1), -jnp.inf, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, h), jnp.float32),
    )
    m, den, o = jax.lax.fori_loop(first, jnp.maximum(first, last), step, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = den


def decode_attention_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer: jax.Array,
    *,
    q_positions: jax.Array,
    scale: float,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """q `[B, T, N, H]` at `q_positions [B, T]` over layer `layer` (an int32 scalar) of the
    stacked caches k, v `[L, B, K, S, H]`, whose slot s holds position s; causal (a query sees
    slots <= its position). Returns `[B, T, N, H]` in v's dtype. `interpret=None`: Triton when
    lowered for CUDA, the interpreter elsewhere."""
    if not supports(q.shape, k.shape[1:]):
        raise ValueError(
            f"decode attention kernel: needs a power-of-two head dim >= 16, >= 16 cache slots "
            f"and T x G <= {MAX_ROWS}; got q {q.shape}, cache {k.shape}"
        )
    b, t, n, h = q.shape
    kv, s = k.shape[2], k.shape[3]
    g = n // kv
    rows = _rows(t, g)
    block = _block(s)
    split_blocks = max(1, SPLIT // block)
    splits = pl.cdiv(pl.cdiv(s, block), split_blocks)

    qr, pos, n_keys = to_rows(q, q_positions, kv, s, rows)  # [B, K, R, H], [B, R], [B]

    # The whole stacks, indexed in the kernel: a block spec cannot follow a traced layer index.
    in_specs = [
        pl.BlockSpec((1,), lambda i, x, j: (0,)),
        pl.BlockSpec((1,), lambda i, x, j: (i,)),
        pl.BlockSpec((None, rows), lambda i, x, j: (i, 0)),
        pl.BlockSpec((None, None, rows, h), lambda i, x, j: (i, x, 0, 0)),
        pl.no_block_spec,
        pl.no_block_spec,
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, rows, h), lambda i, x, j: (i, x, j, 0, 0)),
        pl.BlockSpec((None, None, None, rows, 1), lambda i, x, j: (i, x, j, 0, 0)),
        pl.BlockSpec((None, None, None, rows, 1), lambda i, x, j: (i, x, j, 0, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, kv, splits, rows, h), jnp.float32),
        jax.ShapeDtypeStruct((b, kv, splits, rows, 1), jnp.float32),
        jax.ShapeDtypeStruct((b, kv, splits, rows, 1), jnp.float32),
    ]
    kernel = functools.partial(_split_kernel, scale=scale, block=block, split_blocks=split_blocks)

    def run(interpret: bool, *args):
        return pl.pallas_call(
            kernel,
            grid=(b, kv, splits),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="decode_attention_triton",
        )(*args)

    layer = layer_index(layer)
    o, m, den = triton_or_interpreted(run, interpret, layer, n_keys, pos, qr, k, v)
    return from_rows(_merge(o, m, den), t, n).astype(v.dtype)


def _merge(o: jax.Array, m: jax.Array, den: jax.Array) -> jax.Array:
    """The splits' partial softmaxes `o [B, K, J, R, H]`, `m, den [B, K, J, R, 1]` as one."""
    top = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - jnp.where(top == -jnp.inf, 0.0, top))  # 0 for a split that saw no key
    total = jnp.sum(w * den, axis=2)  # [B, K, R, 1]
    out = jnp.sum(w * o, axis=2)  # [B, K, R, H]
    return jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)
