"""Gated delta rule entry points: the only import the model uses.

`gated_delta_rule` runs a whole sequence (training, prefill) through a chosen backend;
`gated_delta_step` advances the recurrent state by one token in jnp, and `gated_delta_decode` by a
few tokens (decoding, draft verification) through a chosen backend. All implement, per batch
row and value head n (reading query/key head n // (Hv // Hk)), with a fp32 state S [dk, dv]:

    S <- exp(g_t) S;   S <- S + k_t (x) beta_t (v_t - S^T k_t);   o_t = S^T q_t

after optional l2 normalisation of q, k and scaling of q; see `reference.py` for the full rule
and `xla.py` for the chunked form. Shapes are checked here, once, with errors naming the argument.
"""

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from qwenjax.kernels.gated_delta_rule import decode_pallas_gpu, decode_pallas_tpu
from qwenjax.kernels.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu
from qwenjax.kernels.gated_delta_rule.pallas_tpu import gated_delta_rule_pallas_tpu
from qwenjax.kernels.gated_delta_rule.reference import (
    compute_dtype,
    delta_rule_step,
    delta_rule_steps_by_sums,
    gated_delta_rule_reference,
    prepare_qk,
)
from qwenjax.kernels.gated_delta_rule.xla import gated_delta_rule_chunked
from qwenjax.kernels.pins import PinStack

_BACKENDS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "reference": gated_delta_rule_reference,
    "chunked": gated_delta_rule_chunked,
    "pallas_tpu": gated_delta_rule_pallas_tpu,
    "pallas_gpu": gated_delta_rule_pallas_gpu,
}
BACKENDS = tuple(_BACKENDS)
# backend="auto" by platform, from measurement (benchmarks/results/): on an H100 the Pallas GPU
# kernels beat the pure-JAX path 6-8x forward and 1.6-1.9x fwd+bwd at the 27B geometry. On
# TPU the Pallas forward is not yet measured on a chip, so the pure-JAX path stays.
_AUTO = {"gpu": "pallas_gpu"}
# The head dims the Pallas GPU kernels were verified and timed at on an H100. Larger heads mean
# larger [dk, BV] state tiles and [C, dk] operand tiles per program, which may not fit shared
# memory; "auto" falls back to the pure-JAX path there rather than fail to compile.
PALLAS_GPU_MAX_HEAD_DIM = 128
_pins = PinStack()
# Decoding from a state (`gated_delta_decode`): the jnp step, or one kernel that reads and writes
# the state once for all the tokens. Pinning "pallas_gpu" / "pallas_tpu" for the rule pins the
# platform's decode kernel too; unpinned, "auto" keeps "xla" until the kernels are timed on a
# device (`benchmarks/decode_step.py`).
DECODE_BACKENDS = ("xla", "pallas_gpu", "pallas_tpu")
# The "xla" decode of one layer of the stacked states (the model's scan and `commit` pass
# them), or of a lone state: on TPU and GPU, up to
# STEPS_IN_STACK_MAX_TOKENS tokens, it works on the state where it lies, reading it twice and
# writing it once (`delta_rule_steps_by_sums`: O(T^2) small vector terms). On a v5p / H100, as
# compiled at the 27B geometry (32 rows), that drops a 96 MiB copy of the layer's state per
# layer and step (on the H100, a transpose), and at T = 3 the token-serial scan's further
# state traffic (`tests/inference/test_decode_memory.py`). Elsewhere (CPU), and for more
# tokens, the state is copied out and advanced by `gated_delta_step` or the token-serial scan:
# XLA:CPU's sums over a non-minor axis made the in-stack form 2.4-14x slower there
# (benchmarks/results/2026-11-27T1220Z_cpu-in-stack-forced_decode_step.md). Neither form is
# timed on a TPU or GPU yet.
STEPS_IN_STACK_MAX_TOKENS = 8
STEPS_IN_STACK_PLATFORMS = ("tpu", "cuda", "rocm")


@contextlib.contextmanager
def auto_backend(name: str) -> Iterator[None]:
    """Within the block (at trace time), backend="auto" means `name`: e.g. to run the whole
    model on an interpreted Pallas backend in tests, or to pin one in a benchmark."""
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown gated delta rule backend {name!r}; valid: {', '.join(_BACKENDS)}"
        )
    with _pins.pushed(name):
        yield


