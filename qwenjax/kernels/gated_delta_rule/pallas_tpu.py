"""Chunked gated delta rule as Pallas TPU (Mosaic) kernels, forward and backward.

Same recurrence and chunked UT / WY algebra as `xla.py`; the per-chunk equations of both kernels
are in `pallas_tpu_kernels.py`. The forward kernel handles one chunk of C = 64 tokens of one
value head n of one batch row per program; its grid is (B, Hv, M) with the chunk axis sequential
("arbitrary"), so the fp32 state S [dk, dv] lives in a VMEM scratch buffer for a whole row. Value
head n reads key head n // G (G = Hv / Hk) through its BlockSpec index map, so q and k are never
repeated. Inside a chunk, (q, k) are l2-normalised and q scaled in-kernel, A, (I + A)^-1 (block
doubling), U, W and the decay masks are built from the inputs, and the state is read and updated.

Packed documents use masks built from per-token reset flags (1 where the segment id differs from
the previous token's; token 0 never resets): the chunk-local run index is the inclusive cumsum of
the flags, m_r = [run_r == 0] marks rows that still see the incoming state, same_run keeps A and
the QK term inside a run, and l_s = [run_s == run_last] keeps only the run reaching the chunk's
end in the state update. No cross-chunk segment information is needed, in either direction.

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

Differentiation: `jax.custom_vjp` with both directions as kernels.
  * Residuals: the inputs plus the state before every chunk, [B, Hv, M, dkp, dvp] fp32, which the
    forward kernel writes only under differentiation (the primal call skips the write). Cost:
    4 dk dv / C bytes per token and value head (1 KiB at the 27B geometry, 4x a bf16 v; 1.6 GB
    per layer at T = 32768). Storing beats recomputing them at the start of the backward: the
    peak is reached inside the backward with all of them live either way (only a checkpointed
    re-run of chunk ranges would lower it, at more compute), and under the model's block remat
    this forward rule already runs inside the backward pass, so a recompute would be a second
    forward kernel for nothing. Tm, U, W, A and the masks are recomputed per chunk, never stored.
  * Backward kernel: grid (B, Hk, M, G), chunks in reverse, the G value heads of key head h
    innermost. dS' (the gradient w.r.t. the state after the chunk) of each of the G heads is a
    fp32 [G, dkp, dvp] VMEM scratch; per chunk it writes dv, dg and dbeta of value head n, and
    adds dq, dk into the (C, dkp) block of key head h, which stays in VMEM across the G
    consecutive steps (the accumulator pattern), so the grouped heads are summed in-kernel and
    no [B, T, Hv, dk] buffer exists. The gradient of the initial state is written at the last
    step. The kernel differentiates w.r.t. the normalised, scaled q and k; the l2norm and scale
    VJP (elementwise, O(T d)) is applied outside with jnp, by JAX's autodiff of `prepare_qk`.
  * Gradient buffers: dq, dk fp32 [B, Tp, Hk * dkp], dv in v's dtype, dg, dbeta fp32; all O(T d).
    Compiled for v5p and v6e at the 27B layer (B 1, T 32768, bf16), fwd + bwd has 2.55 GB of
    temporaries: the states, the fp32 dq, dk and the bf16 output (tests/kernels/
    test_gdn_pallas_tpu.py bounds them).

Where it runs: `interpret=None` (what the dispatch uses) stages each call through
`lax.platform_dependent`, so the choice is made at lowering: Mosaic when lowering for TPU (also
when compiling ahead of time for a TPU topology on a CPU host, where a trace-time
`jax.default_backend()` test would wrongly pick the interpreter) and the Pallas HLO interpreter
(`interpret=True` in `pallas_call`) on every other platform. `interpret=True` here selects the TPU
interpreter (`pltpu.InterpretParams`: NaN-filled uninitialised VMEM, block bounds checks), which is
closer to Mosaic but cannot be the `platform_dependent` default in jax 0.10.2: its ordered-IO
effect makes lowering the pruned TPU branch fail ("Lowering rule for `cond` returns incorrect set
of output tokens"). Both interpreters execute these same kernel bodies.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwenjax.kernels.gated_delta_rule.pallas_tpu_kernels import backward_kernel, forward_kernel
from qwenjax.kernels.gated_delta_rule.reference import compute_dtype, prepare_qk

_LANES = 128


class _Config(NamedTuple):
    """Static (hashable) options of one call."""

    scale: float
    use_qk_l2norm: bool
    chunk_size: int
    interpret: bool | None  # None: Mosaic on TPU, HLO interpreter elsewhere; True: TPU interpreter


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class _Dims(NamedTuple):
    b: int
    t: int
    hk: int
    hv: int
    grp: int  # G = Hv / Hk
    dk: int
    dv: int
    c: int  # chunk
    m: int  # chunks
    dkp: int  # dk padded to lanes
    dvp: int

    @classmethod
    def of(cls, cfg: _Config, q: jax.Array, v: jax.Array) -> "_Dims":
        b, t, hk, dk = q.shape
        hv, dv = v.shape[2:]
        c = cfg.chunk_size
        m = -(-t // c)
        return cls(
            b, t, hk, hv, hv // hk, dk, dv, c, m, _round_up(dk, _LANES), _round_up(dv, _LANES)
        )

    @property
    def tp(self) -> int:
        return self.m * self.c


def _kernel_dtype(x: jax.Array) -> jnp.dtype:
    # float64 exists only for CPU tests; the kernels compute in fp32 as they do on TPU.
    return jnp.float32 if jnp.dtype(x.dtype).itemsize > 4 else x.dtype


def _merge_heads(x: jax.Array, d: _Dims, dp: int) -> jax.Array:
    """[B, T, heads, dim] -> [B, Tp, heads * dp], zero-padded, in the kernel dtype."""
    x = jnp.pad(
        x.astype(_kernel_dtype(x)), ((0, 0), (0, d.tp - d.t), (0, 0), (0, dp - x.shape[-1]))
    )
    return x.reshape(d.b, d.tp, -1)


def _split_heads(x: jax.Array, d: _Dims, heads: int, dim: int) -> jax.Array:
    """[B, Tp, heads * dp] -> [B, T, heads, dim], dropping the padding."""
    return x.reshape(d.b, d.tp, heads, -1)[:, : d.t, :, :dim]


class _Operands(NamedTuple):
    """The kernels' inputs in their layouts (see the module docstring)."""

    q: jax.Array  # [B, Tp, Hk * dkp]
    k: jax.Array  # [B, Tp, Hk * dkp]
    v: jax.Array  # [B, Tp, Hv * dvp]
    gates: jax.Array  # [B, Hv, M, 2, C] fp32 rows: g, beta
    reset: jax.Array  # [B, M, 1, C] fp32


