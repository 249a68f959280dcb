"""Token-serial gated delta rule: the readable JAX oracle.

Per batch row and value head, with a fp32 state S of shape [dk, dv] (FLA
`naive_recurrent_gated_delta_rule` semantics, state laid out key-major):

    S   <- 0                         if token t starts a new packed segment
    S   <- exp(g_t) * S              g_t <= 0 is a log-decay
    u   =  S^T k_t                   [dv]
    d   =  beta_t * (v_t - u)        delta-rule correction
    S   <- S + k_t (x) d             outer product, [dk, dv]
    o_t =  S^T q_t                   read after the update

q and k are optionally l2-normalised over dk (eps 1e-6 inside the rsqrt), then q is scaled by
`scale` (default dk**-0.5). Value head n reads query/key head n // G with G = Hv // Hk.

Einsum letters: B batch, T tokens, K key heads, G value heads per key head, E key dim, H value dim.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
L2NORM_EPS = 1e-6


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """fp32, or float64 when an input already is: bf16/fp16 inputs are upcast, never downcast.

    Float64 exists for tests (under `jax.enable_x64`), where it checks the algebra exactly.
    """
    return jnp.result_type(jnp.float32, *(x.dtype for x in arrays))


def inverse_l2_norm(x: jax.Array) -> jax.Array:
    """1 / |x| over the last axis (eps-guarded), in at least fp32: `[..., d]` -> `[...]`."""
    x = x.astype(compute_dtype(x))
    return jax.lax.rsqrt(jnp.sum(x * x, axis=-1) + L2NORM_EPS)


def l2_normalize(x: jax.Array) -> jax.Array:
    """Normalises the last axis to unit l2 norm in at least fp32, as FLA's `l2norm` does."""
    return x.astype(compute_dtype(x)) * inverse_l2_norm(x)[..., None]


def prepare_qk(
    q: jax.Array, k: jax.Array, scale: float | None, use_qk_l2norm: bool
) -> tuple[jax.Array, jax.Array]:
    """Upcasts q, k, optionally l2-normalises them and scales q (default dk**-0.5)."""
    dtype = compute_dtype(q, k)
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return q.astype(dtype) * scale, k.astype(dtype)


