"""Chunked gated delta rule as Pallas GPU (Triton) kernels, forward and backward.

The chunked form (`xla.py`) splits into terms that need no state, computed for all chunks at
once by `xla.chunk_terms`, and the state pass, which is sequential over chunks. Four kernels:
the UT transform (A, (I + A)^-1 by block doubling, U, W; one program per chunk and value head)
and its backward, which recompute Tm; the state pass forward and backward. The cheap elementwise
terms (l2norm, scale, the decay cumsum and scales) stay jnp, fused by XLA and differentiated by
JAX. In pure JAX the state pass is a `lax.scan` whose every step is a handful of small launches;
here it is one kernel per direction. Per chunk, with S the fp32 state [E, H] before the chunk
and D the decay mask of the chunk:

    Vn = U - W S                                   per-token deltas [C, H]
    O  = read * (Q S) + ((Q K^T) * D) Vn           D_rs = exp(gam_r - gam_s) [s <= r, same run]
    S' = decay * S + K^T (write * Vn)

A program owns one (batch row, value head, block of BV value columns): value columns never mix in
the recurrence, so splitting H multiplies the parallelism (B * Hv * H / BV programs) at the cost
of recomputing Q K^T once per block. Value head n reads key head n // G through its BlockSpec
index map, so q and k are never repeated. The decay mask is built in-kernel from gam and the
run ids; nothing of size [C, C] per chunk is read from memory.

The forward stores the state before every chunk ([B, K, G, M, E, H] fp32, the "per-chunk
states"); the backward runs the chunks in reverse with dS (the gradient of the state after the
chunk), recomputing Vn and the mask:

    dVn   = (Q K^T * D)^T dO + write * (K dS')        dU = dVn,  dW = -dVn S^T
    dQ    = read * (dO S^T) + dP K,    dK = dP^T Q + (write * Vn) dS'^T,  dP = (dO Vn^T) * D
    dread = rowsum(dO * Q S),  dwrite = rowsum(Vn * K dS'),  ddecay = sum(S * dS')
    dgam  = rowsum(dP * QK^T) - colsum(dP * QK^T)      (through D)
    dS    = decay * dS' + Q^T (read * dO) - W^T dVn

Terms summed over H (dW, dQ, dK, dread, dwrite, ddecay, dgam) are written per value block and
summed outside, as are dQ, dK over the G value heads that share a key head (the same for dK of
the UT transform).

Precision: the state and every accumulation are fp32. For fp32 (or float64) inputs the matmul
operands are fp32 at HIGHEST precision (IEEE on the tensor cores' fp32 path, not tf32). For bf16 or
fp16 inputs, q, k, u, w are stored and multiplied in that dtype (fp32 accumulation), as
flash-linear-attention does; S and Vn are rounded to it only as matmul operands.

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


def _load_chunk(i, q_ref, k_ref, u_ref, w_ref, gam_ref, read_ref, write_ref, decay_ref, run_ref):
    f32 = jnp.float32
    return (
        q_ref[i],  # [C, E]
        k_ref[i],  # [C, E]
        u_ref[i].astype(f32),  # [C, BV]
        w_ref[i],  # [C, E]
        gam_ref[i].astype(f32),  # [C]
        read_ref[i].astype(f32),  # [C]
        write_ref[i].astype(f32),  # [C]
        decay_ref[i].astype(f32),  # scalar
        run_ref[i],  # [C]
    )


def _fwd_kernel(
    q_ref,  # [M, C, E] key head n // G
    k_ref,  # [M, C, E]
    u_ref,  # [M, C, BV] value head n, value block j
    w_ref,  # [M, C, E]
    gam_ref,  # [M, C]
    read_ref,  # [M, C]
    write_ref,  # [M, C]
    decay_ref,  # [M]
    run_ref,  # [M, C]
    s0_ref,  # [E, BV]
    o_ref,  # [M, C, BV]
    sf_ref,  # [E, BV]
    h_ref,  # [M, E, BV] state before each chunk
    *,
    dtype,
):
    inputs = (q_ref, k_ref, u_ref, w_ref, gam_ref, read_ref, write_ref, decay_ref, run_ref)

    def chunk(i, s):
        q, k, u, w, gam, read, write, decay, runs = _load_chunk(i, *inputs)
        h_ref[i] = s
        vn = u - _dot(w, s, dtype)  # [C, BV]
        attn = _dot(q, k, dtype, trans_b=True) * _decay_mask(gam, runs)  # [C, S]
        o = read[:, None] * _dot(q, s, dtype) + _dot(attn, vn, dtype)
        o_ref[i] = o.astype(o_ref.dtype)
        return decay * s + _dot(k, write[:, None] * vn, dtype, trans_a=True)

    s = jax.lax.fori_loop(0, q_ref.shape[0], chunk, s0_ref[...].astype(jnp.float32))
    sf_ref[...] = s


def _bwd_kernel(
    q_ref,  # [M, C, E]
    k_ref,  # [M, C, E]
    u_ref,  # [M, C, BV]
    w_ref,  # [M, C, E]
    gam_ref,  # [M, C]
    read_ref,  # [M, C]
    write_ref,  # [M, C]
    decay_ref,  # [M]
    run_ref,  # [M, C]
    h_ref,  # [M, E, BV]
    do_ref,  # [M, C, BV]
    dsf_ref,  # [E, BV]
    du_ref,  # [M, C, BV]
    dw_ref,  # [M, C, E] partial over value blocks (and, for dq / dk, over grouped heads)
    dq_ref,  # [M, C, E]
    dk_ref,  # [M, C, E]
    dgam_ref,  # [M, C]
    dread_ref,  # [M, C]
    dwrite_ref,  # [M, C]
    ddecay_ref,  # [M]
    ds0_ref,  # [E, BV]
    *,
    dtype,
):
    inputs = (q_ref, k_ref, u_ref, w_ref, gam_ref, read_ref, write_ref, decay_ref, run_ref)
    m = q_ref.shape[0]

    def chunk(j, ds):  # ds: gradient w.r.t. the state after chunk i
        i = m - 1 - j
        q, k, u, w, gam, read, write, decay, runs = _load_chunk(i, *inputs)
        s = h_ref[i]  # [E, BV]
        do = do_ref[i].astype(jnp.float32)  # [C, BV]
        vn = u - _dot(w, s, dtype)  # [C, BV]
        mask = _decay_mask(gam, runs)  # [C, S]
        qk = _dot(q, k, dtype, trans_b=True)  # [C, S]
        kds = _dot(k, ds, dtype)  # [C, BV]
        dvn = _dot(qk * mask, do, dtype, trans_a=True) + write[:, None] * kds
        du_ref[i] = dvn.astype(du_ref.dtype)
        dw_ref[i] = -_dot(dvn, s, dtype, trans_b=True)
        dp = _dot(do, vn, dtype, trans_b=True) * mask  # [C, S]
        dq_ref[i] = read[:, None] * _dot(do, s, dtype, trans_b=True) + _dot(dp, k, dtype)
        dk_ref[i] = _dot(dp, q, dtype, trans_a=True) + _dot(
            write[:, None] * vn, ds, dtype, trans_b=True
        )
        dg = dp * qk
        dgam_ref[i] = jnp.sum(dg, axis=1) - jnp.sum(dg, axis=0)
        dread_ref[i] = jnp.sum(do * _dot(q, s, dtype), axis=1)
        dwrite_ref[i] = jnp.sum(vn * kds, axis=1)
        ddecay_ref[i] = jnp.sum(s * ds)
        return (
            decay * ds
            + _dot(q, read[:, None] * do, dtype, trans_a=True)
            - _dot(w, dvn, dtype, trans_a=True)
        )

    ds = jax.lax.fori_loop(0, m, chunk, dsf_ref[...].astype(jnp.float32))
    ds0_ref[...] = ds


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


def _specs(d: _Dims, bv: int) -> dict[str, pl.BlockSpec]:
    """BlockSpecs of grid (B, Hv, H / BV) over the `ChunkTerms` layouts."""

    def key_head(n):
        return n // d.grp

    def value_head(n):
        return n // d.grp, n % d.grp

    def per_v(*block):  # arrays laid out [B, M, K, G, ...], whole trailing dims
        return pl.BlockSpec(
            (None, d.m, None, None, *block),
            lambda b, n, j: (b, 0, *value_head(n), *([0] * len(block))),
        )

    def partial(*block):  # [NV, B, M, K, G, ...]
        return pl.BlockSpec(
            (None, None, d.m, None, None, *block),
            lambda b, n, j: (j, b, 0, *value_head(n), *([0] * len(block))),
        )

    state = pl.BlockSpec((None, None, None, d.e, bv), lambda b, n, j: (b, *value_head(n), 0, j))
    return {
        "qk": pl.BlockSpec((None, d.m, d.c, None, d.e), lambda b, n, j: (b, 0, 0, key_head(n), 0)),
        "uv": pl.BlockSpec(  # [B, M, K, G, C, H], value block j
            (None, d.m, None, None, d.c, bv), lambda b, n, j: (b, 0, *value_head(n), 0, j)
        ),
        "w": per_v(d.c, d.e),  # [B, M, K, G, C, E]
        "vec": per_v(d.c),  # [B, M, K, G, C]
        "scalar": per_v(),  # [B, M, K, G]
        "runs": pl.BlockSpec((None, d.m, d.c), lambda b, n, j: (b, 0, 0)),
        "state": state,  # [B, K, G, E, H]
        "h": pl.BlockSpec(
            (None, None, None, d.m, d.e, bv), lambda b, n, j: (b, *value_head(n), 0, 0, j)
        ),  # [B, K, G, M, E, H]
        "p_e": partial(d.c, d.e),  # [NV, B, M, K, G, C, E]
        "p_vec": partial(d.c),  # [NV, B, M, K, G, C]
        "p_scalar": partial(),  # [NV, B, M, K, G]
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


def _pass_specs(sp: dict[str, pl.BlockSpec]) -> list[pl.BlockSpec]:
    """Specs of `_pass_inputs`, in order."""
    return [sp["qk"], sp["qk"], sp["uv"], sp["w"], *[sp["vec"]] * 3, sp["scalar"], sp["runs"]]


def _pass_inputs(t: ChunkTerms):
    return (t.q, t.k, t.u, t.w, t.gam, t.read, t.write, t.decay, t.runs)


def _forward(cfg: _Config, t: ChunkTerms, s0: jax.Array):
    d = _dims(t)
    sp = _specs(d, cfg.block_v)
    f32 = jnp.float32
    kernel = functools.partial(_fwd_kernel, dtype=jnp.dtype(cfg.operand_dtype))
    return _call(
        cfg,
        kernel,
        (d.b, d.hk * d.grp, d.h // cfg.block_v),
        [*_pass_specs(sp), sp["state"]],
        [sp["uv"], sp["state"], sp["h"]],
        [
            jax.ShapeDtypeStruct(t.u.shape, t.u.dtype),
            jax.ShapeDtypeStruct(s0.shape, f32),
            jax.ShapeDtypeStruct((d.b, d.hk, d.grp, d.m, d.e, d.h), f32),
        ],
        "gated_delta_rule_state_fwd",
        *_pass_inputs(t),
        s0,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _state_pass(cfg: _Config, t: ChunkTerms, s0: jax.Array):
    out, sf, _ = _forward(cfg, t, s0)
    return out, sf


def _state_pass_fwd(cfg, t, s0):
    out, sf, h = _forward(cfg, t, s0)
    return (out, sf), (t, h)


def _state_pass_bwd(cfg, residuals, cotangents):
    t, h = residuals
    do, dsf = cotangents
    d = _dims(t)
    sp = _specs(d, cfg.block_v)
    nv, f32 = d.h // cfg.block_v, jnp.float32
    per_vec = (nv, d.b, d.m, d.hk, d.grp, d.c)

    def shape(*s, dtype=f32):
        return jax.ShapeDtypeStruct(s, dtype)

    kernel = functools.partial(_bwd_kernel, dtype=jnp.dtype(cfg.operand_dtype))
    du, dw, dq, dk, dgam, dread, dwrite, ddecay, ds0 = _call(
        cfg,
        kernel,
        (d.b, d.hk * d.grp, nv),
        [*_pass_specs(sp), sp["h"], sp["uv"], sp["state"]],
        [
            sp["uv"],
            sp["p_e"],
            sp["p_e"],
            sp["p_e"],
            *[sp["p_vec"]] * 3,
            sp["p_scalar"],
            sp["state"],
        ],
        [
            shape(*t.u.shape, dtype=t.u.dtype),
            shape(*per_vec, d.e),
            shape(*per_vec, d.e),
            shape(*per_vec, d.e),
            shape(*per_vec),
            shape(*per_vec),
            shape(*per_vec),
            shape(*per_vec[:-1]),
            shape(d.b, d.hk, d.grp, d.e, d.h),
        ],
        "gated_delta_rule_state_bwd",
        *_pass_inputs(t),
        h,
        do,
        dsf,
    )

    def per_key_head(x):  # [NV, B, M, K, G, C, E] -> [B, M, C, K, E]
        return jnp.moveaxis(x.sum(axis=(0, 4)), 3, 2)

    grads = t._replace(
        q=per_key_head(dq).astype(t.q.dtype),
        k=per_key_head(dk).astype(t.k.dtype),
        u=du,
        w=dw.sum(axis=0).astype(t.w.dtype),
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