def _operands(d: _Dims, q, k, v, g, beta, segment_ids) -> _Operands:
    gates = jnp.stack([g, beta], axis=-1).astype(jnp.float32)  # [B, T, Hv, 2]
    gates = jnp.pad(gates, ((0, 0), (0, d.tp - d.t), (0, 0), (0, 0)))
    gates = gates.reshape(d.b, d.m, d.c, d.hv, 2).transpose(0, 3, 1, 4, 2)  # [B, Hv, M, 2, C]
    if segment_ids is None:
        reset = jnp.zeros((d.b, d.tp), jnp.float32)
    else:
        # Token 0 never resets (the initial state is the first segment's); pads never do.
        reset = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.float32)
        reset = jnp.pad(reset, ((0, 0), (1, d.tp - d.t)))
    return _Operands(
        q=_merge_heads(q, d, d.dkp),
        k=_merge_heads(k, d, d.dkp),
        v=_merge_heads(v, d, d.dvp),
        gates=gates,
        reset=reset.reshape(d.b, d.m, 1, d.c),
    )


def _pad_state(state: jax.Array, d: _Dims) -> jax.Array:
    """[B, Hv, dk, dv] -> [B, Hv, dkp, dvp] fp32."""
    pad = ((0, 0), (0, 0), (0, d.dkp - d.dk), (0, d.dvp - d.dv))
    return jnp.pad(state.astype(jnp.float32), pad)


