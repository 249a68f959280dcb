"""Kernel bodies of the Pallas TPU gated delta rule: one chunk of one value head, fwd and bwd.

Both kernels rebuild the chunk's terms from the inputs (`chunk_terms`); nothing of size [C, C]
is read from or written to memory. With rows r, s of the chunk, gam the inclusive cumsum of g,
m_r = [r still sees the incoming state], l_s = [s is in the run reaching the chunk's end] (see
`pallas_tpu.py` on segment resets), D the decay masks exp(gam_r - gam_s) over s < r (strict)
or s <= r (incl) in r's run, and S the fp32 state [E, H] before the chunk:

    read  = exp(gam) m       write = exp(gam_last - gam) l       decay = exp(gam_last) [no reset]
    A     = diag(beta) (K K^T) * D_strict     Tm = (I + A)^-1
    U     = Tm (beta V)      W = Tm (beta read K)      Vn = U - W S
    O     = read (Q S) + ((Q K^T) * D_incl) Vn
    S'    = decay S + K^T (write Vn)

The backward runs the chunks in reverse, carrying dS' (the gradient w.r.t. the state after the
chunk) in VMEM; with S read from the forward's per-chunk states:

    dVn   = (Q K^T * D_incl)^T dO + write (K dS')             dW = -dVn S^T
    dQK   = (dO Vn^T) * D_incl
    dQ    = read (dO S^T) + dQK K        dK = dQK^T Q + (write Vn) dS'^T
    dS    = decay dS' + Q^T (read dO) - W^T dVn
    dXv   = Tm^T dVn     dXk = Tm^T dW                      (w.r.t. beta V and beta read K)
    dA    = -Tm^T (dVn (beta V)^T + dW (beta read K)^T) Tm^T
    dK   += (dA beta D_strict) K + (dA beta D_strict)^T K + beta read dXk;   dV = beta dXv
    dbeta = rowsum(dA (K K^T) D_strict) + rowsum(dXv V) + read rowsum(dXk K)

and g through the cumulative decays: every [C, C] mask entry is exp(gam_r - gam_s), so with
P = dQK * (Q K^T) + beta dA (K K^T) D_strict (the gradient of those exponents),

    dgam  = rowsum(P) - colsum(P) + dread read - dwrite write
    dgam_last = sum(dwrite write) + ddecay decay,     dg_s = sum_{r >= s} dgam_r + dgam_last

with dread = rowsum(dO (Q S)) + beta rowsum(dXk K), dwrite = rowsum(Vn (K dS')) and
ddecay = sum(S dS'). The gradients are w.r.t. the normalised, scaled q and k; `pallas_tpu.py`
applies the l2norm and scale VJP outside.

Mosaic has no cumsum primitive and small transposes are awkward, so per-token scalars move
between lane rows [1, C] and sublane columns [C, 1], and are (reverse) cumsummed, by masked
reductions of [C, C] tiles (`_Positions`). All math is fp32 at HIGHEST matmul precision.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qwenjax.kernels.gated_delta_rule.reference import L2NORM_EPS

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b in fp32 at HIGHEST precision, with either operand optionally transposed."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    # The inner where keeps exp of masked entries (gam_r - gam_s above the diagonal) from
    # overflowing to inf, which 0 * inf would turn into NaN.
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _rowsum(x: jax.Array) -> jax.Array:  # [C, X] -> [C, 1]
    return jnp.sum(x, axis=1, keepdims=True)


class _Positions(NamedTuple):
    """Row and column indices of a [C, C] tile, and the lane / sublane moves built on them."""

    rows: jax.Array  # [C, C] int32
    cols: jax.Array

    @classmethod
    def of(cls, c: int) -> "_Positions":
        iota = jax.lax.broadcasted_iota
        return cls(iota(jnp.int32, (c, c), 0), iota(jnp.int32, (c, c), 1))

    def cumsum_col(self, x_row: jax.Array) -> jax.Array:  # [1, C] -> inclusive cumsum [C, 1]
        return jnp.sum(jnp.where(self.cols <= self.rows, x_row, 0.0), axis=1, keepdims=True)

    def rev_cumsum_row(self, x_col: jax.Array) -> jax.Array:  # [C, 1] -> sum_{r >= s} [1, C]
        return jnp.sum(jnp.where(self.cols <= self.rows, x_col, 0.0), axis=0, keepdims=True)

    def col_to_row(self, x_col: jax.Array) -> jax.Array:  # [C, 1] -> [1, C]
        return jnp.sum(jnp.where(self.rows == self.cols, x_col, 0.0), axis=0, keepdims=True)

    def row_to_col(self, x_row: jax.Array) -> jax.Array:  # [1, C] -> [C, 1]
        return jnp.sum(jnp.where(self.rows == self.cols, x_row, 0.0), axis=1, keepdims=True)


class Chunk(NamedTuple):
    """One chunk of one value head, rebuilt from the inputs; columns are [C, 1]."""

    q: jax.Array  # [C, E] l2-normalised (optionally) and scaled
    k: jax.Array  # [C, E] l2-normalised (optionally)
    v: jax.Array  # [C, H]
    beta: jax.Array  # [C, 1]
    read: jax.Array  # [C, 1] exp(gam) m
    write: jax.Array  # [C, 1] exp(gam_last - gam) l
    decay: jax.Array  # [1, 1] exp(gam_last) [no reset in the chunk]
    qk: jax.Array  # [C, S] Q K^T
    kk: jax.Array  # [C, S] K K^T
    d_incl: jax.Array  # [C, S] D_incl
    d_strict: jax.Array  # [C, S] D_strict
    tm: jax.Array  # [C, S] (I + A)^-1
    u: jax.Array  # [C, H]
    w: jax.Array  # [C, E]

    @property
    def attn(self) -> jax.Array:  # [C, S] (Q K^T) * D_incl
        return self.qk * self.d_incl


def _invert_unit_lower(a: jax.Array, pos: _Positions) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A [C, C] by block doubling: X_b inverts the
    diagonal blocks of size b; E_b holds the entries of A joining the two halves of each 2b
    block, and (X_b E_b)^2 = 0 makes X_2b = X_b - X_b E_b X_b exact. log2(C) levels of two
    C x C matmuls, no LAPACK."""
    rows, cols = pos
    tm = (rows == cols).astype(jnp.float32)
    level = 0
    while (1 << level) < a.shape[0]:
        b = 1 << level
        joins = ((rows >> (level + 1)) == (cols >> (level + 1))) & ((rows & b) != 0)
        joins = joins & ((cols & b) == 0)
        tm = tm - _dot(tm, _dot(jnp.where(joins, a, 0.0), tm))
        level += 1
    return tm