def _resolve(backend: str, head_dims: tuple[int, int]) -> str:
    if backend != "auto":
        return backend
    if _pins.top():
        return _pins.top()
    name = _AUTO.get(jax.default_backend(), "chunked")
    if name == "pallas_gpu" and max(head_dims) > PALLAS_GPU_MAX_HEAD_DIM:
        return "chunked"
    return name


def _check_heads(q: jax.Array, k: jax.Array, v: jax.Array, lead: tuple[int, ...]) -> None:
    """Checks q, k [*lead, Hk, dk] and v [*lead, Hv, dv] with Hv a multiple of Hk."""
    n = len(lead)
    if q.ndim != n + 2 or q.shape[:n] != lead:
        raise ValueError(f"q must have shape [{', '.join('BT'[:n])}, Hk, dk], got {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}")
    if v.ndim != n + 2 or v.shape[:n] != lead:
        raise ValueError(f"v must have shape {lead} + (Hv, dv), got {v.shape} (q is {q.shape})")
    if v.shape[-2] % q.shape[-2]:
        raise ValueError(
            f"v heads Hv={v.shape[-2]} must be a multiple of q/k heads Hk={q.shape[-2]} "
            f"(v {v.shape}, q {q.shape})"
        )


def _check_gates(g: jax.Array, beta: jax.Array, expected: tuple[int, ...], layout: str) -> None:
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != expected:
            raise ValueError(f"{name} must have shape {expected} ({layout}), got {x.shape}")


def _check_state(state: jax.Array, expected: tuple[int, ...], name: str) -> None:
    if state.shape != expected:
        raise ValueError(f"{name} must have shape {expected} ([B, Hv, dk, dv]), got {state.shape}")


def gated_delta_rule(
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
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Runs the gated delta rule over a sequence.

    Args:
      q: [B, T, Hk, dk] queries.
      k: [B, T, Hk, dk] keys.
      v: [B, T, Hv, dv] values, Hv a multiple of Hk; value head n reads q/k head n // (Hv // Hk).
      g: [B, T, Hv] log-decays (<= 0).
      beta: [B, T, Hv] write strengths in (0, 1).
      scale: query scale; defaults to dk**-0.5.
      initial_state: [B, Hv, dk, dv] state before token 0 (zeros if None); it applies to the
        row's first segment only.
      segment_ids: [B, T] ints for packed documents; the state is reset wherever the id changes
        between neighbouring tokens.
      use_qk_l2norm: l2-normalise q and k over dk (in fp32) before use.
      backend: "reference" (token-serial scan), "chunked" (UT / WY chunks, pure jnp),
        "pallas_tpu" (Pallas TPU kernels, forward and backward, interpreted off TPU),
        "pallas_gpu" (Pallas Triton kernels for the UT transform and the state pass forward
        and backward, interpreted off GPU) or "auto" ("pallas_gpu" on GPU for head dims up to
        `PALLAS_GPU_MAX_HEAD_DIM`, "chunked" elsewhere; see `auto_backend`).

    Returns:
      (out [B, T, Hv, dv] in v.dtype, final state [B, Hv, dk, dv] fp32, or
        float64 for float64 inputs).

    Raises:
      ValueError: on an unknown backend or inconsistent shapes.
    """
    name = _resolve(backend, (q.shape[-1], v.shape[-1]))
    if name not in _BACKENDS:
        valid = ", ".join(["auto", *_BACKENDS])
        raise ValueError(f"unknown gated delta rule backend {backend!r}; valid: {valid}")
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, Hk, dk], got {q.shape}")
    b, t, _, dk = q.shape
    _check_heads(q, k, v, (b, t))
    hv, dv = v.shape[2:]
    _check_gates(g, beta, (b, t, hv), "[B, T, Hv]")
    if initial_state is not None:
        _check_state(initial_state, (b, hv, dk, dv), "initial_state")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must have shape {(b, t)} ([B, T]), got {segment_ids.shape}")
    return _BACKENDS[name](
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        segment_ids=segment_ids,
        use_qk_l2norm=use_qk_l2norm,
    )


def gated_delta_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Advances the recurrent state by one token (the decode step).

    Args:
      q: [B, Hk, dk] query.
      k: [B, Hk, dk] key.
      v: [B, Hv, dv] value, Hv a multiple of Hk.
      g: [B, Hv] log-decay (<= 0).
      beta: [B, Hv] write strength in (0, 1).
      state: [B, Hv, dk, dv] fp32 state after the previous token.
      scale: query scale; defaults to dk**-0.5.
      use_qk_l2norm: l2-normalise q and k over dk (in fp32) before use.

    Returns:
      (out [B, Hv, dv] in v.dtype, new state [B, Hv, dk, dv] fp32, or
        float64 for float64 inputs).

    Raises:
      ValueError: on inconsistent shapes.
    """
    if q.ndim != 3:
        raise ValueError(f"q must have shape [B, Hk, dk], got {q.shape}")
    b, hk, dk = q.shape
    _check_heads(q, k, v, (b,))
    hv, dv = v.shape[1:]
    _check_gates(g, beta, (b, hv), "[B, Hv]")
    _check_state(state, (b, hv, dk, dv), "state")
    grp, dtype = hv // hk, compute_dtype(q, k, v, state)
    q, k = prepare_qk(q, k, scale, use_qk_l2norm)  # [B, K, E]
    out, state = delta_rule_step(
        state.astype(dtype).reshape(b, hk, grp, dk, dv),
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype).reshape(b, hk, grp, dv),
        g.astype(dtype).reshape(b, hk, grp),
        beta.astype(dtype).reshape(b, hk, grp),
    )
    return out.reshape(b, hv, dv).astype(v.dtype), state.reshape(b, hv, dk, dv)


