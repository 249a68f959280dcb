"""Context parallelism: the sequence mixers on a time axis split over a named mesh axis.

Both functions run inside `jax.shard_map` on this device's contiguous block of T / P tokens
(shard p holds tokens [p T/P, (p+1) T/P)) and return exactly the rows a single-device call on the
whole sequence would return for that block.

Gated delta rule. Over one shard the state update is affine in the incoming state S_in
[dk, dv] (per batch row and value head): every token applies S <- A_t S + k_t beta_t v_t^T with
A_t = (I - beta_t k_t k_t^T) exp(g_t) (or A_t = 0 at a segment reset), so

    S_out = M S_in + S_local          M = A_T' ... A_1 [dk, dk], S_local = the run from zero
    o_t   = o_local_t + S_in^T c_t    c_t = (A_t ... A_1)^T q_t [dk]

Columns of the state evolve independently, so ONE kernel call over the value columns [v | 0]
from the state [0 | I] yields o_local and S_local (first dv columns) and c_t and M (last dk
columns): c_t is what the rule reads out of the identity columns. That is cheaper than the two
alternatives (rerunning with the right initial state, or a separate v = 0 pass for the carried
term): those need a second pass over all tokens after the exchange, this needs one pass of width
dv + dk and one [T, dk] x [dk, dv] product. Resets inside a shard are captured by the kernel's
own masks (the identity columns are zeroed there, so M = 0 and c_t = 0 after the reset); a reset
at the shard's first token is not seen by the local kernel (token 0 never resets), so it is
applied to S_in from the neighbouring segment ids. The all-gathered (M, S_local) of all P shards
are combined in order on every device (P small products of [dk, dk] x [dk, dv]), so each device
knows its S_in and the final state of the whole sequence.

Short conv. Token t reads inputs t - W + 1 .. t, so a shard needs only the previous shard's last
W - 1 inputs (and their segment ids): one neighbour exchange (`ppermute`) of [B, W - 1, C]. Left
to XLA's partitioner, the conv's shifted slices of a time-sharded input make it reshard the
whole activation to channel sharding and back (two all-to-alls per layer).

Attention. Keys, values and their positions / segment ids are all-gathered over the axis. Memory
per device is the full K/V plus, with "auto" at long context (T / P x T past 8192 x 8192), one key
block of [T / P, block] logits at a time: the blockwise backend, whose FlashAttention backward
keeps O(T / P) residuals and which skips the key blocks after all of a call's queries.

Under the causal mask, contiguous shards do unequal work: shard p's queries see (p + 1) T / P keys,
so the last shard does 2P / (P + 1) times the mean and everyone waits for it. The queries are
therefore computed zig-zag: cut the sequence into 2P half shards; device d attends for half shards
d and 2P - 1 - d, which see (d + 1) + (2P - d) = 2P + 1 half shards of keys on every device. Half
shard j lives on device j // 2; j and 2P - 1 - j have opposite parity, so the first halves of all
devices form one permutation onto their computing devices and the second halves another: two
`ppermute`s of [B, T / 2P, N, H] queries (with their positions and ids) there, two of the outputs
back. At the 27B's 24 query and 4 KV heads that is 6 / P of the K/V all-gather's bytes (a fifth
at P = 32), against the slowest device's attention work dropping from 4P - 1 to 2P + 1 (query
half shard x key half shard) blocks, nearly half. The skip that realises the balance happens at
run time (`lax.cond` per key block), so it needs positions in shard order, as the model's are;
other positions stay correct, only unbalanced.
"""

import jax
import jax.numpy as jnp

from qwenjax.kernels.attention import attention
from qwenjax.kernels.causal_conv import causal_conv1d
from qwenjax.kernels.gated_delta_rule import gated_delta_rule
from qwenjax.kernels.gated_delta_rule.reference import compute_dtype

_HIGHEST = jax.lax.Precision.HIGHEST


