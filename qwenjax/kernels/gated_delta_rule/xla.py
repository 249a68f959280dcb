"""Chunked (UT / WY) gated delta rule in pure jnp: training and prefill on any backend.

Same recurrence as `reference.py`, computed C tokens at a time. T is padded at the end to a
multiple of C with q = k = v = 0, g = 0, beta = 0 (a no-op write; pad outputs are dropped). Inside
a chunk with rows r, s = 0..C-1, gamma is the inclusive cumsum of g and Gam_rs = exp(gam_r - gam_s):

    A   = beta_r (k_r . k_s) Gam_rs  for s < r in r's run, else 0    strictly lower triangular
    Tm  = (I + A)^-1                                     unit lower triangular, block doubling
    U   = Tm diag(beta) V            W = Tm diag(beta * exp(gam) * m) K
    Vn  = U - W S                                                     per-token deltas, [C, dv]
    O   = diag(exp(gam) * m) Q S + ((Q K^T) * Gam * L_incl * same_run) Vn
    S'  = exp(gam_last) [run_last == run_prev] S + (K * exp(gam_last - gam) * l)^T Vn

Packed documents are handled with masks, never with a huge negative g (that would swamp the
fp32 cumsum): `run` numbers the maximal runs of equal segment ids, A and the intra-chunk QK term
keep only pairs in the same run, m_r = [run_r == run_prev] marks the rows that still see the
incoming state (run_prev: run of the token before the chunk, or of token 0 for the first chunk),
and the state update keeps only the run that reaches the chunk's last token (l_s = [run_s ==
run_last]).

The intra-chunk quantities (A, Tm, U, W, the QK term) are computed for all chunks at once; only
the state pass is a `lax.scan` over chunks. Grouped value heads share their key head through a
[K, G] split of the head axis, so q and k are never repeated. All math is at least fp32 with
HIGHEST precision, which keeps TPU matmuls from falling back to single bf16 passes.

Einsum letters: B batch, M chunks, C / S chunk positions, K key heads, G value heads per key
head, E key dim, H value dim.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.kernels.gated_delta_rule.reference import compute_dtype, prepare_qk

_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec: str, *operands: jax.Array, precision=_HIGHEST) -> jax.Array:
    return jnp.einsum(spec, *operands, precision=precision)


@jax.custom_jvp
def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """exp(x) where mask else 0, without evaluating exp of masked (possibly huge) entries.

    The inner `where` keeps the value finite: exp(gam_r - gam_s) above the diagonal overflows
    fp32 for strong decays. The derivative is y dx with y the output (0 off the mask), so the
    backward keeps y alone: autodiff of the two wheres would keep both masks and three float
    arrays of x's size (for the [C, S] decay masks, a chunk's largest residuals after the
    inverse's).
    """
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


@_masked_exp.defjvp
def _masked_exp_jvp(primals, tangents):
    y = _masked_exp(*primals)
    return y, y * tangents[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _invert_unit_lower(a: jax.Array, precision) -> jax.Array:
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], by block doubling.

    With X_b the inverse of the block-diagonal part of I + a (aligned blocks of size b) and E_b
    the entries of a that join the two halves of each aligned block of size 2b,
    X_2b = (I + X_b E_b)^-1 X_b = X_b - X_b E_b X_b, because (X_b E_b)^2 = 0. Starting from
    X_1 = I, log2(C) levels of two masked matmuls give the inverse a blocked forward
    substitution would give. This replaces `lax.linalg.triangular_solve`, whose batched CPU
    (LAPACK) kernel in jaxlib 0.10 can deadlock when two solves run concurrently (the backward
    pass has several), and keeps the work on matmul units on TPU and GPU.

    The gradient is the inverse's own (`_invert_bwd`), not autodiff of the levels: that would
    keep every level's X_b and E_b for the backward, 2 log2(C) arrays of a's size (at the 27B
    layer with 32K tokens, 12 x 384 MiB per GDN layer) where the inverse needs only X.

    The levels are a Python loop, each mask E_b's support a constant: in a `fori_loop` the masks
    depend on the counter alone, so under remat in the train step JAX computed them in a loop
    of their own and kept them, broadcast to a's shape, for all levels (compiled 27B train step
    on a v5p: a 72 MiB bool stack per call, 4 a block; temporaries 161 MiB lower without it).
    """
    c = a.shape[-1]
    rows, cols = np.arange(c)[:, None], np.arange(c)[None, :]
    x = jnp.broadcast_to(jnp.eye(c, dtype=a.dtype), a.shape)
    for i in range((c - 1).bit_length()):
        b = 2**i
        joins = (rows // (2 * b) == cols // (2 * b)) & (rows // b % 2 == 1) & (cols // b % 2 == 0)
        joined = jnp.where(joins, a, 0.0)
        x = x - _einsum("...ij,...jk,...kl->...il", x, joined, x, precision=precision)
    return x


def _invert_fwd(a, precision):
    x = _invert_unit_lower(a, precision)
    return x, x


def _invert_bwd(precision, x, dx):
    # X = (I + A)^-1 gives dX = -X dA X, so A's cotangent is -X^T dX X^T, on A's support (the
    # levels read every entry below the diagonal and nothing else). A custom_vjp rather than a
    # custom_jvp: the linearised JVP would keep X three times over.
    da = -_einsum("...ji,...jk,...lk->...il", x, dx, x, precision=precision)
    return (jnp.where(jnp.tri(x.shape[-1], k=-1, dtype=bool), da, 0.0),)


_invert_unit_lower.defvjp(_invert_fwd, _invert_bwd)


def _run_ids(segment_ids: jax.Array | None, batch: int, seq_len: int) -> jax.Array:
    """[B, T] index of the maximal run of equal segment ids each token belongs to.

    Comparing runs instead of raw ids makes a reused id (e.g. 0, 1, 0) still count as a reset.
    """
    if segment_ids is None:
        return jnp.zeros((batch, seq_len), jnp.int32)
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.pad(jnp.cumsum(change, axis=1), ((0, 0), (1, 0)))


def _pad_and_chunk(x: jax.Array, pad: int, chunk_size: int, mode: str = "constant") -> jax.Array:
    """[B, T, ...] -> [B, M, C, ...], padding T at the end."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode=mode)
    return x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])


class ChunkTerms(NamedTuple):
    """The intra-chunk quantities of the UT / WY form, everything the state pass reads.

    Layouts are per chunk: q, k [B, M, C, K, E]; u [B, M, K, G, C, H]; w [B, M, K, G, C, E];
    gam, read, write [B, M, K, G, C]; decay [B, M, K, G]; runs [B, M, C]; attn [B, M, K, G, C, S].
    """

    q: jax.Array  # l2-normalised, scaled
    k: jax.Array  # l2-normalised
    u: jax.Array  # Tm diag(beta) V
    w: jax.Array  # Tm diag(beta exp(gam) m) K
    gam: jax.Array  # chunk-local inclusive cumsum of g
    read: jax.Array  # exp(gam) m: how much of the incoming state row r reads
    write: jax.Array  # exp(gam_last - gam) l: how much of token s reaches the outgoing state
    decay: jax.Array  # exp(gam_last) [no reset in chunk]: the incoming state's survival
    runs: jax.Array  # run index of each token (equal runs = same packed document)
    attn: jax.Array  # (Q K^T) * Gam * L_incl * same_run


def ut_transform(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gam: jax.Array,
    read: jax.Array,
    runs: jax.Array,
    precision: jax.lax.Precision = _HIGHEST,
) -> tuple[jax.Array, jax.Array]:
    """U = Tm diag(beta) V and W = Tm diag(beta * read) K with Tm = (I + A)^-1, all chunks.

    Args: k [B, M, C, K, E]; v [B, M, C, K, G, H] (the input's own order, chunked); beta,
    gam, read [B, M, K, G, C]; runs [B, M, C]. Returns u [B, M, K, G, C, H] and
    w [B, M, K, G, C, E].
    """
    c = k.shape[2]
    v = jnp.moveaxis(v, 2, 4)  # [B, M, K, G, C, H]
    same_run = (runs[..., :, None] == runs[..., None, :])[:, :, None, None]  # [B, M, 1, 1, C, S]
    diff = gam[..., :, None] - gam[..., None, :]  # [B, M, K, G, C, S]
    decay_strict = _masked_exp(diff, jnp.tri(c, k=-1, dtype=bool) & same_run)
    kk = _einsum("bmcke,bmske->bmkcs", k, k, precision=precision)[:, :, :, None]
    a = beta[..., None] * kk * decay_strict  # [B, M, K, G, C, S]
    # One multiplication by Tm gives U and W together: [beta V | beta exp(gam) m K].
    k_heads = jnp.moveaxis(k, 3, 2)[:, :, :, None]  # [B, M, K, 1, C, E]
    rhs = jnp.concatenate(
        [beta[..., None] * v, (beta * read)[..., None] * k_heads], axis=-1
    )  # [B, M, K, G, C, H + E]
    tm = _invert_unit_lower(a, precision)
    uw = _einsum("bmkgcs,bmkgsn->bmkgcn", tm, rhs, precision=precision)
    dv = v.shape[-1]
    return uw[..., :dv], uw[..., dv:]


def chunk_terms(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None,
    segment_ids: jax.Array | None,
    use_qk_l2norm: bool,
    chunk_size: int,
    precision: jax.lax.Precision = _HIGHEST,
    ut=ut_transform,
) -> ChunkTerms:
    """Everything of the chunked form that needs no state, for all chunks at once (parallel).

    `precision` is that of the matmuls: HIGHEST keeps fp32 exact on every backend; callers with
    bf16 inputs may pass DEFAULT (tf32 / bf16 passes), whose error is below the inputs' own.
    `ut` computes (U, W) with the signature of `ut_transform` (a kernel may replace it).
    """
    b, t, hk, _ = q.shape
    hv = v.shape[2]
    grp, c = hv // hk, chunk_size
    dtype = compute_dtype(q, k, v)
    pad = -t % c
    q, k = prepare_qk(q, k, scale, use_qk_l2norm)
    q = _pad_and_chunk(q, pad, c)  # [B, M, C, K, E]
    k = _pad_and_chunk(k, pad, c)  # [B, M, C, K, E]

    def per_value_head(x: jax.Array) -> jax.Array:
        # [B, T, Hv, ...] -> [B, M, K, G, C, ...]: the layout every per-v-head term uses.
        x = _pad_and_chunk(x.astype(dtype).reshape(b, t, hk, grp, *x.shape[3:]), pad, c)
        return jnp.moveaxis(x, 2, 4)

    # v as it comes, [B, M, C, K, G, H]: a kernel reads it in place, where moving the heads
    # first would copy it (`ut_transform` moves them itself).
    v = _pad_and_chunk(v.astype(dtype).reshape(b, t, hk, grp, -1), pad, c)
    beta = per_value_head(beta)  # [B, M, K, G, C]
    gam = jnp.cumsum(per_value_head(g), axis=-1)  # [B, M, K, G, C]
    gam_last = gam[..., -1]  # [B, M, K, G]

    # Pads take the run of the last real token, so they never split a run.
    runs = _pad_and_chunk(_run_ids(segment_ids, b, t), pad, c, mode="edge")  # [B, M, C]
    run_prev = jnp.concatenate([runs[:, :1, 0], runs[:, :-1, -1]], axis=1)  # [B, M]
    sees_state = runs == run_prev[..., None]  # [B, M, C]  m_r
    in_last_run = runs == runs[..., -1:]  # [B, M, C]
    carries_state = run_prev == runs[..., -1]  # [B, M]
    same_run = (runs[..., :, None] == runs[..., None, :])[:, :, None, None]  # [B, M, 1, 1, C, S]
    read = jnp.exp(gam) * sees_state[:, :, None, None]  # [B, M, K, G, C]
    u, w = ut(k, v, beta, gam, read, runs, precision)

    diff = gam[..., :, None] - gam[..., None, :]  # [B, M, K, G, C, S]
    decay_incl = _masked_exp(diff, jnp.tri(c, dtype=bool) & same_run)
    qk = _einsum("bmcke,bmske->bmkcs", q, k, precision=precision)[:, :, :, None]
    return ChunkTerms(
        q=q,
        k=k,
        u=u,
        w=w,
        gam=gam,
        read=read,
        write=_masked_exp(gam_last[..., None] - gam, in_last_run[:, :, None, None]),
        decay=jnp.exp(gam_last) * carries_state[:, :, None, None],
        runs=runs,
        attn=qk * decay_incl,
    )


def state_pass(terms: ChunkTerms, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The sequential part: carries the state [B, K, G, E, H] through the chunks.

    Returns (out [B, M, K, G, C, H], final state [B, K, G, E, H]).
    """

    def chunk_step(state, xs):
        q_c, k_c, u_c, w_c, attn_c, read_c, write_c, decay_c = xs
        v_new = u_c - _einsum("bkgce,bkgeh->bkgch", w_c, state)  # [B, K, G, C, H]
        o_c = read_c[..., None] * _einsum("bcke,bkgeh->bkgch", q_c, state)
        o_c = o_c + _einsum("bkgcs,bkgsh->bkgch", attn_c, v_new)
        state = decay_c[..., None, None] * state + _einsum(
            "bcke,bkgch->bkgeh", k_c, write_c[..., None] * v_new
        )
        return state, o_c

    t = terms
    xs = (t.q, t.k, t.u, t.w, t.attn, t.read, t.write, t.decay)
    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs)  # chunks lead for the scan
    state, out = jax.lax.scan(chunk_step, state, xs)  # out: [M, B, K, G, C, H]
    return jnp.moveaxis(out, 0, 1), state


def initial_state_or_zeros(
    initial_state: jax.Array | None, b: int, hk: int, grp: int, dk: int, dv: int, dtype
) -> jax.Array:
    """[B, Hv, dk, dv] (or None) -> [B, K, G, E, H] in `dtype`."""
    if initial_state is None:
        return jnp.zeros((b, hk, grp, dk, dv), dtype)
    return initial_state.astype(dtype).reshape(b, hk, grp, dk, dv)


def unchunk(out: jax.Array, t: int) -> jax.Array:
    """[B, M, K, G, C, H] -> [B, T, Hv, H], dropping the end padding."""
    b, _, hk, grp, _, dv = out.shape
    return jnp.transpose(out, (0, 1, 4, 2, 3, 5)).reshape(b, -1, hk * grp, dv)[:, :t]


def gated_delta_rule_chunked(
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
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule in the chunked UT / WY form.

    Arguments and results are those of `api.gated_delta_rule` (shapes, dtypes, the
    optional initial state and segment ids); this backend adds:

      chunk_size: tokens per chunk.
    """
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
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
    )
    state = initial_state_or_zeros(initial_state, b, hk, hv // hk, dk, dv, terms.u.dtype)
    out, state = state_pass(terms, state)
    return unchunk(out, t).astype(v.dtype), state.reshape(b, hv, dk, dv)