def _steps_on_a_copy(q, k, v, g, beta, state, layer, *, scale, use_qk_l2norm):
    # The state (with `layer`: a copy of that layer's) advanced by `gated_delta_step` for one
    # token, by the token-serial scan for more; then written back into the stack.
    one = state if layer is None else jax.lax.dynamic_index_in_dim(state, layer, 0, False)
    if q.shape[1] == 1:
        token = (x[:, 0] for x in (q, k, v, g, beta))
        o, one = gated_delta_step(*token, one, scale=scale, use_qk_l2norm=use_qk_l2norm)
        o = o[:, None]
    else:
        o, one = gated_delta_rule_reference(
            q, k, v, g, beta, scale=scale, initial_state=one, use_qk_l2norm=use_qk_l2norm
        )
    if layer is None:
        return o, one
    return o, jax.lax.dynamic_update_index_in_dim(state, one.astype(state.dtype), layer, 0)


def _steps_in_stack(q, k, v, g, beta, stack, layer, *, scale, use_qk_l2norm):
    # `stack[layer]` ([L, B, N, E, H]; with `layer` None a lone state [B, N, E, H]) advanced
    # where it lies, read twice and written once: the slice keeps its leading 1 and its value
    # heads ungrouped (q and k repeated to them), because a reshape between the slice and its
    # readers makes XLA copy it out (see `delta_rule_steps_by_sums`); a lone state likewise
    # keeps its shape, so that its update can take its buffer.
    grp = v.shape[2] // q.shape[2]
    dtype = compute_dtype(q, k, v, stack)
    q, k = prepare_qk(q, k, scale, use_qk_l2norm)  # [B, T, K, E]
    q, k = (jnp.repeat(x, grp, axis=2) for x in (q, k))  # [B, T, N, E]
    lead = () if layer is None else (None,)
    tokens_first = lambda x: jnp.moveaxis(x.astype(dtype), 1, 0)[(slice(None), *lead)]
    tokens = map(tokens_first, (q, k, v, g, beta))  # [T, (1,) B, N, ...]
    if layer is None:
        o, state = delta_rule_steps_by_sums(stack.astype(dtype), *tokens)
        return jnp.moveaxis(o, 0, 1).astype(v.dtype), state.astype(stack.dtype)
    # The slice and its update pinned row-major, the stack's layout outside the step: XLA:GPU
    # otherwise lays the carried stack out E-minor for the sums, transposing every layer's
    # states into that layout and back each step. (Not the stack itself: a pinned jit output
    # cannot take a donated buffer's place. Under a mesh this runs inside `shard_map`.)
    pin = lambda x: with_layout_constraint(x, Layout(tuple(range(x.ndim))))
    one = pin(jax.lax.dynamic_slice_in_dim(stack, layer, 1, 0)).astype(dtype)  # [1, B, N, E, H]
    o, one = delta_rule_steps_by_sums(one, *tokens)
    stack = jax.lax.dynamic_update_slice_in_dim(stack, pin(one.astype(stack.dtype)), layer, 0)
    return jnp.moveaxis(o[:, 0], 0, 1).astype(v.dtype), stack  # [B, T, N, H]


