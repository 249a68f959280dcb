"""Chunked gated delta rule as Pallas GPU (Triton) kernels, forward and backward.

The chunked form (`xla.py`) splits into terms that need no state, computed for all chunks at
once by `xla.chunk_terms`, and the state pass, which is sequential over chunks. The UT transform
(A, (I + A)^-1 by block doubling, U, W; one program per chunk and value head) and its backward
are kernels that recompute Tm; the cheap elementwise terms (the decay cumsum and scales) stay
jnp, fused by XLA and differentiated by JAX. The l2norm of q and k and the query scale are fused
into the kernels: they read raw q and k and one factor per token and key head (rq = scale / |q|,
rk = 1 / |k|, computed outside from q and k), and scale the rows of each tile they load, so no
normalised copy of q or k is ever written. Their dq and dk are w.r.t. the normalised q and k;
beside them they write the rowsums of q dq and k dk, the gradients of the factors (times the
factors), and the chain rule to raw q, k happens outside (`_row_grads`). Per chunk, with S the
fp32 state [E, H] before the chunk and D the decay mask of the chunk:

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

Layouts: v, out and their gradients stay in the caller's token-major order ([B, T, Hv, H] seen as
[B, M, C, K, G, H]: the BlockSpecs pick a value head's [C, H] block out of it), so nothing
transposes them into and out of the kernels (at 8 x 4096 bf16 tokens that was 4 x 384 MiB written
around a forward and backward). U and W (and their gradients) are in the operand dtype. At that
size XLA's own instructions around the kernels write 63 MiB forward and 348 MiB forward and
backward (`benchmarks/gpu_compile.py`; 1079 and 3676 MiB before these layouts and the in-kernel
l2norm).

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

The kernel bodies are in `pallas_gpu_kernels.py`; this module holds their grids, BlockSpecs,
launches and gradients.

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

from qwenjax.kernels.gated_delta_rule.pallas_gpu_kernels import (
    dqkw_kernel,
    dv_local_kernel,
    out_kernel,
    state_bwd_kernel,
    state_fwd_kernel,
    ut_bwd_kernel,
    ut_kernel,
)
from qwenjax.kernels.gated_delta_rule.reference import compute_dtype, inverse_l2_norm
from qwenjax.kernels.gated_delta_rule.xla import chunk_terms, initial_state_or_zeros
from qwenjax.kernels.platform import triton_or_interpreted


class _Config(NamedTuple):
    """Static (hashable) options of one call."""

    block_v: int  # BV, value columns per program
    num_warps: int
    num_stages: int
    operand_dtype: str  # "float32", "bfloat16" or "float16": matmul operand dtype
    interpret: bool | None  # None: Triton on CUDA, interpreter elsewhere


def _next_pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class _Dims(NamedTuple):
    b: int
    m: int
    c: int
    hk: int
    grp: int
    e: int
    h: int


class _Terms(NamedTuple):
    """What the state-pass kernels read: `xla.ChunkTerms` without attn, with q and k raw
    (chunked, in the operand dtype) beside their row factors, so that the kernels apply the
    l2norm and the query scale to the tiles they load (no normalised copy of q, k exists)."""

    q: jax.Array  # [B, M, C, K, E]
    rq: jax.Array  # [B, M, C, K] fp32: the rule reads q * rq (l2norm and scale)
    k: jax.Array  # [B, M, C, K, E]
    rk: jax.Array  # [B, M, C, K] fp32: the rule reads k * rk
    u: jax.Array  # [B, M, K, G, C, H]
    w: jax.Array  # [B, M, K, G, C, E]
    gam: jax.Array  # [B, M, K, G, C]
    read: jax.Array  # [B, M, K, G, C]
    write: jax.Array  # [B, M, K, G, C]
    decay: jax.Array  # [B, M, K, G]
    runs: jax.Array  # [B, M, C]


def _row_factors(q, k, scale: float, use_qk_l2norm: bool):
    """Per token and key head, the factors that make q and k what the rule reads
    (`reference.prepare_qk`): q * scale / |q|, k / |k| ([B, T, K], in the compute dtype)."""
    if not use_qk_l2norm:
        ones = jnp.ones(q.shape[:-1], compute_dtype(q, k))
        return ones * scale, ones
    return inverse_l2_norm(q) * scale, inverse_l2_norm(k)


def _row_grads(dx_hat, xdx, x, r):
    """(dx, dr): the gradients w.r.t. raw x [B, M, C, K, E] and its row factor r [B, M, C, K],
    from dx_hat [B, M, K, G, C, E], the gradient w.r.t. x_hat = x r per value head, and xdx
    [..., B, M, K, G, C], the kernels' partial rowsums of x_hat dx_hat, which are r dr: the
    sum over G is then taken once, into dx, and not kept in fp32 for a second pass. r = 0
    (a query scale of 0) makes x_hat 0 and r's own gradient through x nothing: dr = 0."""
    r_v = jnp.moveaxis(r, 2, 3)[:, :, :, None, :, None]  # [B, M, K, 1, C, 1]
    dx = jnp.moveaxis(jnp.sum(dx_hat * r_v, axis=3), 3, 2)  # value heads summed onto theirs
    r_dr = jnp.moveaxis(jnp.sum(xdx, axis=(*range(xdx.ndim - 5), -2)), 3, 2)
    dr = jnp.where(r == 0, 0.0, r_dr / jnp.where(r == 0, 1.0, r))
    return dx.astype(x.dtype), dr