def delta_rule_step(
    state: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One recurrent step on grouped heads; inputs upcast, q already normalised and scaled.

    Args:
      state: [B, K, G, E, H] state before the token.
      q: [B, K, E] query (shared by the G value heads of each key head).
      k: [B, K, E] key.
      v: [B, K, G, H] value.
      g: [B, K, G] log-decay.
      beta: [B, K, G] write strength.

    Returns:
      (o [B, K, G, H], new state [B, K, G, E, H]).
    """
    # The equations rearranged so that S is read twice and written once (decoding is bound by
    # the state's memory traffic; the literal order reads it four times and writes it twice):
    #   a = exp(g);  S^T k and S^T q in one pass;  d = beta (v - a S^T k)
    #   o = S'^T q = a S^T q + (q . k) d;          S' = a S + k (x) d
    a = jnp.exp(g)[..., None]  # [B, K, G, 1]
    sk, sq = jnp.einsum("bkgeh,rbke->rbkgh", state, jnp.stack([k, q]), precision=_HIGHEST)
    delta = beta[..., None] * (v - a * sk)  # [B, K, G, H]
    o = a * sq + jnp.sum(q * k, axis=-1)[:, :, None, None] * delta
    state = a[..., None] * state + k[:, :, None, :, None] * delta[:, :, :, None, :]
    return o, state


def delta_rule_steps_by_sums(state: jax.Array, *tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A few recurrent steps (decoding, draft verification) that read the state twice and
    write it once in all, with no dot on it; inputs upcast, q already normalised and scaled.

    Args:
      state: [..., E, H] state before the first token (any leading dims, e.g. [1, B, N]).
      tokens: q, k [T, ..., E] (one query and key per value head), v [T, ..., H], g and beta
        [T, ...].

    Returns:
      (o [T, ..., H], state after the last token [..., E, H]).

    With c_t = sum_{s<=t} g_s, the tokens' corrections d_t (what `delta_rule_step` adds) are
      d_t = beta_t (v_t - e^{c_t} S^T k_t - sum_{s<t} e^{c_t - c_s} (k_t . k_s) d_s),
      o_t = e^{c_t} S^T q_t + sum_{s<=t} e^{c_t - c_s} (q_t . k_s) d_s,
      S'  = e^{c_T} S + sum_s e^{c_T - c_s} k_s (x) d_s:
    S enters only through the sums S^T k_t, S^T q_t and the final update. They are elementwise
    products summed over E because XLA:TPU fuses a slice of the layers' stacked states into
    such sums (and into the in-place update) but not into a dot, whose operand it copies out
    first (96 MiB per layer and step at 32 rows of the 27B); one sum per vector, since
    broadcasting the state against a stack of them made XLA reshape, so copy, the slice.
    O(T^2) small vector terms: for short T only.
    """
    q, k, v, g, beta = tokens
    t_len = q.shape[0]
    c = jnp.cumsum(g, axis=0)  # [T, ...]
    decay = lambda t, s: jnp.exp(c[t] - c[s])[..., None]  # [..., 1]
    dot = lambda x, y: jnp.sum(x * y, axis=-1)[..., None]  # [..., 1]
    sk = [jnp.sum(state * k[t][..., None], axis=-2) for t in range(t_len)]  # [..., H]
    sq = [jnp.sum(state * q[t][..., None], axis=-2) for t in range(t_len)]
    d, o = [], []
    for t in range(t_len):
        r = v[t] - jnp.exp(c[t])[..., None] * sk[t]
        for s in range(t):
            r = r - decay(t, s) * dot(k[t], k[s]) * d[s]
        d.append(beta[t][..., None] * r)
        o_t = jnp.exp(c[t])[..., None] * sq[t]
        for s in range(t + 1):
            o_t = o_t + decay(t, s) * dot(q[t], k[s]) * d[s]
        o.append(o_t)
    last = t_len - 1
    state = jnp.exp(c[last])[..., None, None] * state
    for s in range(t_len):
        state = state + (decay(last, s) * k[s])[..., :, None] * d[s][..., None, :]
    return jnp.stack(o), state


def gated_delta_rule_reference(
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
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule, one `lax.scan` step per token.

    Arguments and results are those of `api.gated_delta_rule` (shapes, dtypes, the
    optional initial state and segment ids).
    """
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    grp = hv // hk
    dtype = compute_dtype(q, k, v)
    q, k = prepare_qk(q, k, scale, use_qk_l2norm)  # [B, T, K, E]
    v32 = v.astype(dtype).reshape(b, t, hk, grp, dv)  # [B, T, K, G, H]
    g32 = g.astype(dtype).reshape(b, t, hk, grp)  # [B, T, K, G]
    beta32 = beta.astype(dtype).reshape(b, t, hk, grp)
    if initial_state is None:
        state = jnp.zeros((b, hk, grp, dk, dv), dtype)
    else:
        state = initial_state.astype(dtype).reshape(b, hk, grp, dk, dv)
    if segment_ids is None:
        reset = jnp.zeros((b, t), bool)
    else:
        # Token 0 never resets: the initial state belongs to the row's first segment.
        reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))

    def step(state, xs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = xs
        state = jnp.where(reset_t[:, None, None, None, None], 0.0, state)
        o_t, state = delta_rule_step(state, q_t, k_t, v_t, g_t, beta_t)
        return state, o_t

    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (q, k, v32, g32, beta32, reset))
    state, out = jax.lax.scan(step, state, xs)  # out: [T, B, K, G, H]
    out = jnp.moveaxis(out, 0, 1).reshape(b, t, hv, dv).astype(v.dtype)
    return out, state.reshape(b, hv, dk, dv)