def chunk_terms(
    pos: _Positions,
    q_ref,  # [C, E]
    k_ref,  # [C, E]
    v_ref,  # [C, H]
    gates_ref,  # [2, C] rows: g, beta
    reset_ref,  # [1, C]
    *,
    scale: float,
    use_qk_l2norm: bool,
) -> Chunk:
    """Everything of one chunk that does not depend on the state."""
    q = q_ref[...].astype(jnp.float32)
    k = k_ref[...].astype(jnp.float32)
    if use_qk_l2norm:
        q = q * jax.lax.rsqrt(_rowsum(q * q) + L2NORM_EPS)
        k = k * jax.lax.rsqrt(_rowsum(k * k) + L2NORM_EPS)
    q = q * scale
    v = v_ref[...].astype(jnp.float32)

    g_row, beta_row, reset_row = gates_ref[0:1, :], gates_ref[1:2, :], reset_ref[...]
    gam_col = pos.cumsum_col(g_row)  # [C, 1]
    gam_last = jnp.sum(g_row, axis=1, keepdims=True)  # [1, 1]
    beta = pos.row_to_col(beta_row)  # [C, 1]
    run_col = pos.cumsum_col(reset_row)  # [C, 1] chunk-local run index (exact small integers)
    run_last = jnp.sum(reset_row, axis=1, keepdims=True)  # [1, 1]

    same_run = run_col == pos.col_to_row(run_col)  # [C, S]
    diff = gam_col - pos.col_to_row(gam_col)  # [C, S] gam_r - gam_s
    d_strict = _masked_exp(diff, (pos.cols < pos.rows) & same_run)
    d_incl = _masked_exp(diff, (pos.cols <= pos.rows) & same_run)
    kk = _dot(k, k, trans_b=True)
    tm = _invert_unit_lower(beta * kk * d_strict, pos)
    read = jnp.where(run_col == 0.0, jnp.exp(gam_col), 0.0)  # [C, 1]
    return Chunk(
        q=q,
        k=k,
        v=v,
        beta=beta,
        read=read,
        write=_masked_exp(gam_last - gam_col, run_col == run_last),
        decay=jnp.where(run_last == 0.0, jnp.exp(gam_last), 0.0),
        qk=_dot(q, k, trans_b=True),
        kk=kk,
        d_incl=d_incl,
        d_strict=d_strict,
        tm=tm,
        u=_dot(tm, beta * v),
        w=_dot(tm, (beta * read) * k),
    )