def _dims(t: _Terms) -> _Dims:
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
        "r": pl.BlockSpec((None, d.m, d.c, None), lambda b, n, j: (b, 0, 0, n // d.grp)),
        "uv": pl.BlockSpec(  # [B, M, K, G, C, H], value block j
            (None, d.m, None, None, d.c, bv), lambda b, n, j: (b, 0, *value_head(n), 0, j)
        ),
        "tok": pl.BlockSpec(  # [B, M, C, K, G, H] (out and dO: the caller's order), block j
            (None, d.m, d.c, None, None, bv), lambda b, n, j: (b, 0, 0, *value_head(n), j)
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
        "r": pl.BlockSpec((None, None, d.c, None), lambda b, n, i, x: (b, i, 0, n // d.grp)),
        "uv": pl.BlockSpec(per_v(d.c, bv), lambda b, n, i, x: (b, i, *heads(n), 0, vb(x))),
        "tok": pl.BlockSpec(  # [B, M, C, K, G, H] (out and dO: the caller's order)
            (None, None, d.c, None, None, bv), lambda b, n, i, x: (b, i, 0, *heads(n), vb(x))
        ),
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

    return triton_or_interpreted(run, cfg.interpret, *args)


def _like(x: jax.Array, dtype=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype if dtype is None else dtype)


def _state_fwd(cfg: _Config, t: _Terms, s0: jax.Array):
    """Sequential: (h [B, K, G, M, E, H], Vn [B, M, K, G, C, H], final state [B, K, G, E, H])."""
    d = _dims(t)
    sp = _seq_specs(d, cfg.block_v)
    io = jnp.dtype(cfg.operand_dtype)
    return _call(
        cfg,
        functools.partial(state_fwd_kernel, dtype=io),
        (d.b, d.hk * d.grp, d.h // cfg.block_v),
        [sp["qk"], sp["r"], sp["uv"], sp["w"], sp["vec"], sp["scalar"], sp["state"]],
        [sp["h"], sp["uv"], sp["state"]],
        [
            jax.ShapeDtypeStruct((d.b, d.hk, d.grp, d.m, d.e, d.h), io),
            _like(t.u, io),
            _like(s0, jnp.float32),
        ],
        "gated_delta_rule_state_fwd",
        t.k,
        t.rk,
        t.u,
        t.w,
        t.write,
        t.decay,
        s0,
    )


def _per_value_block(cfg: _Config, t: _Terms, kernel, name: str, specs, out, *args):
    """A parallel kernel over (B, Hv, M, H / BV) whose output is laid out like u (`out` "uv")
    or token-major, [B, M, C, K, G, H] (`out` "tok")."""
    d = _dims(t)
    sp = _chunk_specs(d, d.e, cfg.block_v)
    shape = t.u.shape if out == "uv" else (d.b, d.m, d.c, d.hk, d.grp, d.h)
    return _call(
        cfg,
        functools.partial(kernel, dtype=jnp.dtype(cfg.operand_dtype)),
        (d.b, d.hk * d.grp, d.m, d.h // cfg.block_v),
        [sp[s] for s in specs],
        sp[out],
        jax.ShapeDtypeStruct(shape, t.u.dtype),
        f"gated_delta_rule_{name}",
        *args,
    )


def _out_fwd(cfg: _Config, t: _Terms, h: jax.Array, vn: jax.Array) -> jax.Array:
    """Parallel over chunks: out [B, M, C, K, G, H] (a reshape of [B, T, Hv, H])."""
    specs = ("qk", "r", "qk", "r", "h", "uv", "vec", "vec", "runs")
    args = (t.q, t.rq, t.k, t.rk, h, vn, t.gam, t.read, t.runs)
    return _per_value_block(cfg, t, out_kernel, "out_fwd", specs, "tok", *args)


def _dv_local(cfg: _Config, t: _Terms, do: jax.Array) -> jax.Array:
    """Parallel over chunks: dVl [B, M, K, G, C, H], the intra-chunk part of dVn."""
    specs = ("qk", "r", "qk", "r", "vec", "runs", "tok")
    args = (t.q, t.rq, t.k, t.rk, t.gam, t.runs, do)
    return _per_value_block(cfg, t, dv_local_kernel, "dv_local", specs, "uv", *args)


def _state_bwd(cfg: _Config, t: _Terms, do: jax.Array, dvl: jax.Array, dsf: jax.Array):
    """Sequential, chunks in reverse: (dh [B, K, G, M, E, H], dVn = dU, ds0 [B, K, G, E, H])."""
    d = _dims(t)
    sp = _seq_specs(d, cfg.block_v)
    io = jnp.dtype(cfg.operand_dtype)
    return _call(
        cfg,
        functools.partial(state_bwd_kernel, dtype=io),
        (d.b, d.hk * d.grp, d.h // cfg.block_v),
        [sp[n] for n in ("qk", "r", "qk", "r", "w", "vec", "vec", "scalar", "tok", "uv", "state")],
        [sp["h"], sp["uv"], sp["state"]],
        [
            jax.ShapeDtypeStruct((d.b, d.hk, d.grp, d.m, d.e, d.h), io),
            _like(t.u),
            _like(dsf, jnp.float32),
        ],
        "gated_delta_rule_state_bwd",
        t.q,
        t.rq,
        t.k,
        t.rk,
        t.w,
        t.read,
        t.write,
        t.decay,
        do,
        dvl,
        dsf,
    )


def _dqkw(cfg: _Config, t: _Terms, h, dh, vn, dvn, do):
    """Parallel over chunks and key blocks: dq, dk (per value head, w.r.t. the normalised q, k),
    dw [B, M, K, G, C, E] and the partials over key blocks of dgam, dread, dwrite, and of the
    rowsums of q dq and k dk (normalised q, k) [NK, B, M, K, G, C], ddecay [NK, ...]."""
    d = _dims(t)
    bk = min(cfg.block_v, d.e)
    nk, f32 = d.e // bk, jnp.float32
    sp = _chunk_specs(d, bk, d.h)
    per_e = jax.ShapeDtypeStruct(t.w.shape, f32)
    part_vec = jax.ShapeDtypeStruct((nk, *t.gam.shape), f32)
    part_scalar = jax.ShapeDtypeStruct((nk, *t.decay.shape), f32)
    specs = ("qk", "r", "qk", "r", "h", "h", "uv", "uv", "tok", "vec", "vec", "vec", "runs")
    return _call(
        cfg,
        functools.partial(dqkw_kernel, dtype=jnp.dtype(cfg.operand_dtype), block_v=cfg.block_v),
        (d.b, d.hk * d.grp, d.m, nk),
        [sp[n] for n in specs],
        [sp["e"], sp["e"], sp["e"], *[sp["p_vec"]] * 3, sp["p_scalar"], *[sp["p_vec"]] * 2],
        [per_e, per_e, _like(t.w), part_vec, part_vec, part_vec, part_scalar, part_vec, part_vec],
        "gated_delta_rule_dqkw",
        t.q,
        t.rq,
        t.k,
        t.rk,
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


def _forward(cfg: _Config, t: _Terms, s0: jax.Array):
    h, vn, sf = _state_fwd(cfg, t, s0)
    return _out_fwd(cfg, t, h, vn), sf, h, vn


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _state_pass(cfg: _Config, t: _Terms, s0: jax.Array):
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
    dq, dk, dw, dgam, dread, dwrite, ddecay, qdq, kdk = _dqkw(cfg, t, h, dh, vn, dvn, do)
    dq, drq = _row_grads(dq, qdq, t.q, t.rq)
    dk, drk = _row_grads(dk, kdk, t.k, t.rk)
    grads = t._replace(
        q=dq,
        rq=drq,
        k=dk,
        rk=drk,
        u=dvn,
        w=dw,
        gam=dgam.sum(axis=0),
        read=dread.sum(axis=0),
        write=dwrite.sum(axis=0),
        decay=ddecay.sum(axis=0),
        runs=None,
    )
    return grads, ds0


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


def _ut_specs(k, v):
    """BlockSpecs of grid (B, Hv, M) for the UT kernels: key head n // G, value head n; v (and
    dv) token-major [B, M, C, K, G, H], u (and du) [B, M, K, G, C, H]."""
    c, e, grp, h = k.shape[2], k.shape[-1], v.shape[4], v.shape[-1]

    def per_v(*block):  # [B, M, K, G, C, ...]
        return pl.BlockSpec(
            (None, None, None, None, c, *block),
            lambda i, n, j: (i, j, n // grp, n % grp, 0, *([0] * len(block))),
        )

    return {
        "k": pl.BlockSpec((None, None, c, None, e), lambda i, n, j: (i, j, 0, n // grp, 0)),
        "r": pl.BlockSpec((None, None, c, None), lambda i, n, j: (i, j, 0, n // grp)),
        "v": pl.BlockSpec(
            (None, None, c, None, None, h), lambda i, n, j: (i, j, 0, n // grp, n % grp, 0)
        ),
        "u": per_v(h),
        "e": per_v(e),
        "vec": per_v(),
        "runs": pl.BlockSpec((None, None, c), lambda i, n, j: (i, j, 0)),
    }


def _ut_grid(k, v):
    b, m, _, hk, _ = k.shape
    return (b, hk * v.shape[4], m)


def _ut_call(cfg: _Config, k, rk, v, beta, gam, read, runs):
    b, m, c, hk, e = k.shape
    grp, h = v.shape[4:]
    io = jnp.dtype(cfg.operand_dtype)
    sp = _ut_specs(k, v)
    return _call(
        cfg,
        functools.partial(ut_kernel, dtype=io),
        _ut_grid(k, v),
        [sp["k"], sp["r"], sp["v"], sp["vec"], sp["vec"], sp["vec"], sp["runs"]],
        [sp["u"], sp["e"]],
        [
            jax.ShapeDtypeStruct((b, m, hk, grp, c, h), io),
            jax.ShapeDtypeStruct((b, m, hk, grp, c, e), io),
        ],
        "gated_delta_rule_ut",
        k.astype(io),
        rk,
        v.astype(io),
        beta,
        gam,
        read,
        runs,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ut(cfg, k, rk, v, beta, gam, read, runs):
    """(U, W) in the operand dtype, as the state pass reads them: their cotangents then come
    back in it too (upcast, they were 2 x 768 MiB of fp32 copies at 8 x 4096 bf16 tokens).
    k is raw, rk its row factors ([B, M, C, K])."""
    return _ut_call(cfg, k, rk, v, beta, gam, read, runs)


def _ut_fwd(cfg, k, rk, v, beta, gam, read, runs):
    return _ut(cfg, k, rk, v, beta, gam, read, runs), (k, rk, v, beta, gam, read, runs)


def _ut_bwd(cfg, residuals, cotangents):
    k, rk, v, beta, gam, read, runs = residuals
    du, dw = cotangents
    b, m, c, hk, e = k.shape
    grp = v.shape[4]
    io = jnp.dtype(cfg.operand_dtype)
    sp = _ut_specs(k, v)
    vec = jax.ShapeDtypeStruct(beta.shape, jnp.float32)
    dk, dv, dbeta, dgam, dread, kdk = _call(
        # the [C, C] tiles of the recomputed inverse fill the registers: at 4 warps they spill
        cfg._replace(num_warps=max(8, cfg.num_warps)),
        # columns taken at a time: block_v, at most 32 (fewer spills; see ut_bwd_kernel)
        functools.partial(ut_bwd_kernel, dtype=io, block=min(32, cfg.block_v, e)),
        _ut_grid(k, v),
        [sp["k"], sp["r"], sp["v"], sp["vec"], sp["vec"], sp["vec"], sp["runs"], sp["u"], sp["e"]],
        [sp["e"], sp["v"], sp["vec"], sp["vec"], sp["vec"], sp["vec"]],
        [
            jax.ShapeDtypeStruct((b, m, hk, grp, c, e), jnp.float32),  # summed over G below
            jax.ShapeDtypeStruct(v.shape, io),  # as v's own gradient will be
            vec,
            vec,
            vec,
            vec,
        ],
        "gated_delta_rule_ut_bwd",
        k.astype(io),
        rk,
        v.astype(io),
        beta,
        gam,
        read,
        runs,
        du,
        dw,
    )
    dk, drk = _row_grads(dk, kdk, k, rk)
    return (
        dk,
        drk,
        dv.astype(v.dtype),
        dbeta.astype(beta.dtype),
        dgam.astype(gam.dtype),
        dread.astype(read.dtype),
        None,
    )


_ut.defvjp(_ut_fwd, _ut_bwd)


def _terms(cfg: _Config, q, k, v, g, beta, scale, segment_ids, use_qk_l2norm, chunk_size):
    """What the state pass reads, from head-padded q, k [B, T, K, E] and v [B, T, Hv, H]: the
    chunked terms (the UT transform a kernel) with q and k raw in the operand dtype beside their
    row factors, which the kernels apply (the l2norm and the query scale)."""
    b, t, hk, _ = q.shape
    io = jnp.dtype(cfg.operand_dtype)  # the kernels compute in fp32 (float64 only in CPU tests)

    def chunked(x):  # [B, T, K] -> [B, M, C, K] fp32, T zero-padded
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, -t % chunk_size), (0, 0)))
        return x.reshape(b, -1, chunk_size, hk)

    rq, rk = (chunked(r) for r in _row_factors(q, k, scale, use_qk_l2norm))
    low = io != jnp.float32
    terms = chunk_terms(  # told not to normalise: q and k stay raw
        q,
        k,
        v,
        g,
        beta,
        scale=1.0,
        segment_ids=segment_ids,
        use_qk_l2norm=False,
        chunk_size=chunk_size,
        precision=jax.lax.Precision.DEFAULT if low else jax.lax.Precision.HIGHEST,
        ut=lambda k, v, beta, gam, read, runs, precision: _ut(cfg, k, rk, v, beta, gam, read, runs),
    )
    return _Terms(
        q=terms.q.astype(io),
        rq=rq,
        k=terms.k.astype(io),
        rk=rk,
        u=terms.u,
        w=terms.w,
        gam=terms.gam.astype(jnp.float32),
        read=terms.read.astype(jnp.float32),
        write=terms.write.astype(jnp.float32),
        decay=terms.decay.astype(jnp.float32),
        runs=terms.runs,
    )


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
        min(64, padded dv). The UT transform's backward takes min(block_v, 32) columns at a
        time.
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
    terms = _terms(cfg, q, k, v, g, beta, scale, segment_ids, use_qk_l2norm, chunk_size)
    if initial_state is not None:
        initial_state = jnp.pad(initial_state, ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)))
    s0 = initial_state_or_zeros(initial_state, b, hk, hv // hk, dkp, dvp, jnp.float32)
    out, state = _state_pass(cfg, terms, s0)
    out = out.reshape(b, -1, hv, dvp)[:, :t, :, :dv].astype(v.dtype)  # [B, M, C, K, G, H] -> v's
    state = state.reshape(b, hv, dkp, dvp)[:, :, :dk, :dv].astype(state_dtype)
    return out, state
