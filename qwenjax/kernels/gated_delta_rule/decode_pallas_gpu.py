"""A few tokens of the gated delta rule from a given state (decoding, speculative
verification) in one Pallas Triton kernel (GPU): the fp32 state is read once and written once,
in place, whatever the number of tokens.

The jnp path reads the state twice and writes it once per token (`reference.delta_rule_step`),
and verification of T - 1 drafts runs it T times: at the 27B geometry a row's 48 layers hold
144 MiB of state, so 32 rows verifying 3 tokens move ~40 GB a step, beside 54 GB of weights.
Here the program of row b, value head n and value block j holds S[:, j] `[E, BV]` in registers
across the tokens:

    for t < T:   S <- exp(g_t) S;  d = beta_t (v_t - S^T k_t);  S <- S + k_t (x) d;  o_t = S^T q_t

with q, k already l2-normalised and q scaled (in the wrapper: `[B, T, K, E]` is tiny beside
the state). A token with g = beta = 0 leaves S as it is (the model's padding). The new state
aliases the old one: under `jit` with the state donated, the update is in place. The state is
the stacked states of the model's scanned blocks `[L, B, N, E, H]` (the scan's carry; L = 1 for
a lone state) and the kernel indexes layer `layer` itself: a slice handed to a kernel would be
a copy, and its result another write back into the stack.

Not timed yet: "auto" keeps the jnp path until `benchmarks/decode_step.py` shows this is faster
on a GPU. Where it runs: Triton when lowered for CUDA, the interpreter elsewhere.

Letters: B batch, T tokens, K key heads, N value heads (N = K x G), E key dim, H value dim,
BV the value block of a program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwenjax.kernels.platform import layer_index, triton_or_interpreted

BLOCK_V = 16  # value columns a program: S tile [128, 16] fp32, 16 registers a thread at 4 warps


def supports(e: int, h: int) -> bool:
    """Whether the kernel takes key dim `e` and value dim `h` (Triton vectors: powers of two)."""
    pow2 = lambda x: x & (x - 1) == 0
    return pow2(e) and pow2(h) and e >= 16 and h >= 16


def _kernel(
    layer_ref, q_ref, k_ref, v_ref, g_ref, beta_ref, s_ref, o_ref, s_out_ref, *, tokens, bv
):
    # q_ref, k_ref [T, E] fp32; v_ref, o_ref [T, BV]; g_ref, beta_ref [T]; s_ref, s_out_ref
    # the whole stacked state [L, B, N, E, H] (aliased), whose tile [E, BV] this program owns.
    at = (
        layer_ref[0], pl.program_id(0), pl.program_id(1), slice(None),
        pl.ds(pl.program_id(2) * bv, bv),
    )  # fmt: skip
    s = s_ref[at]
    for t in range(tokens):  # T is a handful: unrolled, S stays in registers
        q, k = q_ref[t, :], k_ref[t, :]  # [E]
        s = jnp.exp(g_ref[t]) * s
        u = jnp.sum(s * k[:, None], axis=0)  # [BV]
        d = beta_ref[t] * (v_ref[t, :].astype(jnp.float32) - u)
        s = s + k[:, None] * d[None, :]
        o_ref[t, :] = jnp.sum(s * q[:, None], axis=0).astype(o_ref.dtype)
    s_out_ref[at] = s


def gated_delta_decode_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    stack: jax.Array,
    layer: jax.Array,
    *,
    block_v: int = BLOCK_V,
    num_warps: int = 4,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """q, k `[B, T, K, E]` fp32 (normalised, q scaled), v `[B, T, N, H]`, g, beta `[B, T, N]`,
    the layers' stacked fp32 states `[L, B, N, E, H]` of which `layer` (an int32 scalar) is
    advanced → (o `[B, T, N, H]` in v's dtype, the new stack, aliasing `stack`).
    `interpret=None`: Triton when lowered for CUDA, the interpreter elsewhere."""
    b, t, hk, e = q.shape
    hv, h = v.shape[2:]
    if not supports(e, h):
        raise ValueError(f"gated delta decode kernel: needs power-of-two E, H >= 16; got {e}, {h}")
    grp, bv = hv // hk, min(block_v, h)
    qk_spec = pl.BlockSpec((None, t, None, e), lambda i, n, j: (i, 0, n // grp, 0))
    v_spec = pl.BlockSpec((None, t, None, bv), lambda i, n, j: (i, 0, n, j))
    gate_spec = pl.BlockSpec((None, t, None), lambda i, n, j: (i, 0, n))
    layer_spec = pl.BlockSpec((1,), lambda i, n, j: (0,))
    # The whole stack, indexed in the kernel: a block spec cannot follow a traced layer index.
    s_spec = pl.no_block_spec

    def run(interpret: bool, *args):
        return pl.pallas_call(
            functools.partial(_kernel, tokens=t, bv=bv),
            grid=(b, hv, h // bv),
            in_specs=[layer_spec, qk_spec, qk_spec, v_spec, gate_spec, gate_spec, s_spec],
            out_specs=[v_spec, s_spec],
            out_shape=[
                jax.ShapeDtypeStruct(v.shape, v.dtype),
                jax.ShapeDtypeStruct(stack.shape, jnp.float32),
            ],
            input_output_aliases={6: 1},
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret,
            name="gated_delta_decode_triton",
        )(*args)

    f32 = lambda x: x.astype(jnp.float32)
    layer = layer_index(layer)
    args = (layer, f32(q), f32(k), v, f32(g), f32(beta), f32(stack))
    return triton_or_interpreted(run, interpret, *args)
