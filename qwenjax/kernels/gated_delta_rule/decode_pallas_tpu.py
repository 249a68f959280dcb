"""A few tokens of the gated delta rule from a given state in one Pallas Mosaic kernel (TPU):
the twin of `decode_pallas_gpu.py`, reading and writing the fp32 state once, in place.

The grid is (row b, key head k); a program holds the G value heads' states `[G, E, H]` of key
head k in VMEM and, per value head and token (both unrolled, T a handful),

    S <- a_t S;   d = beta_t (v_t - sum_e S * k_t);   S <- S + k_t d;   o_t = sum_e S * q_t

all on the vector unit in fp32 (no MXU pass whose precision would need pinning). q and k come
as rows `[T8, E]` (T padded to 8 sublanes) and are transposed in VMEM, so that a token's
column `[E, 1]` broadcasts over the H lanes of S (picked by a masked lane sum, never an
unaligned slice); a = exp(g) and beta are scalars in
SMEM. The wrapper l2-normalises and scales q and k and lays the small operands out; the state
is only reshaped (free), and aliases the new state: with the state donated, in place. The state
is the model's stacked `[L, B, N, E, H]` (L = 1 for a lone state) and its index map picks the
layer, prefetched into SMEM, so no slice of the stack is ever copied.

Not timed (no TPU here): opt-in. `interpret=None` stages the call through
`lax.platform_dependent`: Mosaic when lowered for TPU (also ahead of time from a CPU host), the
Pallas HLO interpreter elsewhere (tests); True: the TPU interpreter.

Letters: B batch, T tokens, K key heads, G value heads per key head, E key dim, H value dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwenjax.kernels.platform import layer_index


def _kernel(
    layer_ref, q_ref, k_ref, v_ref, a_ref, beta_ref, s_ref, o_ref, s_out_ref, *, tokens: int
):
    del layer_ref  # the state's block index map has read it
    # q_ref, k_ref [T8, E]; v_ref, o_ref [G, T, H]; a_ref, beta_ref SMEM [G, T]; s_ref [G, E, H]
    lanes = jax.lax.broadcasted_iota(jnp.int32, q_ref.shape[::-1], 1)
    column = lambda x, t: jnp.sum(jnp.where(lanes == t, x, 0.0), axis=1, keepdims=True)
    q_cols, k_cols = q_ref[...].T, k_ref[...].T  # [E, T8]
    qs = [column(q_cols, t) for t in range(tokens)]  # [E, 1] each
    ks = [column(k_cols, t) for t in range(tokens)]
    for n in range(s_ref.shape[0]):
        s = s_ref[n]  # [E, H]
        for t in range(tokens):
            s = a_ref[n, t] * s
            u = jnp.sum(s * ks[t], axis=0, keepdims=True)  # [1, H]
            d = beta_ref[n, t] * (v_ref[n, pl.ds(t, 1), :] - u)
            s = s + ks[t] * d
            o_ref[n, pl.ds(t, 1), :] = jnp.sum(s * qs[t], axis=0, keepdims=True)
        s_out_ref[n] = s


def gated_delta_decode_pallas_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    stack: jax.Array,
    layer: jax.Array,
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """q, k `[B, T, K, E]` fp32 (normalised, q scaled), v `[B, T, N, H]`, g, beta `[B, T, N]`,
    the layers' stacked fp32 states `[L, B, N, E, H]` of which `layer` (an int32 scalar,
    prefetched into SMEM for the state's index map) is advanced → (o `[B, T, N, H]` in v's
    dtype, the new stack, aliasing `stack`)."""
    b, t, hk, e = q.shape
    hv, h = v.shape[2:]
    grp = hv // hk
    f32 = lambda x: x.astype(jnp.float32)
    # [B, K, T8, E]: T padded to a sublane tile. As columns [B, K, E, T] the lanes would pad T
    # to 128 in HBM too (at B = 32, T = 3: 67 MB of temporaries beside a 100 MB state).
    rows = lambda x: jnp.pad(f32(x).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, -t % 8), (0, 0)))
    heads = lambda x: jnp.moveaxis(f32(x).reshape(b, t, hk, grp, *x.shape[3:]), 1, 3)
    args = (
        layer_index(layer),
        rows(q),
        rows(k),
        heads(v),  # [B, K, G, T, H]
        heads(jnp.exp(f32(g))),  # [B, K, G, T]
        heads(beta),
        f32(stack).reshape(stack.shape[0], b, hk, grp, e, h),  # [L, B, K, G, E, H]
    )
    qk_spec = pl.BlockSpec((None, None, t + -t % 8, e), lambda i, x, _: (i, x, 0, 0))
    v_spec = pl.BlockSpec((None, None, grp, t, h), lambda i, x, _: (i, x, 0, 0, 0))
    gate_spec = pl.BlockSpec(
        (None, None, grp, t), lambda i, x, _: (i, x, 0, 0), memory_space=pltpu.SMEM
    )
    s_index = lambda i, x, layer: (layer[0], i, x, 0, 0, 0)  # layer: SMEM prefetch
    s_spec = pl.BlockSpec((None, None, None, grp, e, h), s_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hk),
        in_specs=[qk_spec, qk_spec, v_spec, gate_spec, gate_spec, s_spec],
        out_specs=[v_spec, s_spec],
    )

    def call(mode: str, *args):
        return pl.pallas_call(
            functools.partial(_kernel, tokens=t),
            grid_spec=grid_spec,
            out_shape=[
                jax.ShapeDtypeStruct(args[3].shape, jnp.float32),
                jax.ShapeDtypeStruct(args[6].shape, jnp.float32),
            ],
            input_output_aliases={6: 1},
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
            interpret={"mosaic": False, "hlo": True, "tpu": pltpu.InterpretParams()}[mode],
            name="gated_delta_decode_mosaic",
        )(*args)

    if interpret is None:
        o, state = jax.lax.platform_dependent(
            *args, tpu=functools.partial(call, "mosaic"), default=functools.partial(call, "hlo")
        )
    else:
        o, state = call("tpu" if interpret else "mosaic", *args)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, t, hv, h)  # [B, K, G, T, H] → [B, T, N, H]
    return o.astype(v.dtype), state.reshape(stack.shape)