def gated_delta_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    layer: jax.Array | None = None,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Advances the recurrent state by a few tokens: decoding (T = 1) and speculative
    verification (T = drafts + 1), where the state is what moves through memory.

    Args:
      q, k: [B, T, Hk, dk]; v: [B, T, Hv, dv]; g, beta: [B, T, Hv] (a token with g = beta = 0
        leaves the state unchanged: padding); state: [B, Hv, dk, dv] fp32.
      scale, use_qk_l2norm: as in `gated_delta_rule`.
      layer: with it, `state` is the layers' stacked states `[L, B, Hv, dk, dv]` and only
        `state[layer]` advances, in place: the model's scan over blocks passes its carried
        stack, so that no layer's state is copied out of it and back (a kernel cannot read a
        slice in place).
      backend: "xla" (jnp: on TPU and GPU, up to `STEPS_IN_STACK_MAX_TOKENS` tokens, the
        state, or `state[layer]` where it lies, read twice and written once for all the tokens;
        elsewhere a copy of it advanced by `gated_delta_step` for one token and the
        token-serial scan for more, read twice and written once per token), "pallas_gpu" /
        "pallas_tpu" (one kernel reading and writing the state once, in place when it is
        donated; interpreted off its platform) or "auto" (the pinned rule backend's kernel
        when it is one of those two and takes the head dims, "xla" otherwise).

    Returns:
      (out [B, T, Hv, dv] in v.dtype, new state [B, Hv, dk, dv] (with `layer`: the new stack)
        fp32, or float64 for float64 inputs on "xla").

    Raises:
      ValueError: on an unknown backend or inconsistent shapes.
    """
    if backend not in ("auto", *DECODE_BACKENDS):
        valid = ", ".join(["auto", *DECODE_BACKENDS])
        raise ValueError(f"unknown gated delta decode backend {backend!r}; valid: {valid}")
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, Hk, dk], got {q.shape}")
    b, t, _, dk = q.shape
    _check_heads(q, k, v, (b, t))
    hv, dv = v.shape[2:]
    _check_gates(g, beta, (b, t, hv), "[B, T, Hv]")
    lead = () if layer is None else state.shape[:1]
    _check_state(state, (*lead, b, hv, dk, dv), "state")
    if backend == "auto":
        pinned = _pins.top()
        backend = pinned if pinned in DECODE_BACKENDS else "xla"
        if backend == "pallas_gpu" and not decode_pallas_gpu.supports(dk, dv):
            backend = "xla"
    if backend == "xla":
        args = (q, k, v, g, beta, state, layer)
        on_a_copy = functools.partial(_steps_on_a_copy, scale=scale, use_qk_l2norm=use_qk_l2norm)
        if t > STEPS_IN_STACK_MAX_TOKENS:
            return on_a_copy(*args)
        in_stack = functools.partial(_steps_in_stack, scale=scale, use_qk_l2norm=use_qk_l2norm)
        branches = {platform: in_stack for platform in STEPS_IN_STACK_PLATFORMS}
        return jax.lax.platform_dependent(*args, default=on_a_copy, **branches)
    q, k = prepare_qk(q, k, scale, use_qk_l2norm)
    kernel = {
        "pallas_gpu": decode_pallas_gpu.gated_delta_decode_pallas_gpu,
        "pallas_tpu": decode_pallas_tpu.gated_delta_decode_pallas_tpu,
    }[backend]
    if layer is not None:
        return kernel(q, k, v, g, beta, state, layer)
    o, stack = kernel(q, k, v, g, beta, state[None], 0)  # a lone state: a stack of one
    return o, stack[0]