def _pallas(cfg: _Config, kernel, args, *, grid, in_specs, out_specs, out_shape, scratch, name):
    """One pallas_call, on the backend `cfg.interpret` picks; the first two grid axes are
    parallel, the rest sequential."""
    semantics = ("parallel", "parallel") + ("arbitrary",) * (len(grid) - 2)

    def call(mode: str, *args):
        # pallas_call spells the HLO interpreter `True` and the TPU interpreter by its params.
        interpret = {"mosaic": False, "hlo": True, "tpu": pltpu.InterpretParams()}[mode]
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            scratch_shapes=scratch,
            compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
            interpret=interpret,
            name=name,
        )(*args)

    if cfg.interpret is None:
        return jax.lax.platform_dependent(
            *args, tpu=functools.partial(call, "mosaic"), default=functools.partial(call, "hlo")
        )
    return call("tpu" if cfg.interpret else "mosaic", *args)


def _forward(cfg: _Config, d: _Dims, x: _Operands, s0: jax.Array, save_states: bool):
    """(out [B, Tp, Hv * dvp], final state [B, Hv, dkp, dvp] fp32[, states [B, Hv, M, dkp,
    dvp] fp32: the state before each chunk])."""
    c, dkp, dvp = d.c, d.dkp, d.dvp

    # Index maps use lax.div, not //: jnp's floor division lowers through `sign`, whose Mosaic
    # rule asks the local device for its TPU generation and fails on a CPU host compiling AOT.
    def key_head(i, n, j):
        return i, j, jax.lax.div(n, d.grp)

    def state(i, n, j):
        return i, n, 0, 0

    out_specs = [
        pl.BlockSpec((None, c, dvp), lambda i, n, j: (i, j, n)),
        pl.BlockSpec((None, None, dkp, dvp), state),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((d.b, d.tp, d.hv * dvp), x.v.dtype),
        jax.ShapeDtypeStruct((d.b, d.hv, dkp, dvp), jnp.float32),
    ]
    if save_states:
        out_specs.append(
            pl.BlockSpec((None, None, None, dkp, dvp), lambda i, n, j: (i, n, j, 0, 0))
        )
        out_shape.append(jax.ShapeDtypeStruct((d.b, d.hv, d.m, dkp, dvp), jnp.float32))
    kernel = functools.partial(
        forward_kernel,
        scale=cfg.scale,
        use_qk_l2norm=cfg.use_qk_l2norm,
        save_states=save_states,
    )
    return _pallas(
        cfg,
        kernel,
        (*x, s0),
        grid=(d.b, d.hv, d.m),
        in_specs=[
            pl.BlockSpec((None, c, dkp), key_head),
            pl.BlockSpec((None, c, dkp), key_head),
            pl.BlockSpec((None, c, dvp), lambda i, n, j: (i, j, n)),
            pl.BlockSpec((None, None, None, 2, c), lambda i, n, j: (i, n, j, 0, 0)),
            pl.BlockSpec((None, None, 1, c), lambda i, n, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, dkp, dvp), state),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch=[pltpu.VMEM((dkp, dvp), jnp.float32)],
        name="gated_delta_rule_fwd",
    )