def _incoming_states(
    transitions: jax.Array, local_states: jax.Array, keep: jax.Array, initial: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Prefix-combines per-shard affine maps S -> M_p S + S_p in shard order.

    Args:
      transitions: [P, B, Hv, dk, dk] M_p.
      local_states: [P, B, Hv, dk, dv] S_p (each shard's run from zero state).
      keep: [P, B] whether shard p's first token continues the previous shard's last segment.
      initial: [B, Hv, dk, dv] state before token 0 of the whole sequence.

    Returns:
      (incoming [P, B, Hv, dk, dv] state entering each shard, final [B, Hv, dk, dv]).
    """

    def step(state, xs):
        m, s, keep_p = xs
        state = jnp.where(keep_p[:, None, None, None], state, 0.0)  # reset at the boundary
        out = jnp.einsum("bnij,bnjh->bnih", m, state, precision=_HIGHEST) + s
        return out, state

    final, incoming = jax.lax.scan(step, initial, (transitions, local_states, keep))
    return incoming, final


def gated_delta_rule_context_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    axis_name: str,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    use_qk_l2norm: bool = True,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """`gated_delta_rule` on this device's time shard, with the state carried across shards.

    Arguments are those of `gated_delta_rule` on the local block (q, k [B, T/P, Hk, dk], v
    [B, T/P, Hv, dv], g, beta [B, T/P, Hv], segment_ids [B, T/P]) plus `axis_name`, the mesh axis
    the time axis is split over. `initial_state` [B, Hv, dk, dv] is the state before the whole
    sequence and must be the same on every device of the axis.

    Returns:
      (out [B, T/P, Hv, dv] in v.dtype: this shard's rows of the full-sequence output,
       final state [B, Hv, dk, dv] after the whole sequence, identical on every device).
    """
    b, t, _, dk = q.shape
    hv, dv = v.shape[2:]
    dtype = compute_dtype(q, k, v)
    # Value columns [v | 0] from state [0 | I]: the last dk columns follow the transition.
    v_ext = jnp.concatenate([v.astype(dtype), jnp.zeros((b, t, hv, dk), dtype)], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=dtype), (b, hv, dk, dk))
    s_ext = jnp.concatenate([jnp.zeros((b, hv, dk, dv), dtype), eye], axis=-1)
    o_ext, s_ext = gated_delta_rule(
        q,
        k,
        v_ext,
        g,
        beta,
        scale=scale,
        initial_state=s_ext,
        segment_ids=segment_ids,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
    )
    o_local, carried = o_ext[..., :dv], o_ext[..., dv:]  # [B, T, Hv, dv], [B, T, Hv, dk]
    s_local, transition = s_ext[..., :dv], s_ext[..., dv:]  # [B, Hv, dk, dv], [B, Hv, dk, dk]

    def gather(x):
        return jax.lax.all_gather(x, axis_name)  # [P, ...] in shard order

    if segment_ids is None:
        keep = jnp.ones((jax.lax.axis_size(axis_name), b), bool)
    else:
        first, last = gather(segment_ids[:, 0]), gather(segment_ids[:, -1])  # [P, B]
        # Shard 0 always keeps: the initial state belongs to the sequence's first segment.
        keep = jnp.concatenate([jnp.ones((1, b), bool), first[1:] == last[:-1]], axis=0)
    if initial_state is None:
        initial = jnp.zeros((b, hv, dk, dv), dtype)
    else:
        initial = initial_state.astype(dtype)
    incoming, final = _incoming_states(gather(transition), gather(s_local), keep, initial)
    s_in = incoming[jax.lax.axis_index(axis_name)]  # [B, Hv, dk, dv]
    out = o_local + jnp.einsum("btne,bneh->btnh", carried, s_in, precision=_HIGHEST)
    return out.astype(v.dtype), final


def attention_context_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> jax.Array:
    """`attention` of this device's queries over the keys of every device on `axis_name`.

    Args are those of `attention` on the local blocks: q [B, T/P, N, H], k, v [B, S/P, K, H],
    positions and segment ids [B, T/P] / [B, S/P]; the kv blocks are concatenated in axis order.

    Returns:
      [B, T/P, N, H]: this shard's rows of full attention.
    """

    def gather(x):
        return None if x is None else jax.lax.all_gather(x, axis_name, axis=1, tiled=True)

    keys = {
        "k": gather(k),  # [B, S, K, H]
        "v": gather(v),
        "kv_positions": gather(kv_positions),  # [B, S]
        "kv_segment_ids": gather(kv_segment_ids),
    }

    def attend(q, q_positions, q_segment_ids):  # [B, T', N, H] over all keys
        return attention(
            q,
            q_positions=q_positions,
            q_segment_ids=q_segment_ids,
            causal=causal,
            scale=scale,
            backend=backend,
            **keys,
        )

    shards = jax.lax.axis_size(axis_name)
    if not causal or shards == 1 or q.shape[1] < 2:
        return attend(q, q_positions, q_segment_ids)
    half = (q.shape[1] + 1) // 2  # an odd shard: the first halves are a token longer
    outs = []
    for part, perm in zip(
        (slice(0, half), slice(half, None)), zigzag_permutations(shards), strict=True
    ):
        moved = [
            None if x is None else jax.lax.ppermute(x[:, part], axis_name, perm)
            for x in (q, q_positions, q_segment_ids)
        ]
        back = [(dst, src) for src, dst in perm]
        outs.append(jax.lax.ppermute(attend(*moved), axis_name, back))
    return jnp.concatenate(outs, axis=1)


def zigzag_permutations(shards: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """`ppermute` pairs (source, destination) sending every device's first, then second, half
    shard j (= 2 source + 0 or 1) to the device that computes it: j, or 2P - 1 - j past P."""

    def computed_on(j):
        return j if j < shards else 2 * shards - 1 - j

    return tuple([(s, computed_on(2 * s + i)) for s in range(shards)] for i in (0, 1))


def causal_conv1d_context_parallel(
    x: jax.Array,
    weight: jax.Array,
    *,
    axis_name: str | tuple[str, ...],
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """`causal_conv1d(...)[0]` of this device's tokens `x [B, T/P, C]` (segment ids `[B, T/P]`),
    with the previous shard's last W - 1 inputs as its state (zeros on shard 0)."""
    halo = weight.shape[0] - 1
    if x.shape[1] < halo:
        raise ValueError(f"{x.shape[1]} tokens per shard is fewer than the conv's {halo} taps back")
    shards = jax.lax.axis_size(axis_name)
    to_next = [(p, p + 1) for p in range(shards - 1)]  # shard 0 receives zeros

    def from_previous(a):
        return jax.lax.ppermute(a[:, a.shape[1] - halo :], axis_name, to_next)

    state_segments = None if segment_ids is None else from_previous(segment_ids)
    y, _ = causal_conv1d(
        x,
        weight,
        segment_ids=segment_ids,
        state=from_previous(x),
        state_segment_ids=state_segments,
    )
    return y