def forward_kernel(
    q_ref,  # [C, E] one chunk of key head n // G
    k_ref,  # [C, E]
    v_ref,  # [C, H] one chunk of value head n
    gates_ref,  # [2, C] rows: g, beta
    reset_ref,  # [1, C]
    s0_ref,  # [E, H] initial state of (row, head)
    o_ref,  # [C, H]
    s_out_ref,  # [E, H] final state of (row, head)
    *rest,  # (states_ref [E, H]: the state before this chunk, if save_states), s_ref
    scale: float,
    use_qk_l2norm: bool,
    save_states: bool,
):
    """Grid (B, Hv, M), chunks in order; s_ref [E, H] is the VMEM scratch carrying the state."""
    states_ref, s_ref = rest if save_states else (None, *rest)
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _():
        s_ref[...] = s0_ref[...]

    x = chunk_terms(
        _Positions.of(q_ref.shape[0]),
        q_ref,
        k_ref,
        v_ref,
        gates_ref,
        reset_ref,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
    )
    s = s_ref[...]  # [E, H]
    if states_ref is not None:
        states_ref[...] = s
    v_new = x.u - _dot(x.w, s)  # [C, H]
    o = x.read * _dot(x.q, s) + _dot(x.attn, v_new)  # [C, H]
    o_ref[...] = o.astype(o_ref.dtype)
    s_ref[...] = x.decay * s + _dot(x.k * x.write, v_new, trans_a=True)

    @pl.when(chunk == pl.num_programs(2) - 1)
    def _():
        s_out_ref[...] = s_ref[...]


