"""Chunked gated delta rule as a Pallas TPU (Mosaic) kernel; interpret mode off TPU.

Same recurrence and chunked UT / WY algebra as `xla.py`. One kernel program handles one chunk of
C = 64 tokens of one value head n of one batch row; the grid is (B, Hv, M) with the chunk axis
sequential ("arbitrary"), so the fp32 state S [dk, dv] lives in a VMEM scratch buffer for a whole
row. Value head n reads key head n // G (G = Hv / Hk) through its BlockSpec index map, so q and k
are never repeated. Inside a chunk, with rows r, s, gam the inclusive cumsum of g and
Gam_rs = exp(gam_r - gam_s), and (q, k) l2-normalised and q scaled in-kernel:

    A   = beta_r (k_r . k_s) Gam_rs  for s < r in r's run, else 0    strictly lower triangular
    Tm  = (I + A)^-1                       block doubling: X_2b = X_b - X_b E_b X_b, log2(C) steps
    U   = Tm diag(beta) V                  W = Tm diag(beta * exp(gam) * m) K
    Vn  = U - W S                                                     per-token deltas, [C, dv]
    O   = diag(exp(gam) * m) Q S + ((Q K^T) * Gam * L_incl * same_run) Vn
    S'  = exp(gam_last) [no reset in chunk] S + (K * exp(gam_last - gam) * l)^T Vn

Packed documents use masks built from per-token reset flags (1 where the segment id differs from
the previous token's; token 0 never resets): the chunk-local run index is the inclusive cumsum of
the flags, m_r = [run_r == 0] marks rows that still see the incoming state, same_run keeps A and
the QK term inside a run, and l_s = [run_s == run_last] keeps only the run reaching the chunk's
end in the state update. No cross-chunk segment information is needed.

Layout (the Mosaic constraints: the last two dims of every block must be multiples of (8, 128)
(16 for bf16 in the second-to-last) or equal the full array dims; lane slices must be static):
  * q, k [B, Tp, Hk * dkp] and v, out [B, Tp, Hv * dvp] merge heads into the lane axis, and a
    block is one chunk of one head, (C, dkp) or (C, dvp). The 4-D alternative, block
    (C, squeezed head, d) of [B, T, H, d], is rejected ("last two dimensions of your block shape
    are divisible by 8 and 128"). The merge is a relayout on TPU (tiles span (H, d) in 4-D and
    (T, H * d) in 3-D), so XLA copies 4-D operands at the call boundary; in the model q, k, v come
    from a split of [B, T, channels] and the producing fusion can write the 3-D layout directly.
    Head dims are zero-padded to a multiple of 128 outside the kernel (exact: zero columns change
    no norm, dot product or output column); the 27B model's dk = dv = 128 needs no pad. T is
    zero-padded to Tp, a multiple of C (g = beta = 0 there: a no-op write; pad outputs dropped).
  * g and beta [B, Hv, M, 2, C] fp32 and the reset flags [B, M, 1, C] fp32: blocks (2, C) and
    (1, C) equal the full trailing dims. In-kernel, the per-token scalars arrive as lane rows
    [1, C]; the column forms [C, 1] and the cumsums come from masked lane / sublane reductions
    of [C, C] tiles, which avoids small transposes and cumsum primitives Mosaic lacks.
  * the state [B, Hv, dkp, dvp] fp32: the initial-state block is read at chunk 0; the final-state
    block (same index for every chunk) is written at the last chunk.

All in-kernel math is fp32 with HIGHEST matmul precision (multi-pass on the MXU); float64 inputs
are computed in fp32 and the results cast back.

Where it runs: `interpret=None` (what the dispatch uses) stages the call through
`lax.platform_dependent`, so the choice is made at lowering: Mosaic when lowering for TPU (also
when compiling ahead of time for a TPU topology on a CPU host, where a trace-time
`jax.default_backend()` test would wrongly pick the interpreter) and the Pallas HLO interpreter
(`interpret=True` in `pallas_call`) on every other platform. `interpret=True` here selects the TPU
interpreter (`pltpu.InterpretParams`: NaN-filled uninitialised VMEM, block bounds checks), which is
closer to Mosaic but cannot be the `platform_dependent` default in jax 0.10.2: its ordered-IO
effect makes lowering the pruned TPU branch fail ("Lowering rule for `cond` returns incorrect set
of output tokens"). Both interpreters execute this same kernel body.

Differentiation: `jax.custom_vjp` whose forward is the kernel (residuals: the inputs only) and
whose backward, for now, is the VJP of the pure-JAX chunked path (`xla.py`) recomputed from the
inputs. A Pallas backward kernel is the next step.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwenjax.kernels.gated_delta_rule.reference import L2NORM_EPS, compute_dtype
from qwenjax.kernels.gated_delta_rule.xla import gated_delta_rule_chunked

_HIGHEST = jax.lax.Precision.HIGHEST
_LANES = 128


class _Config(NamedTuple):
    """Static (hashable) options of one call."""

    scale: float
    use_qk_l2norm: bool
    chunk_size: int
    interpret: bool | None  # None: Mosaic on TPU, HLO interpreter elsewhere; True: TPU interpreter


def _dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b in fp32 at HIGHEST precision, with either operand optionally transposed."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    # The inner where keeps exp of masked entries (gam_r - gam_s above the diagonal) from
    # overflowing to inf, which 0 * inf would turn into NaN.
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _kernel(
    q_ref,  # [C, E] one chunk of key head n // G
    k_ref,  # [C, E]
    v_ref,  # [C, H] one chunk of value head n
    gates_ref,  # [2, C] rows: g, beta
    reset_ref,  # [1, C]
    s0_ref,  # [E, H] initial state of (row, head)
    o_ref,  # [C, H]
    s_out_ref,  # [E, H] final state of (row, head)
    s_ref,  # [E, H] scratch: the state carried across chunks
    *,
    scale: float,
    use_qk_l2norm: bool,
):
    chunk = pl.program_id(2)
    c = q_ref.shape[0]

    @pl.when(chunk == 0)
    def _():
        s_ref[...] = s0_ref[...]

    q = q_ref[...].astype(jnp.float32)
    k = k_ref[...].astype(jnp.float32)
    if use_qk_l2norm:
        q = q * jax.lax.rsqrt(jnp.sum(q * q, axis=1, keepdims=True) + L2NORM_EPS)
        k = k * jax.lax.rsqrt(jnp.sum(k * k, axis=1, keepdims=True) + L2NORM_EPS)
    q = q * scale
    v = v_ref[...].astype(jnp.float32)

    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    eye, incl, strict = rows == cols, cols <= rows, cols < rows

    def cumsum_col(x_row):  # [1, C] -> inclusive cumsum as a column [C, 1]
        return jnp.sum(jnp.where(incl, x_row, 0.0), axis=1, keepdims=True)

    def col_to_row(x_col):  # [C, 1] -> [1, C]
        return jnp.sum(jnp.where(eye, x_col, 0.0), axis=0, keepdims=True)

    def row_to_col(x_row):  # [1, C] -> [C, 1]
        return jnp.sum(jnp.where(eye, x_row, 0.0), axis=1, keepdims=True)

    g_row, beta_row, reset_row = gates_ref[0:1, :], gates_ref[1:2, :], reset_ref[...]
    gam_col = cumsum_col(g_row)  # [C, 1]
    gam_row = col_to_row(gam_col)  # [1, C]
    gam_last = jnp.sum(g_row, axis=1, keepdims=True)  # [1, 1]
    beta_col = row_to_col(beta_row)  # [C, 1]
    run_col = cumsum_col(reset_row)  # [C, 1] chunk-local run index (exact small integers)
    run_row = col_to_row(run_col)  # [1, C]
    run_last = jnp.sum(reset_row, axis=1, keepdims=True)  # [1, 1]

    same_run = run_col == run_row  # [C, S]
    diff = gam_col - gam_row  # [C, S]
    decay_strict = _masked_exp(diff, strict & same_run)
    decay_incl = _masked_exp(diff, incl & same_run)
    a = beta_col * _dot(k, k, trans_b=True) * decay_strict  # [C, S]
    attn = _dot(q, k, trans_b=True) * decay_incl  # [C, S]

    # (I + A)^-1 by block doubling: X_b inverts the diagonal blocks of size b; E_b holds the
    # entries of A joining the two halves of each 2b block, and (X_b E_b)^2 = 0 makes
    # X_2b = X_b - X_b E_b X_b exact. log2(C) levels of two C x C matmuls, no LAPACK.
    tm = eye.astype(jnp.float32)
    level = 0
    while (1 << level) < c:
        b = 1 << level
        joins = ((rows >> (level + 1)) == (cols >> (level + 1))) & ((rows & b) != 0)
        joins = joins & ((cols & b) == 0)
        tm = tm - _dot(tm, _dot(jnp.where(joins, a, 0.0), tm))
        level += 1

    sees_state = run_col == 0.0  # [C, 1]  m_r
    read_scale = jnp.where(sees_state, jnp.exp(gam_col), 0.0)  # [C, 1]
    u = _dot(tm, beta_col * v)  # [C, H]
    w = _dot(tm, (beta_col * read_scale) * k)  # [C, E]
    s = s_ref[...]  # [E, H]
    v_new = u - _dot(w, s)  # [C, H]
    o = read_scale * _dot(q, s) + _dot(attn, v_new)  # [C, H]
    o_ref[...] = o.astype(o_ref.dtype)

    write_scale = _masked_exp(gam_last - gam_col, run_col == run_last)  # [C, 1]
    state_decay = jnp.where(run_last == 0.0, jnp.exp(gam_last), 0.0)  # [1, 1]
    s_ref[...] = state_decay * s + _dot(k * write_scale, v_new, trans_a=True)

    @pl.when(chunk == pl.num_programs(2) - 1)
    def _():
        s_out_ref[...] = s_ref[...]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _forward(
    cfg: _Config,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Pads and lays out the inputs, runs the kernel, and undoes the padding."""
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    grp, c = hv // hk, cfg.chunk_size
    tp, dkp, dvp = _round_up(t, c), _round_up(dk, _LANES), _round_up(dv, _LANES)
    m = tp // c
    state_dtype = compute_dtype(q, k, v)
    # float64 exists only for CPU tests; the kernel computes in fp32 like it does on TPU.
    in_dtype = jnp.float32 if jnp.dtype(q.dtype).itemsize > 4 else q.dtype
    v_dtype = jnp.float32 if jnp.dtype(v.dtype).itemsize > 4 else v.dtype

    def pad(x, d, dp):  # [B, T, heads, d] -> [B, Tp, heads * dp]
        x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, dp - d)))
        return x.reshape(b, tp, -1)

    q2 = pad(q.astype(in_dtype), dk, dkp)  # [B, Tp, Hk * dkp]
    k2 = pad(k.astype(in_dtype), dk, dkp)
    v2 = pad(v.astype(v_dtype), dv, dvp)  # [B, Tp, Hv * dvp]
    gates = jnp.stack([g, beta], axis=-1).astype(jnp.float32)  # [B, T, Hv, 2]
    gates = jnp.pad(gates, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    gates = gates.reshape(b, m, c, hv, 2).transpose(0, 3, 1, 4, 2)  # [B, Hv, M, 2, C]
    if segment_ids is None:
        reset = jnp.zeros((b, tp), jnp.float32)
    else:
        # Token 0 never resets (the initial state is the first segment's); pads never do.
        reset = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.float32)
        reset = jnp.pad(reset, ((0, 0), (1, tp - t)))
    reset = reset.reshape(b, m, 1, c)  # [B, M, 1, C]
    if initial_state is None:
        s0 = jnp.zeros((b, hv, dkp, dvp), jnp.float32)
    else:
        s0 = initial_state.astype(jnp.float32)
        s0 = jnp.pad(s0, ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)))  # [B, Hv, dkp, dvp]

    kernel = functools.partial(_kernel, scale=cfg.scale, use_qk_l2norm=cfg.use_qk_l2norm)

    # Index maps use lax.div, not //: jnp's floor division lowers through `sign`, whose Mosaic
    # rule asks the local device for its TPU generation and fails on a CPU host compiling AOT.
    def call(mode: str, *args):
        # pallas_call spells the HLO interpreter `True` and the TPU interpreter by its params.
        interpret = {"mosaic": False, "hlo": True, "tpu": pltpu.InterpretParams()}[mode]
        return pl.pallas_call(
            kernel,
            grid=(b, hv, m),
            in_specs=[
                pl.BlockSpec((None, c, dkp), lambda i, n, j: (i, j, jax.lax.div(n, grp))),
                pl.BlockSpec((None, c, dkp), lambda i, n, j: (i, j, jax.lax.div(n, grp))),
                pl.BlockSpec((None, c, dvp), lambda i, n, j: (i, j, n)),
                pl.BlockSpec((None, None, None, 2, c), lambda i, n, j: (i, n, j, 0, 0)),
                pl.BlockSpec((None, None, 1, c), lambda i, n, j: (i, j, 0, 0)),
                pl.BlockSpec((None, None, dkp, dvp), lambda i, n, j: (i, n, 0, 0)),
            ],
            out_specs=[
                pl.BlockSpec((None, c, dvp), lambda i, n, j: (i, j, n)),
                pl.BlockSpec((None, None, dkp, dvp), lambda i, n, j: (i, n, 0, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((b, tp, hv * dvp), v_dtype),
                jax.ShapeDtypeStruct((b, hv, dkp, dvp), jnp.float32),
            ],
            scratch_shapes=[pltpu.VMEM((dkp, dvp), jnp.float32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")
            ),
            interpret=interpret,
            name="gated_delta_rule_fwd",
        )(*args)

    args = (q2, k2, v2, gates, reset, s0)
    if cfg.interpret is None:
        out, state = jax.lax.platform_dependent(
            *args, tpu=functools.partial(call, "mosaic"), default=functools.partial(call, "hlo")
        )
    else:
        out, state = call("tpu" if cfg.interpret else "mosaic", *args)
    out = out.reshape(b, tp, hv, dvp)[:, :t, :, :dv].astype(v.dtype)
    return out, state[:, :, :dk, :dv].astype(state_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_delta_rule(cfg, q, k, v, g, beta, initial_state, segment_ids):
    return _forward(cfg, q, k, v, g, beta, initial_state, segment_ids)


def _fwd(cfg, q, k, v, g, beta, initial_state, segment_ids):
    out = _forward(cfg, q, k, v, g, beta, initial_state, segment_ids)
    # Only the inputs, which the caller keeps alive anyway: the backward recomputes the rest.
    return out, (q, k, v, g, beta, initial_state, segment_ids)


def _bwd(cfg, residuals, cotangents):
    q, k, v, g, beta, initial_state, segment_ids = residuals

    def chunked(q, k, v, g, beta, initial_state):
        return gated_delta_rule_chunked(
            q,
            k,
            v,
            g,
            beta,
            scale=cfg.scale,
            initial_state=initial_state,
            segment_ids=segment_ids,
            use_qk_l2norm=cfg.use_qk_l2norm,
            chunk_size=cfg.chunk_size,
        )

    _, vjp = jax.vjp(chunked, q, k, v, g, beta, initial_state)
    return (*vjp(cotangents), None)


_gated_delta_rule.defvjp(_fwd, _bwd)


def gated_delta_rule_pallas_tpu(
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
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule, forward as a Pallas TPU kernel, backward via the pure-JAX chunked path.

    Arguments and results are those of `api.gated_delta_rule` (shapes, dtypes, the
    optional initial state and segment ids); this backend adds:

      chunk_size: tokens per chunk (a multiple of 16, so bf16 blocks tile).
      interpret: None: Mosaic when lowered for TPU, the HLO interpreter elsewhere; True: the TPU
        interpreter (`pltpu.InterpretParams`) on any platform; False: Mosaic (TPU only).
    """
    cfg = _Config(
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        use_qk_l2norm=bool(use_qk_l2norm),
        chunk_size=int(chunk_size),
        interpret=interpret,
    )
    return _gated_delta_rule(cfg, q, k, v, g, beta, initial_state, segment_ids)
