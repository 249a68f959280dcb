"""Kernel bodies of the Pallas GPU (Triton) gated delta rule: one chunk (or one pass over
the chunks) per program, on refs. The grids, BlockSpecs, launches and gradients that tie them
together, and the equations, are in `pallas_gpu.py`.
"""

import jax
import jax.numpy as jnp


def _dot(a, b, dtype, *, trans_a: bool = False, trans_b: bool = False, keep_fp32: bool = False):
    """a @ b, fp32 accumulation, operands cast to the matmul dtype `dtype`; fp32 operands at
    HIGHEST precision (IEEE, not tf32). `keep_fp32` leaves fp32 operands as they are (the
    inverse and its gradient): IEEE for fp32 inputs, tf32 for bf16 inputs, whose error is below
    the inputs' own."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    if not keep_fp32:
        a, b = a.astype(dtype), b.astype(dtype)
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _rows(x, r):
    """x [R, N] with row i times r[i], rounded back to x's dtype: q and k as the rule reads
    them (l2-normalised, q scaled), from the raw rows and one factor per token and head."""
    return (x.astype(jnp.float32) * r.astype(jnp.float32)[:, None]).astype(x.dtype)


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


def state_fwd_kernel(
    k_ref,  # [M, C, E] key head n // G, raw
    rk_ref,  # [M, C] its row factors
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
        k = _rows(k_ref[i], rk_ref[i])
        return decay_ref[i] * s + _dot(k, write * vn, dtype, trans_a=True)

    s = jax.lax.fori_loop(0, k_ref.shape[0], chunk, s0_ref[...].astype(jnp.float32))
    sf_ref[...] = s


def out_kernel(
    q_ref, rq_ref, k_ref, rk_ref, h_ref, vn_ref, gam_ref, read_ref, run_ref, o_ref, *, dtype
):
    """O = read * (Q h) + ((Q K^T) * D) Vn of one chunk and value block: q, k [C, E] raw and
    rq, rk [C] their row factors; h [E, BV]; vn, o [C, BV]; gam, read, runs [C]."""
    q = _rows(q_ref[...], rq_ref[...])
    attn = _attn(q, _rows(k_ref[...], rk_ref[...]), gam_ref, run_ref, dtype)  # [C, S]
    read = read_ref[...].astype(jnp.float32)[:, None]
    o = read * _dot(q, h_ref[...], dtype) + _dot(attn, vn_ref[...], dtype)
    o_ref[...] = o.astype(o_ref.dtype)


def dv_local_kernel(q_ref, rq_ref, k_ref, rk_ref, gam_ref, run_ref, do_ref, dvl_ref, *, dtype):
    """dVl = ((Q K^T) * D)^T dO of one chunk and value block: do, dvl [C, BV]."""
    q, k = _rows(q_ref[...], rq_ref[...]), _rows(k_ref[...], rk_ref[...])
    attn = _attn(q, k, gam_ref, run_ref, dtype)  # [C, S]
    dvl_ref[...] = _dot(attn, do_ref[...], dtype, trans_a=True).astype(dvl_ref.dtype)


def state_bwd_kernel(
    q_ref,  # [M, C, E] raw
    rq_ref,  # [M, C] its row factors
    k_ref,  # [M, C, E] raw
    rk_ref,  # [M, C]
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
        dvn = dvl_ref[i].astype(f32) + write * _dot(_rows(k_ref[i], rk_ref[i]), ds, dtype)
        dvn_ref[i] = dvn.astype(dvn_ref.dtype)  # [C, BV]
        rdo = read * do_ref[i].astype(f32)
        return (
            decay_ref[i] * ds
            + _dot(_rows(q_ref[i], rq_ref[i]), rdo, dtype, trans_a=True)
            - _dot(w_ref[i], dvn, dtype, trans_a=True)
        )

    ds0_ref[...] = jax.lax.fori_loop(0, m, chunk, dsf_ref[...].astype(f32))


def dqkw_kernel(
    q_ref,  # [C, BK] key head n // G, key block, raw
    rq_ref,  # [C] its row factors
    k_ref,  # [C, BK] raw
    rk_ref,  # [C]
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
    qdq_ref,  # [C] partial: rowsum(q dq) (q normalised): r dr, for q's row factor r
    kdk_ref,  # [C] partial: rowsum(k dk)
    *,
    dtype,
    block_v: int,
):
    """Every gradient of one chunk but dU, for one key block; value blocks looped over. dq and
    dk are w.r.t. the normalised q and k."""
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
    q, k = _rows(q_ref[...], rq_ref[...]), _rows(k_ref[...], rk_ref[...])  # [C, BK]
    dp = dp * _decay_mask(gam_ref[...].astype(f32), run_ref[...])
    dpk = _dot(dp, k, dtype)  # [C, BK]
    dpq = _dot(dp, q, dtype, trans_a=True)  # [C, BK]
    q32, k32 = q.astype(f32), k.astype(f32)
    dq = read_ref[...].astype(f32)[:, None] * doh + dpk
    dk = dpq + write_ref[...].astype(f32)[:, None] * vndh
    dq_ref[...], dk_ref[...] = dq, dk
    qdq_ref[...] = jnp.sum(q32 * dq, axis=1)
    kdk_ref[...] = jnp.sum(k32 * dk, axis=1)
    dw_ref[...] = (-dvnh).astype(dw_ref.dtype)
    dgam_ref[...] = jnp.sum(q32 * dpk, axis=1) - jnp.sum(k32 * dpq, axis=1)
    dread_ref[...] = jnp.sum(q32 * doh, axis=1)
    dwrite_ref[...] = jnp.sum(k32 * vndh, axis=1)
    ddecay_ref[...] = ddecay


def _strict_decay_mask(gam, runs):
    """D [C, S]: exp(gam_r - gam_s) for s < r in the same run, else 0."""
    c = gam.shape[0]
    rows, cols = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    strict = (cols < rows) & (runs[:, None] == runs[None, :])
    return jnp.where(strict, jnp.exp(jnp.where(strict, gam[:, None] - gam[None, :], 0.0)), 0.0)


def _ut_inverse(kk, beta, gam, runs, dtype):
    """Tm = (I + A)^-1 of one chunk, from K K^T [C, S]; A = beta (K K^T) * D."""
    c = kk.shape[0]
    rows, cols = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    a = beta[:, None] * kk * _strict_decay_mask(gam, runs)  # strictly lower
    # Block doubling (see xla._invert_unit_lower): X_2b = X_b - X_b E_b X_b, log2(C) levels.
    tm = (rows == cols).astype(jnp.float32)
    b = 1
    while b < c:
        block = (rows // (2 * b) == cols // (2 * b)) & ((rows // b) % 2 == 1)
        e = jnp.where(block & ((cols // b) % 2 == 0), a, 0.0)
        tm = tm - _dot(_dot(tm, e, dtype, keep_fp32=True), tm, dtype, keep_fp32=True)
        b *= 2
    return tm


def ut_kernel(k_ref, rk_ref, v_ref, beta_ref, gam_ref, read_ref, run_ref, u_ref, w_ref, *, dtype):
    """One chunk of one value head: U = Tm (beta V), W = Tm (beta read K), Tm = (I + A)^-1;
    k raw [C, E], rk [C] its row factors."""
    k = _rows(k_ref[...], rk_ref[...])  # [C, E]
    beta = beta_ref[...].astype(jnp.float32)  # [C]
    kk = _dot(k, k, dtype, trans_b=True)  # [C, S]
    tm = _ut_inverse(kk, beta, gam_ref[...].astype(jnp.float32), run_ref[...], dtype)
    bv = beta[:, None] * v_ref[...].astype(jnp.float32)  # [C, H]
    bk = (beta * read_ref[...].astype(jnp.float32))[:, None] * k.astype(jnp.float32)  # [C, E]
    u_ref[...] = _dot(tm, bv, dtype).astype(u_ref.dtype)
    w_ref[...] = _dot(tm, bk, dtype).astype(w_ref.dtype)


def _column_blocks(n: int, width: int) -> list[slice]:
    return [slice(j, j + width) for j in range(0, n, width)]


def ut_bwd_kernel(
    k_ref, rk_ref, v_ref, beta_ref, gam_ref, read_ref, run_ref, du_ref, dw_ref,  # inputs
    dk_ref, dv_ref, dbeta_ref, dgam_ref, dread_ref, kdk_ref,  # outputs (dk per value head)
    *, dtype, block: int,
):  # fmt: skip
    """Gradients of one chunk's UT transform, Tm recomputed:

    dXv = Tm^T dU, dXk = Tm^T dW            (w.r.t. beta V and beta read K)
    dA  = -Tm^T (dU (beta V)^T + dW (beta read K)^T) Tm^T
    then through A = beta (K K^T) * D: dK += (dKK + dKK^T) K, dKK = dA beta D; dgam from D.

    Every [C, E] or [C, H] operand is taken `block` columns at a time, so that besides the
    [C, C] tiles (Tm, K K^T, D, dTm) only a few [C, block] tiles are live. At C = 64,
    E = H = 128, 8 warps, sm_90, ptxas reported register spills of 440 B a thread with whole
    [C, 128] tiles, 212 B with blocks of 64 and 120 B with blocks of 32 (92 B once dU and dW
    came in bf16 for bf16 inputs, 112 B with k's row factors applied here;
    `benchmarks/gpu_compile.py`); the rest is the inverse's. dXk is recomputed in the last pass
    (a [C, C] by [C, block] product) rather than kept.
    """
    f32 = jnp.float32
    c, e = k_ref.shape
    beta, gam, read = (r[...].astype(f32) for r in (beta_ref, gam_ref, read_ref))  # [C]
    bread = beta * read
    e_blocks, h_blocks = _column_blocks(e, block), _column_blocks(v_ref.shape[1], block)
    rk = rk_ref[...]

    def k_cols(x):  # [C, block] of the normalised k
        return _rows(k_ref[:, x], rk)

    kk = sum(_dot(k_cols(x), k_cols(x), dtype, trans_b=True) for x in e_blocks)  # [C, S]
    tm = _ut_inverse(kk, beta, gam, run_ref[...], dtype)
    decay = _strict_decay_mask(gam, run_ref[...])
    dtm, dbeta = jnp.zeros((c, c), f32), jnp.zeros((c,), f32)
    for x in h_blocks:
        du, v32 = du_ref[:, x].astype(f32), v_ref[:, x].astype(f32)  # [C, block]
        dxv = _dot(tm, du, dtype, trans_a=True)
        dv_ref[:, x] = (beta[:, None] * dxv).astype(dv_ref.dtype)
        dbeta += jnp.sum(dxv * v32, axis=1)
        dtm += _dot(du, beta[:, None] * v32, dtype, trans_b=True)
    k_dxk = jnp.zeros((c,), f32)
    for x in e_blocks:
        dw, k32 = dw_ref[:, x].astype(f32), k_cols(x).astype(f32)
        dtm += _dot(dw, bread[:, None] * k32, dtype, trans_b=True)
        k_dxk += jnp.sum(_dot(tm, dw, dtype, trans_a=True) * k32, axis=1)
    da = -_dot(
        _dot(tm, dtm, dtype, trans_a=True, keep_fp32=True), tm, dtype, trans_b=True, keep_fp32=True
    )
    da_d = da * decay  # dA * D: zero off the strict mask, as D is
    dkk = da_d * beta[:, None]  # [C, S]
    p = dkk * kk  # dD * D: the gradient of the exponent gam_r - gam_s
    dgam_ref[...] = jnp.sum(p, axis=1) - jnp.sum(p, axis=0)
    dbeta_ref[...] = dbeta + jnp.sum(da_d * kk, axis=1) + read * k_dxk
    dread_ref[...] = beta * k_dxk
    dkk = dkk + dkk.T
    kdk = jnp.zeros((c,), f32)  # rowsum(k dk), k normalised: rk drk
    for x in e_blocks:
        dxk = _dot(tm, dw_ref[:, x], dtype, trans_a=True)  # [C, block]
        dk = _dot(dkk, k_cols(x), dtype) + bread[:, None] * dxk
        dk_ref[:, x] = dk
        kdk += jnp.sum(k_cols(x).astype(f32) * dk, axis=1)
    kdk_ref[...] = kdk
