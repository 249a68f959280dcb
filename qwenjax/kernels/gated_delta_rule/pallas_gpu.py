"""Chunked gated delta rule as Pallas GPU (Triton) kernels, forward and backward.

The chunked form (`xla.py`) splits into terms that need no state, computed for all chunks at
once by `xla.chunk_terms`, and the state pass, which is sequential over chunks. The UT transform
(A, (I + A)^-1 by block doubling, U, W; one program per chunk and value head) and its backward
are kernels that recompute Tm; the cheap elementwise terms (l2norm, scale, the decay cumsum and
scales) stay jnp, fused by XLA and differentiated by JAX. Per chunk, with S the fp32 state
[E, H] before the chunk and D the decay mask of the chunk:

    Vn = U - W S                                   per-token deltas [C, H]
    O  = read * (Q S) + ((Q K^T) * D) Vn           D_rs = exp(gam_r - gam_s) [s <= r, same run]
    S' = decay * S + K^T (write * Vn)

Only S' depends on the previous chunk, so the state pass is split as flash-linear-attention
splits it: a sequential kernel does the least per chunk (2 matmuls), storing the state before
every chunk (h) and Vn; everything else is parallel over chunks. The kernels, their grids and
their matmuls per chunk (NV = H / BV value blocks, NK = E / BK key blocks, BK = min(BV, E)):

    state_fwd  (B, Hv, NV)      sequential   2  h[i] = S, Vn = U - W S, S' as above
    out_fwd    (B, Hv, M, NV)   parallel     3  O from Q K^T, Q h[i], (Q K^T * D) Vn
    dv_local   (B, Hv, M, NV)   parallel     2  dVl = (Q K^T * D)^T dO
    state_bwd  (B, Hv, NV)      sequential   3  dh[i] = dS', dVn, dS; chunks in reverse
    dqkw       (B, Hv, M, NK)   parallel     4 NV + 2   every other gradient

The backward, with dS' the gradient of the state after the chunk (dh[i]):

    dVn   = dVl + write * (K dS')                     dU = dVn
    dS    = decay * dS' + Q^T (read * dO) - W^T dVn    (state_bwd; dS of chunk 0 is ds0)
    dP    = (dO Vn^T) * D,   dW = -dVn h^T
    dQ    = read * (dO h^T) + dP K,    dK = dP^T Q + write * (Vn dh^T)
    dread = rowsum(Q * (dO h^T)),  dwrite = rowsum(K * (Vn dh^T)),  ddecay = sum(h * dh)
    dgam  = rowsum(Q * (dP K)) - rowsum(K * (dP^T Q))    (= rowsum - colsum of dP * Q K^T)

dqkw loops over the NV value blocks inside the program (the sums over H need no buffers) and is
gridded over key blocks, so a program holds three [C, BK] fp32 accumulators (dO h^T, Vn dh^T,
dVn h^T) and one [C, C] (dO Vn^T), as fla's chunk_bwd_dqkwg does with BK = BV = 64. Its sums over
E (dgam, dread, dwrite, ddecay) are written per key block and summed outside; dQ and dK are
written per value head and summed outside over the G value heads that share a key head (as dK of
the UT transform is). Value head n reads key head n // G through its BlockSpec index map, so q and
k are never repeated, and the decay mask is built in-kernel from gam and the run ids: nothing of
size [C, C] per chunk is read from memory.

Stored between the kernels, in the operand dtype: h [B, K, G, M, E, H] and Vn [B, M, K, G, C, H]
by the forward (the backward's residuals with q, k, w and the gates; not U), dVl, dh and dVn by
the backward. At the 27B geometry (Hv 48, E = H = 128) with 1 x 32768 bf16 tokens: h and dh
768 MiB each, Vn, dVl and dVn 384 MiB each; dQ and dK per value head are fp32 (768 MiB each)
before the sum over G.

Precision: the state and every accumulation are fp32. For fp32 (or float64) inputs the matmul
operands are fp32 at HIGHEST precision (IEEE on the tensor cores' fp32 path, not tf32) and
everything stored is fp32. For bf16 or fp16 inputs, q, k, u, w, h, Vn and the gradients between
kernels are stored and multiplied in that dtype (fp32 accumulation), as flash-linear-attention
does: h, dh and Vn are only matmul operands, except ddecay = sum(h * dh), which then sums rounded
values.

Where it runs: Triton when lowered for CUDA (`lax.platform_dependent`), the Pallas HLO interpreter
everywhere else, so CPU tests run this same kernel code. Head dims are zero-padded to a power of
two >= 16 (Triton's dot needs it; exact, zero columns change nothing), T to a multiple of C.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwenjax.kernels.gated_delta_rule.reference import compute_dtype
from qwenjax.kernels.gated_delta_rule.xla import (
    ChunkTerms,
    chunk_terms,
    initial_state_or_zeros,
    unchunk,
)


class _Config(NamedTuple):
    """Static (hashable) options of one call."""

    block_v: int  # BV, value columns per program
    num_warps: int
    num_stages: int
    operand_dtype: str  # "float32", "bfloat16" or "float16": matmul operand dtype
    interpret: bool | None  # None: Triton on CUDA, interpreter elsewhere


def _next_pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _dot(a, b, dtype, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b with operands in `dtype`, fp32 accumulation; fp32 operands at HIGHEST precision."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        dims,
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _decay_mask(gam, runs):
    """D [C, S]: exp(gam_r - gam_s) for s <= r in the same run, else 0 (never exp of > 0)."""
    c = gam.shape[0]
    rows, cols = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    mask = (cols <= rows) & (runs[:, None] == runs[None, :])
    return jnp.where(mask, jnp.exp(jnp.where(mask, gam[:, None] - gam[None, :], 0.0)), 0.0)


def _attn(q, k, gam_ref, run_ref, dtype):
    """(Q K^T) * D [C, S] of one chunk."""
    mask = _decay_mask(gam_ref[...].astype(jnp.float32), run_ref[...])
    return _dot(q, k, dtype, trans_b=True) * mask


def _state_fwd_kernel(
    k_ref,  # [M, C, E] key head n // G
    u_ref,  # [M, C, BV] value head n, value block j
    w_ref,  # [M, C, E]
    write_ref,  # [M, C]
    decay_ref,  # [M]
    s0_ref,  # [E, BV]
    h_ref,  # [M, E, BV] out: the state before each chunk
    vn_ref,  # [M, C, BV] out
    sf_ref,  # [E, BV] out
    *,
    dtype,
):
    def chunk(i, s):
        h_ref[i] = s.astype(h_ref.dtype)
        vn = u_ref[i].astype(jnp.float32) - _dot(w_ref[i], s, dtype)  # [C, BV]
        vn_ref[i] = vn.astype(vn_ref.dtype)
        write = write_ref[i].astype(jnp.float32)[:, None]
        return decay_ref[i] * s + _dot(k_ref[i], write * vn, dtype, trans_a=True)

    s = jax.lax.fori_loop(0, k_ref.shape[0], chunk, s0_ref[...].astype(jnp.float32))
    sf_ref[...] = s


def _out_kernel(q_ref, k_ref, h_ref, vn_ref, gam_ref, read_ref, run_ref, o_ref, *, dtype):
    """O = read * (Q h) + ((Q K^T) * D) Vn of one chunk and value block: q, k [C, E];
    h [E, BV]; vn, o [C, BV]; gam, read, runs [C]."""
    q = q_ref[...]
    attn = _attn(q, k_ref[...], gam_ref, run_ref, dtype)  # [C, S]
    read = read_ref[...].astype(jnp.float32)[:, None]
    o = read * _dot(q, h_ref[...], dtype) + _dot(attn, vn_ref[...], dtype)
    o_ref[...] = o.astype(o_ref.dtype)


def _dv_local_kernel(q_ref, k_ref, gam_ref, run_ref, do_ref, dvl_ref, *, dtype):
    """dVl = ((Q K^T) * D)^T dO of one chunk and value block: do, dvl [C, BV]."""
    attn = _attn(q_ref[...], k_ref[...], gam_ref, run_ref, dtype)  # [C, S]
    dvl_ref[...] = _dot(attn, do_ref[...], dtype, trans_a=True).astype(dvl_ref.dtype)


def _state_bwd_kernel(
    q_ref,  # [M, C, E]
    k_ref,  # [M, C, E]
    w_ref,  # [M, C, E]
    read_ref,  # [M, C]
    write_ref,  # [M, C]
    decay_ref,  # [M]
    do_ref,  # [M, C, BV]
    dvl_ref,  # [M, C, BV]
    dsf_ref,  # [E, BV]
    dh_ref,  # [M, E, BV] out: the gradient of the state after each chunk
    dvn_ref,  # [M, C, BV] out: dVn = dU
    ds0_ref,  # [E, BV] out
    *,
    dtype,
):
    m, f32 = q_ref.shape[0], jnp.float32

    def chunk(j, ds):  # ds: gradient w.r.t. the state after chunk i
        i = m - 1 - j
        dh_ref[i] = ds.astype(dh_ref.dtype)
        write, read = write_ref[i].astype(f32)[:, None], read_ref[i].astype(f32)[:, None]
        dvn = dvl_ref[i].astype(f32) + write * _dot(k_ref[i], ds, dtype)  # [C, BV]
        dvn_ref[i] = dvn.astype(dvn_ref.dtype)
        rdo = read * do_ref[i].astype(f32)
        return (
            decay_ref[i] * ds
            + _dot(q_ref[i], rdo, dtype, trans_a=True)
            - _dot(w_ref[i], dvn, dtype, trans_a=True)
        )

    ds0_ref[...] = jax.lax.fori_loop(0, m, chunk, dsf_ref[...].astype(f32))


def _dqkw_kernel(
    q_ref,  # [C, BK] key head n // G, key block
    k_ref,  # [C, BK]
    h_ref,  # [BK, H]
    dh_ref,  # [BK, H]
    vn_ref,  # [C, H]
    dvn_ref,  # [C, H]
    do_ref,  # [C, H]
    gam_ref,  # [C]
    read_ref,  # [C]
    write_ref,  # [C]
    run_ref,  # [C]
    dq_ref,  # [C, BK] per value head
    dk_ref,  # [C, BK] per value head
    dw_ref,  # [C, BK]
    dgam_ref,  # [C] partial over key blocks
    dread_ref,  # [C] partial
    dwrite_ref,  # [C] partial
    ddecay_ref,  # [] partial
    *,
    dtype,
    block_v: int,
):
    """Every gradient of one chunk but dU, for one key block; value blocks looped over."""
    f32 = jnp.float32
    c, bk = q_ref.shape
    dp = jnp.zeros((c, c), f32)  # dO Vn^T, masked below
    doh, vndh, dvnh = (jnp.zeros((c, bk), f32) for _ in range(3))  # dO h^T, Vn dh^T, dVn h^T
    ddecay = jnp.zeros((), f32)
    for j in range(h_ref.shape[1] // block_v):
        cols = slice(j * block_v, (j + 1) * block_v)
        h, dh = h_ref[:, cols], dh_ref[:, cols]  # [BK, BV]
        vn, do = vn_ref[:, cols], do_ref[:, cols]  # [C, BV]
        dp += _dot(do, vn, dtype, trans_b=True)
        doh += _dot(do, h, dtype, trans_b=True)
        vndh += _dot(vn, dh, dtype, trans_b=True)
        dvnh += _dot(dvn_ref[:, cols], h, dtype, trans_b=True)
        ddecay += jnp.sum(h.astype(f32) * dh.astype(f32))
    q, k = q_ref[...], k_ref[...]
    dp = dp * _decay_mask(gam_ref[...].astype(f32), run_ref[...])
    dpk = _dot(dp, k, dtype)  # [C, BK]
    dpq = _dot(dp, q, dtype, trans_a=True)  # [C, BK]
    q32, k32 = q.astype(f32), k.astype(f32)
    dq_ref[...] = read_ref[...].astype(f32)[:, None] * doh + dpk
    dk_ref[...] = dpq + write_ref[...].astype(f32)[:, None] * vndh
    dw_ref[...] = (-dvnh).astype(dw_ref.dtype)
    dgam_ref[...] = jnp.sum(q32 * dpk, axis=1) - jnp.sum(k32 * dpq, axis=1)
    dread_ref[...] = jnp.sum(q32 * doh, axis=1)
    dwrite_ref[...] = jnp.sum(k32 * vndh, axis=1)
    ddecay_ref[...] = ddecay


def _dot32(a, b, dtype, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b of fp32 operands (the inverse and its gradient): IEEE for fp32 inputs, tf32
    (DEFAULT) for bf16 inputs, whose error is below the inputs' own."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _ut_prologue(k, beta, gam, runs, dtype):
    """(Tm = (I + A)^-1, K K^T, the strict decay mask D) of one chunk; A = beta (K K^T) * D."""
    c = k.shape[0]
    rows, cols = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    strict = (cols < rows) & (runs[:, None] == runs[None, :])
    decay = jnp.where(strict, jnp.exp(jnp.where(strict, gam[:, None] - gam[None, :], 0.0)), 0.0)
    kk = _dot(k, k, dtype, trans_b=True)  # [C, S]
    a = beta[:, None] * kk * decay  # strictly lower
    # Block doubling (see xla._invert_unit_lower): X_2b = X_b - X_b E_b X_b, log2(C) levels.
    tm = (rows == cols).astype(jnp.float32)
    b = 1
    while b < c:
        block = (rows // (2 * b) == cols // (2 * b)) & ((rows // b) % 2 == 1)
        e = jnp.where(block & ((cols // b) % 2 == 0), a, 0.0)
        tm = tm - _dot32(_dot32(tm, e, dtype), tm, dtype)
        b *= 2
    return tm, kk, decay


def _ut_kernel(k_ref, v_ref, beta_ref, gam_ref, read_ref, run_ref, u_ref, w_ref, *, dtype):
    """One chunk of one value head: U = Tm (beta V), W = Tm (beta read K), Tm = (I + A)^-1."""
    k = k_ref[...]  # [C, E]
    beta = beta_ref[...].astype(jnp.float32)  # [C]
    tm, _, _ = _ut_prologue(k, beta, gam_ref[...].astype(jnp.float32), run_ref[...], dtype)
    bv = beta[:, None] * v_ref[...].astype(jnp.float32)  # [C, H]
    bk = (beta * read_ref[...].astype(jnp.float32))[:, None] * k.astype(jnp.float32)  # [C, E]
    u_ref[...] = _dot(tm, bv, dtype).astype(u_ref.dtype)
    w_ref[...] = _dot(tm, bk, dtype).astype(w_ref.dtype)


def _ut_bwd_kernel(
    k_ref, v_ref, beta_ref, gam_ref, read_ref, run_ref, du_ref, dw_ref,  # inputs
    dk_ref, dv_ref, dbeta_ref, dgam_ref, dread_ref,  # outputs (dk per value head)
    *, dtype,
):  # fmt: skip
    """Gradients of one chunk's UT transform, Tm recomputed:

    dXv = Tm^T dU, dXk = Tm^T dW            (w.r.t. beta V and beta read K)
    dA  = -Tm^T (dU (beta V)^T + dW (beta read K)^T) Tm^T
    then through A = beta (K K^T) * D: dK += (dA beta D) K + (dA beta D)^T K; dgam from D.
    """
    f32 = jnp.float32
    k = k_ref[...]  # [C, E]
    k32, v32 = k.astype(f32), v_ref[...].astype(f32)
    beta, gam, read = (r[...].astype(f32) for r in (beta_ref, gam_ref, read_ref))  # [C]
    du, dw = du_ref[...].astype(f32), dw_ref[...].astype(f32)  # [C, H], [C, E]
    tm, kk, decay = _ut_prologue(k, beta, gam, run_ref[...], dtype)
    bv = beta[:, None] * v32
    bk = (beta * read)[:, None] * k32
    dxv = _dot(tm, du, dtype, trans_a=True)  # [C, H]
    dxk = _dot(tm, dw, dtype, trans_a=True)  # [C, E]
    dtm = _dot(du, bv, dtype, trans_b=True) + _dot(dw, bk, dtype, trans_b=True)  # [C, S]
    da = -_dot32(_dot32(tm, dtm, dtype, trans_a=True), tm, dtype, trans_b=True)
    dkk = da * beta[:, None] * decay  # [C, S]; zero off the strict mask, as D is
    dk_ref[...] = (
        _dot(dkk, k, dtype) + _dot(dkk, k, dtype, trans_a=True) + (beta * read)[:, None] * dxk
    )
    dv_ref[...] = beta[:, None] * dxv
    p = dkk * kk  # dD * D: the gradient of the exponent gam_r - gam_s
    dgam_ref[...] = jnp.sum(p, axis=1) - jnp.sum(p, axis=0)
    k_dxk = jnp.sum(dxk * k32, axis=1)
    dbeta_ref[...] = jnp.sum(da * kk * decay, axis=1) + jnp.sum(dxv * v32, axis=1) + read * k_dxk
    dread_ref[...] = beta * k_dxk


class _Dims(NamedTuple):
    b: int
    m: int
    c: int
    hk: int
    grp: int
    e: int
    h: int


def _dims(t: ChunkTerms) -> _Dims:
    b, m, hk, grp, c, h = t.u.shape
    return _Dims(b, m, c, hk, grp, t.q.shape[-1], h)


def _seq_specs(d: _Dims, bv: int) -> dict[str, pl.BlockSpec]:
    """BlockSpecs of the sequential grid (B, Hv, H / BV): every chunk (M) in one block."""

    def value_head(n):
        return n // d.grp, n % d.grp

    def per_v(*block):  # arrays laid out [B, M, K, G, ...], whole trailing dims
        return pl.BlockSpec(
            (None, d.m, None, None, *block),
            lambda b, n, j: (b, 0, *value_head(n), *([0] * len(block))),
        )

    return {
        "qk": pl.BlockSpec((None, d.m, d.c, None, d.e), lambda b, n, j: (b, 0, 0, n // d.grp, 0)),
        "uv": pl.BlockSpec(  # [B, M, K, G, C, H], value block j
            (None, d.m, None, None, d.c, bv), lambda b, n, j: (b, 0, *value_head(n), 0, j)
        ),
        "w": per_v(d.c, d.e),  # [B, M, K, G, C, E]
        "vec": per_v(d.c),  # [B, M, K, G, C]
        "scalar": per_v(),  # [B, M, K, G]
        "state": pl.BlockSpec(  # [B, K, G, E, H]
            (None, None, None, d.e, bv), lambda b, n, j: (b, *value_head(n), 0, j)
        ),
        "h": pl.BlockSpec(  # [B, K, G, M, E, H]
            (None, None, None, d.m, d.e, bv), lambda b, n, j: (b, *value_head(n), 0, 0, j)
        ),
    }


def _chunk_specs(d: _Dims, bk: int, bv: int) -> dict[str, pl.BlockSpec]:
    """BlockSpecs of a parallel grid (B, Hv, M, X), one chunk per program. X picks the value
    block when bk == E (out_fwd, dv_local) or the key block when bv == H (dqkw)."""
    over_k = bk < d.e

    def kb(x):
        return x if over_k else 0

    def vb(x):
        return 0 if over_k else x

    def heads(n):
        return n // d.grp, n % d.grp

    def per_v(*block):  # [B, M, K, G, ...]
        return (None, None, None, None, *block)

    return {
        "qk": pl.BlockSpec(  # [B, M, C, K, E]
            (None, None, d.c, None, bk), lambda b, n, i, x: (b, i, 0, n // d.grp, kb(x))
        ),
        "uv": pl.BlockSpec(per_v(d.c, bv), lambda b, n, i, x: (b, i, *heads(n), 0, vb(x))),
        "e": pl.BlockSpec(per_v(d.c, bk), lambda b, n, i, x: (b, i, *heads(n), 0, kb(x))),
        "vec": pl.BlockSpec(per_v(d.c), lambda b, n, i, x: (b, i, *heads(n), 0)),
        "runs": pl.BlockSpec((None, None, d.c), lambda b, n, i, x: (b, i, 0)),
        "h": pl.BlockSpec(  # [B, K, G, M, E, H]
            per_v(bk, bv), lambda b, n, i, x: (b, *heads(n), i, kb(x), vb(x))
        ),
        "p_vec": pl.BlockSpec(  # [NK, B, M, K, G, C], partial sums over key blocks
            (None, *per_v(d.c)), lambda b, n, i, x: (x, b, i, *heads(n), 0)
        ),
        "p_scalar": pl.BlockSpec((None, *per_v()), lambda b, n, i, x: (x, b, i, *heads(n))),
    }


def _call(cfg: _Config, kernel, grid, in_specs, out_specs, out_shape, name, *args):
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def run(interpret: bool, *args):
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=params,
            interpret=interpret,
            name=name,
        )(*args)

    if cfg.interpret is None:
        return jax.lax.platform_dependent(
            *args, cuda=functools.partial(run, False), default=functools.partial(run, True)
        )
    return run(cfg.interpret, *args)


def _like(x: jax.Array, dtype=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype if dtype is None else dtype)


def _state_fwd(cfg: _Config, t: ChunkTerms, s0: jax.Array):
    """Sequential: (h [B, K, G, M, E, H], Vn [B, M, K, G, C, H], final state [B, K, G, E, H])."""
    d = _dims(t)
    sp = _seq_specs(d, cfg.block_v)
    io = jnp.dtype(cfg.operand_dtype)
    return _call(
        cfg,
        functools.partial(_state_fwd_kernel, dtype=io),
        (d.b, d.hk * d.grp, d.h // cfg.block_v),
        [sp["qk"], sp["uv"], sp["w"], sp["vec"], sp["scalar"], sp["state"]],
        [sp["h"], sp["uv"], sp["state"]],
        [
            jax.ShapeDtypeStruct((d.b, d.hk, d.grp, d.m, d.e, d.h), io),
            _like(t.u, io),
            _like(s0, jnp.float32),
        ],
        "gated_delta_rule_state_fwd",
        t.k,
        t.u,
        t.w,
        t.write,
        t.decay,
        s0,
    )


def _per_value_block(cfg: _Config, t: ChunkTerms, kernel, name: str, specs, *args):
    """A parallel kernel over (B, Hv, M, H / BV) whose output is laid out like u."""
    d = _dims(t)
    sp = _chunk_specs(d, d.e, cfg.block_v)
    return _call(
        cfg,
        functools.partial(kernel, dtype=jnp.dtype(cfg.operand_dtype)),
        (d.b, d.hk * d.grp, d.m, d.h // cfg.block_v),
        [sp[s] for s in specs],
        sp["uv"],
        _like(t.u),
        f"gated_delta_rule_{name}",
        *args,
    )


def _out_fwd(cfg: _Config, t: ChunkTerms, h: jax.Array, vn: jax.Array) -> jax.Array:
    """Parallel over chunks: out [B, M, K, G, C, H]."""
    specs = ("qk", "qk", "h", "uv", "vec", "vec", "runs")
    args = (t.q, t.k, h, vn, t.gam, t.read, t.runs)
    return _per_value_block(cfg, t, _out_kernel, "out_fwd", specs, *args)


def _dv_local(cfg: _Config, t: ChunkTerms, do: jax.Array) -> jax.Array:
    """Parallel over chunks: dVl [B, M, K, G, C, H], the intra-chunk part of dVn."""
    specs = ("qk", "qk", "vec", "runs", "uv")
    return _per_value_block(
        cfg, t, _dv_local_kernel, "dv_local", specs, t.q, t.k, t.gam, t.runs, do
    )


def _state_bwd(cfg: _Config, t: ChunkTerms, do: jax.Array, dvl: jax.Array, dsf: jax.Array):
    """Sequential, chunks in reverse: (dh [B, K, G, M, E, H], dVn = dU, ds0 [B, K, G, E, H])."""
    d = _dims(t)
    sp = _seq_specs(d, cfg.block_v)
    io = jnp.dtype(cfg.operand_dtype)
    return _call(
        cfg,
        functools.partial(_state_bwd_kernel, dtype=io),
        (d.b, d.hk * d.grp, d.h // cfg.block_v),
        [sp["qk"], sp["qk"], sp["w"], *[sp["vec"]] * 2, sp["scalar"], *[sp["uv"]] * 2, sp["state"]],
        [sp["h"], sp["uv"], sp["state"]],
        [
            jax.ShapeDtypeStruct((d.b, d.hk, d.grp, d.m, d.e, d.h), io),
            _like(t.u),
            _like(dsf, jnp.float32),
        ],
        "gated_delta_rule_state_bwd",
        t.q,
        t.k,
        t.w,
        t.read,
        t.write,
        t.decay,
        do,
        dvl,
        dsf,
    )


def _dqkw(cfg: _Config, t: ChunkTerms, h, dh, vn, dvn, do):
    """Parallel over chunks and key blocks: dq, dk (per value head), dw [B, M, K, G, C, E] and
    the partials over key blocks of dgam, dread, dwrite [NK, B, M, K, G, C], ddecay [NK, ...]."""
    d = _dims(t)
    bk = min(cfg.block_v, d.e)
    nk, f32 = d.e // bk, jnp.float32
    sp = _chunk_specs(d, bk, d.h)
    per_e = jax.ShapeDtypeStruct(t.w.shape, f32)
    part_vec = jax.ShapeDtypeStruct((nk, *t.gam.shape), f32)
    part_scalar = jax.ShapeDtypeStruct((nk, *t.decay.shape), f32)
    return _call(
        cfg,
        functools.partial(_dqkw_kernel, dtype=jnp.dtype(cfg.operand_dtype), block_v=cfg.block_v),
        (d.b, d.hk * d.grp, d.m, nk),
        [sp["qk"], sp["qk"], sp["h"], sp["h"], *[sp["uv"]] * 3, *[sp["vec"]] * 3, sp["runs"]],
        [sp["e"], sp["e"], sp["e"], *[sp["p_vec"]] * 3, sp["p_scalar"]],
        [per_e, per_e, _like(t.w), part_vec, part_vec, part_vec, part_scalar],
        "gated_delta_rule_dqkw",
        t.q,
        t.k,
        h,
        dh,
        vn,
        dvn,
        do,
        t.gam,
        t.read,
        t.write,
        t.runs,
    )


def _forward(cfg: _Config, t: ChunkTerms, s0: jax.Array):
    h, vn, sf = _state_fwd(cfg, t, s0)
    return _out_fwd(cfg, t, h, vn), sf, h, vn


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _state_pass(cfg: _Config, t: ChunkTerms, s0: jax.Array):
    out, sf, _, _ = _forward(cfg, t, s0)
    return out, sf


def _state_pass_fwd(cfg, t, s0):
    out, sf, h, vn = _forward(cfg, t, s0)
    return (out, sf), (t._replace(u=None), h, vn)  # the backward reads Vn, never U


def _state_pass_bwd(cfg, residuals, cotangents):
    t, h, vn = residuals
    t = t._replace(u=vn)  # only as the shape and dtype of U (and of out, dVl, dVn)
    do, dsf = cotangents
    dh, dvn, ds0 = _state_bwd(cfg, t, do, _dv_local(cfg, t, do), dsf)
    dq, dk, dw, dgam, dread, dwrite, ddecay = _dqkw(cfg, t, h, dh, vn, dvn, do)

    def per_key_head(x):  # [B, M, K, G, C, E] -> [B, M, C, K, E]
        return jnp.moveaxis(x.sum(axis=3), 3, 2)

    grads = t._replace(
        q=per_key_head(dq).astype(t.q.dtype),
        k=per_key_head(dk).astype(t.k.dtype),
        u=dvn,
        w=dw,
        gam=dgam.sum(axis=0),
        read=dread.sum(axis=0),
        write=dwrite.sum(axis=0),
        decay=ddecay.sum(axis=0),
        runs=None,
        attn=None,
    )
    return grads, ds0


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


def _ut_specs(k, v):
    """BlockSpecs of grid (B, Hv, M) for the UT kernels: key head n // G, value head n."""
    c, e, grp, h = k.shape[2], k.shape[-1], v.shape[3], v.shape[-1]

    def per_v(*block):  # [B, M, K, G, C, ...]
        return pl.BlockSpec(
            (None, None, None, None, c, *block),
            lambda i, n, j: (i, j, n // grp, n % grp, 0, *([0] * len(block))),
        )

    return {
        "k": pl.BlockSpec((None, None, c, None, e), lambda i, n, j: (i, j, 0, n // grp, 0)),
        "v": per_v(h),
        "e": per_v(e),
        "vec": per_v(),
        "runs": pl.BlockSpec((None, None, c), lambda i, n, j: (i, j, 0)),
    }


def _ut_grid(k, v):
    b, m, _, hk, _ = k.shape
    return (b, hk * v.shape[3], m)


def _ut_call(cfg: _Config, k, v, beta, gam, read, runs):
    b, m, c, hk, e = k.shape
    grp = v.shape[3]
    io = jnp.dtype(cfg.operand_dtype)
    sp = _ut_specs(k, v)
    return _call(
        cfg,
        functools.partial(_ut_kernel, dtype=io),
        _ut_grid(k, v),
        [sp["k"], sp["v"], sp["vec"], sp["vec"], sp["vec"], sp["runs"]],
        [sp["v"], sp["e"]],
        [
            jax.ShapeDtypeStruct(v.shape, io),
            jax.ShapeDtypeStruct((b, m, hk, grp, c, e), io),
        ],
        "gated_delta_rule_ut",
        k.astype(io),
        v.astype(io),
        beta,
        gam,
        read,
        runs,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ut(cfg, k, v, beta, gam, read, runs):
    u, w = _ut_call(cfg, k, v, beta, gam, read, runs)
    return u.astype(v.dtype), w.astype(k.dtype)


def _ut_fwd(cfg, k, v, beta, gam, read, runs):
    return _ut(cfg, k, v, beta, gam, read, runs), (k, v, beta, gam, read, runs)


def _ut_bwd(cfg, residuals, cotangents):
    k, v, beta, gam, read, runs = residuals
    du, dw = cotangents
    b, m, c, hk, e = k.shape
    grp = v.shape[3]
    io = jnp.dtype(cfg.operand_dtype)
    sp = _ut_specs(k, v)
    vec = jax.ShapeDtypeStruct(beta.shape, jnp.float32)
    dk, dv, dbeta, dgam, dread = _call(
        cfg,
        functools.partial(_ut_bwd_kernel, dtype=io),
        _ut_grid(k, v),
        [sp["k"], sp["v"], sp["vec"], sp["vec"], sp["vec"], sp["runs"], sp["v"], sp["e"]],
        [sp["e"], sp["v"], sp["vec"], sp["vec"], sp["vec"]],
        [
            jax.ShapeDtypeStruct((b, m, hk, grp, c, e), jnp.float32),
            jax.ShapeDtypeStruct(v.shape, jnp.float32),
            vec,
            vec,
            vec,
        ],
        "gated_delta_rule_ut_bwd",
        k.astype(io),
        v.astype(io),
        beta,
        gam,
        read,
        runs,
        du,
        dw,
    )
    dk = jnp.moveaxis(dk.sum(axis=3), 3, 2)  # value heads summed onto their key head
    return (
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        dbeta.astype(beta.dtype),
        dgam.astype(gam.dtype),
        dread.astype(read.dtype),
        None,
    )


_ut.defvjp(_ut_fwd, _ut_bwd)


def gated_delta_rule_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    block_v: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule with the state pass as Pallas GPU kernels (forward and backward).

    Arguments and results are those of `api.gated_delta_rule` (shapes, dtypes, the
    optional initial state and segment ids); this backend adds:

      chunk_size: tokens per chunk (a power of two >= 16).
      block_v: value columns per program (a power of two dividing the padded dv); default
        min(64, padded dv).
      num_warps, num_stages: Triton launch options.
      interpret: None: Triton when lowered for CUDA, the HLO interpreter elsewhere; True: the
        interpreter anywhere; False: Triton (CUDA only).
    """
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    dkp, dvp = _next_pow2(dk), _next_pow2(dv)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    block_v = min(64, dvp) if block_v is None else block_v
    if block_v < 16 or dvp % block_v or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16 dividing {dvp}, got {block_v}")
    state_dtype = compute_dtype(q, k, v)
    low = jnp.dtype(v.dtype) in (jnp.bfloat16, jnp.float16)
    cfg = _Config(
        block_v=block_v,
        num_warps=num_warps,
        num_stages=num_stages,
        operand_dtype=jnp.dtype(v.dtype).name if low else "float32",
        interpret=interpret,
    )
    # Zero-padding the head dims is exact: the pads add nothing to norms or dot products.
    scale = dk**-0.5 if scale is None else scale
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, dkp - dk)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, dkp - dk)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dvp - dv)))
    terms = chunk_terms(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        segment_ids=segment_ids,
        use_qk_l2norm=use_qk_l2norm,
        chunk_size=chunk_size,
        precision=jax.lax.Precision.DEFAULT if low else jax.lax.Precision.HIGHEST,
        ut=lambda k, v, beta, gam, read, runs, precision: _ut(cfg, k, v, beta, gam, read, runs),
    )
    # The kernels compute in fp32 (float64 inputs exist only in CPU tests).
    io = jnp.dtype(cfg.operand_dtype)
    terms = terms._replace(
        q=terms.q.astype(io),
        k=terms.k.astype(io),
        u=terms.u.astype(io),
        w=terms.w.astype(io),
        gam=terms.gam.astype(jnp.float32),
        read=terms.read.astype(jnp.float32),
        write=terms.write.astype(jnp.float32),
        decay=terms.decay.astype(jnp.float32),
        attn=None,
    )
    if initial_state is not None:
        initial_state = jnp.pad(initial_state, ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)))
    s0 = initial_state_or_zeros(initial_state, b, hk, hv // hk, dkp, dvp, jnp.float32)
    out, state = _state_pass(cfg, terms, s0)
    out = unchunk(out, t)[..., :dv].astype(v.dtype)
    state = state.reshape(b, hv, dkp, dvp)[:, :, :dk, :dv].astype(state_dtype)
    return out, state