def backward_kernel(
    q_ref,  # [C, E] one chunk of key head h
    k_ref,  # [C, E]
    v_ref,  # [C, H] one chunk of value head n = h G + i
    gates_ref,  # [2, C] rows: g, beta
    reset_ref,  # [1, C]
    states_ref,  # [E, H] the state before this chunk (saved by the forward)
    do_ref,  # [C, H] cotangent of the output
    dsf_ref,  # [G, E, H] cotangent of the final states of key head h's value heads
    dq_ref,  # [C, E] fp32, summed over the G value heads of key head h
    dk_ref,  # [C, E] fp32, summed likewise
    dv_ref,  # [C, H]
    dgates_ref,  # [2, C] rows: dg, dbeta
    ds0_ref,  # [G, E, H] cotangent of the initial states
    ds_ref,  # [G, E, H] scratch: dS' of each value head, carried across chunks
    *,
    scale: float,
    use_qk_l2norm: bool,
):
    """Grid (B, Hk, M, G): step j handles chunk M - 1 - j, value head i of the group innermost,
    so the dq / dk block of key head h stays in VMEM while its G value heads add to it."""
    step, i = pl.program_id(2), pl.program_id(3)

    @pl.when(step == 0)
    def _():
        ds_ref[i] = dsf_ref[i]

    pos = _Positions.of(q_ref.shape[0])
    x = chunk_terms(
        pos, q_ref, k_ref, v_ref, gates_ref, reset_ref, scale=scale, use_qk_l2norm=use_qk_l2norm
    )
    s, ds = states_ref[...], ds_ref[i]  # [E, H]: S, dS'
    do = do_ref[...].astype(jnp.float32)  # [C, H]

    # The state pass.
    v_new = x.u - _dot(x.w, s)  # [C, H]
    k_ds = _dot(x.k, ds)  # [C, H]
    dv_new = _dot(x.attn, do, trans_a=True) + x.write * k_ds  # [C, H]
    dqk = _dot(do, v_new, trans_b=True) * x.d_incl  # [C, S]
    dq = x.read * _dot(do, s, trans_b=True) + _dot(dqk, x.k)  # [C, E]
    dk = _dot(dqk, x.q, trans_a=True) + _dot(x.write * v_new, ds, trans_b=True)  # [C, E]
    dread = _rowsum(do * _dot(x.q, s))  # [C, 1]
    dwrite = _rowsum(v_new * k_ds)  # [C, 1]
    ddecay = jnp.sum(s * ds, keepdims=True)  # [1, 1]
    dw = -_dot(dv_new, s, trans_b=True)  # [C, E]
    ds_ref[i] = (
        x.decay * ds + _dot(x.q, x.read * do, trans_a=True) - _dot(x.w, dv_new, trans_a=True)
    )

    # The UT transform: U = Tm (beta V), W = Tm (beta read K), Tm = (I + A)^-1.
    beta_read = x.beta * x.read  # [C, 1]
    dxv = _dot(x.tm, dv_new, trans_a=True)  # [C, H]
    dxk = _dot(x.tm, dw, trans_a=True)  # [C, E]
    dtm = _dot(dv_new, x.beta * x.v, trans_b=True) + _dot(dw, beta_read * x.k, trans_b=True)
    da = -_dot(_dot(x.tm, dtm, trans_a=True), x.tm, trans_b=True)  # [C, S]
    da_kk = da * x.kk * x.d_strict  # [C, S] dA times the derivative of A_rs by beta_r
    dkk = x.beta * da * x.d_strict  # [C, S] w.r.t. K K^T
    dk = dk + _dot(dkk, x.k) + _dot(dkk, x.k, trans_a=True) + beta_read * dxk
    k_dxk = _rowsum(dxk * x.k)  # [C, 1]
    dbeta = _rowsum(da_kk) + _rowsum(dxv * x.v) + x.read * k_dxk  # [C, 1]
    dread = dread + x.beta * k_dxk

    # g through the exponents gam_r - gam_s of D_incl, D_strict and of read, write, decay.
    p = dqk * x.qk + x.beta * da_kk  # [C, S]
    dgam = _rowsum(p) - pos.row_to_col(jnp.sum(p, axis=0, keepdims=True))
    dgam = dgam + dread * x.read - dwrite * x.write  # [C, 1]
    dgam_last = jnp.sum(dwrite * x.write, keepdims=True) + ddecay * x.decay  # [1, 1]
    dgates_ref[0:1, :] = pos.rev_cumsum_row(dgam) + dgam_last
    dgates_ref[1:2, :] = pos.col_to_row(dbeta)
    dv_ref[...] = (x.beta * dxv).astype(dv_ref.dtype)

    @pl.when(i == 0)
    def _():
        dq_ref[...] = dq
        dk_ref[...] = dk

    @pl.when(i > 0)
    def _():
        dq_ref[...] += dq
        dk_ref[...] += dk

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        ds0_ref[i] = ds_ref[i]