def _backward(cfg: _Config, d: _Dims, x: _Operands, states, do, dsf):
    """(dq, dk [B, Tp, Hk * dkp] fp32, dv [B, Tp, Hv * dvp], dgates [B, Hv, M, 2, C] fp32,
    ds0 [B, Hv, dkp, dvp] fp32), dq and dk w.r.t. the normalised, scaled q and k."""
    c, dkp, dvp, grp, last = d.c, d.dkp, d.dvp, d.grp, d.m - 1

    # Grid (B, Hk, M, G): step j is chunk M - 1 - j; value head n = h G + i.
    def key_head(b, h, j, i):
        return b, last - j, h

    def value_head(b, h, j, i):
        return b, last - j, h * grp + i

    def per_chunk(b, h, j, i):  # [B, Hv, M, ...]
        return b, h * grp + i, last - j, 0, 0

    def group_states(b, h, j, i):  # [B, Hv, dkp, dvp], the G heads of key head h
        return b, h, 0, 0

    kernel = functools.partial(backward_kernel, scale=cfg.scale, use_qk_l2norm=cfg.use_qk_l2norm)
    gates = pl.BlockSpec((None, None, None, 2, c), per_chunk)
    group = pl.BlockSpec((None, grp, dkp, dvp), group_states)
    return _pallas(
        cfg,
        kernel,
        (*x, states, do, dsf),
        grid=(d.b, d.hk, d.m, grp),
        in_specs=[
            pl.BlockSpec((None, c, dkp), key_head),
            pl.BlockSpec((None, c, dkp), key_head),
            pl.BlockSpec((None, c, dvp), value_head),
            gates,
            pl.BlockSpec((None, None, 1, c), lambda b, h, j, i: (b, last - j, 0, 0)),
            pl.BlockSpec((None, None, None, dkp, dvp), per_chunk),
            pl.BlockSpec((None, c, dvp), value_head),
            group,
        ],
        out_specs=[
            pl.BlockSpec((None, c, dkp), key_head),
            pl.BlockSpec((None, c, dkp), key_head),
            pl.BlockSpec((None, c, dvp), value_head),
            gates,
            group,
        ],
        out_shape=[
            jax.ShapeDtypeStruct(x.q.shape, jnp.float32),
            jax.ShapeDtypeStruct(x.k.shape, jnp.float32),
            jax.ShapeDtypeStruct(x.v.shape, x.v.dtype),
            jax.ShapeDtypeStruct(x.gates.shape, jnp.float32),
            jax.ShapeDtypeStruct(dsf.shape, jnp.float32),
        ],
        scratch=[pltpu.VMEM((grp, dkp, dvp), jnp.float32)],
        name="gated_delta_rule_bwd",
    )


def _run_forward(cfg, q, k, v, g, beta, initial_state, segment_ids, *, save_states):
    d = _Dims.of(cfg, q, v)
    x = _operands(d, q, k, v, g, beta, segment_ids)
    if initial_state is None:
        s0 = jnp.zeros((d.b, d.hv, d.dkp, d.dvp), jnp.float32)
    else:
        s0 = _pad_state(initial_state, d)
    out, state, *states = _forward(cfg, d, x, s0, save_states)
    out = _split_heads(out, d, d.hv, d.dv).astype(v.dtype)
    state = state[:, :, : d.dk, : d.dv].astype(compute_dtype(q, k, v))
    return (out, state), states


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_delta_rule(cfg, q, k, v, g, beta, initial_state, segment_ids):
    outputs, _ = _run_forward(cfg, q, k, v, g, beta, initial_state, segment_ids, save_states=False)
    return outputs


def _fwd(cfg, q, k, v, g, beta, initial_state, segment_ids):
    outputs, (states,) = _run_forward(
        cfg, q, k, v, g, beta, initial_state, segment_ids, save_states=True
    )
    return outputs, (q, k, v, g, beta, initial_state, segment_ids, states)


def _bwd(cfg, residuals, cotangents):
    q, k, v, g, beta, initial_state, segment_ids, states = residuals
    do, dsf = cotangents
    d = _Dims.of(cfg, q, v)
    x = _operands(d, q, k, v, g, beta, segment_ids)
    do = _merge_heads(do, d, d.dvp).astype(x.v.dtype)
    dq_hat, dk_hat, dv, dgates, ds0 = _backward(cfg, d, x, states, do, _pad_state(dsf, d))
    # The kernel's dq, dk are w.r.t. the normalised, scaled q and k; add the l2norm and scale.
    qk_hat, prepare_vjp = jax.vjp(lambda q, k: prepare_qk(q, k, cfg.scale, cfg.use_qk_l2norm), q, k)
    dq, dk = prepare_vjp(
        tuple(
            _split_heads(dx, d, d.hk, d.dk).astype(x_hat.dtype)
            for dx, x_hat in zip((dq_hat, dk_hat), qk_hat, strict=True)
        )
    )
    dgates = dgates.transpose(0, 2, 4, 1, 3).reshape(d.b, d.tp, d.hv, 2)[:, : d.t]  # [B, T, Hv, 2]
    ds0 = None if initial_state is None else ds0[:, :, : d.dk, : d.dv].astype(initial_state.dtype)
    return (
        dq,
        dk,
        _split_heads(dv, d, d.hv, d.dv).astype(v.dtype),
        dgates[..., 0].astype(g.dtype),
        dgates[..., 1].astype(beta.dtype),
        ds0,
        None,
    )


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
    """Gated delta rule with Pallas TPU kernels for the forward and the backward.

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
