"""Gated DeltaNet (the linear-attention layers).

    m = x @ W_qkv                          flat channels [q (K·E) | k (K·E) | v (N·H)]
    q, k, v = split(silu(causal_conv(m)))  depthwise, width W, restarts at document boundaries
    z = x @ W_z;  β = sigmoid(x @ W_b);  g = −exp(A_log) · softplus(x @ W_a + dt_bias)
    o = gated_delta_rule(l2norm(q)/√E, l2norm(k), v, g, β)   value head n reads key head n // (N/K)
    out = GatedRMSNorm(o, z) @ W_out

Letters: K key heads, N value heads, E key dim, H value dim, C conv channels, W conv width.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import ModelConfig
from qwenjax.kernels.causal_conv import causal_conv1d
from qwenjax.kernels.context_parallel import (
    causal_conv1d_context_parallel,
    gated_delta_rule_context_parallel,
)
from qwenjax.kernels.gated_delta_rule import gated_delta_decode, gated_delta_rule
from qwenjax.model.cache import CONV_STATE, GDN_STATE, DeltaNetCache, read_rows
from qwenjax.model.context import Context
from qwenjax.model.norms import GatedRMSNorm, upcast
from qwenjax.model.params import LoRAConfig, dense, lora, normal_002, ones, param

# Logical names of the delta rule's operands: rows and heads split, time and head dims whole.
QK = (ax.BATCH, None, ax.GDN_K_HEADS, None)  # [B, T, K, E]
V = (ax.BATCH, None, ax.GDN_V_HEADS, None)  # [B, T, N, H]
G = (ax.BATCH, None, ax.GDN_V_HEADS)  # [B, T, N]
STATE = GDN_STATE  # [B, N, E, H]

# Below this many new tokens, extending a cache runs the token-serial rule (draft verification);
# the chunked form pads to whole 64-token chunks.
CHUNKED_MIN_TOKENS = 64


def a_log_init(key: jax.Array, shape, dtype) -> jax.Array:
    """HF's `A_log = log(U(0.01, 16))`: per-head decay rates spread over two decades."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.01, 16.0)).astype(dtype)


class GatedDeltaNet(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype,
        param_dtype,
        lora_config: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        d, c = config.hidden_size, config.conv_dim
        n, h = config.linear_num_value_heads, config.linear_value_head_dim
        self.config = config
        self.dtype = dtype
        self.in_proj_qkv = param(rngs, normal_002, (d, c), (ax.EMBED, ax.GDN_CHANNELS), param_dtype)  # fmt: skip
        # 2-D, as attention's q/k/v projections are (see there).
        self.in_proj_z = param(rngs, normal_002, (d, n * h), (ax.EMBED, ax.GDN_V_HEADS), param_dtype, units=(None, n))  # fmt: skip
        self.in_proj_b = param(rngs, normal_002, (d, n), (ax.EMBED, ax.GDN_V_HEADS), param_dtype)
        self.in_proj_a = param(rngs, normal_002, (d, n), (ax.EMBED, ax.GDN_V_HEADS), param_dtype)
        self.conv1d = param(rngs, normal_002, (config.linear_conv_kernel_dim, c), (ax.CONV_WIDTH, ax.GDN_CHANNELS), param_dtype)  # fmt: skip
        self.A_log = param(rngs, a_log_init, (n,), (ax.GDN_V_HEADS,), param_dtype)
        self.dt_bias = param(rngs, ones, (n,), (ax.GDN_V_HEADS,), param_dtype)
        self.norm = GatedRMSNorm(h, config.rms_norm_eps, dtype=param_dtype, rngs=rngs)
        self.out_proj = param(rngs, normal_002, (n, h, d), (ax.GDN_V_HEADS, None, ax.EMBED), param_dtype)  # fmt: skip
        # b and a project to one scalar per head: too small to be worth adapting.
        self.in_proj_qkv_lora = lora(self.in_proj_qkv, 1, lora_config, rngs)
        self.in_proj_z_lora = lora(self.in_proj_z, 1, lora_config, rngs)
        self.out_proj_lora = lora(self.out_proj, 2, lora_config, rngs)

    def _inputs(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Pre-conv channels m `[B, T, C]`, gate z `[B, T, N, H]`, β and g `[B, T, N]`."""
        cast = lambda p: p[...].astype(self.dtype)
        m = dense("btd,dc->btc", x, self.in_proj_qkv, self.in_proj_qkv_lora, self.dtype)
        z = dense("btd,dc->btc", x, self.in_proj_z, self.in_proj_z_lora, self.dtype)
        z = z.reshape(*x.shape[:2], self.config.linear_num_value_heads, -1)  # [B, T, N, H]
        beta = jax.nn.sigmoid(jnp.einsum("btd,dn->btn", x, cast(self.in_proj_b)))
        a = upcast(jnp.einsum("btd,dn->btn", x, cast(self.in_proj_a)))
        # g in fp32: a bf16 exp(A_log) times a softplus near 0 would lose the slow decays.
        g = -jnp.exp(upcast(self.A_log[...])) * jax.nn.softplus(a + upcast(self.dt_bias[...]))
        return m, z, beta, g

    def _split(self, m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Post-conv channels `[B, T, C]` → q, k `[B, T, K, E]` and v `[B, T, N, H]`."""
        cfg = self.config
        b, t, _ = m.shape
        q, k, v = jnp.split(jax.nn.silu(m), np.cumsum([cfg.linear_key_dim] * 2), axis=-1)
        q = q.reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        k = k.reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        v = v.reshape(b, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
        return q, k, v

    def _out(self, o: jax.Array, z: jax.Array, dtype) -> jax.Array:
        y = self.norm(o.astype(dtype), z)  # [B, T, N, H]
        return dense("btnh,nhd->btd", y, self.out_proj, self.out_proj_lora, self.dtype)

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        m, z, beta, g = self._inputs(x)
        m = _conv(m, self.conv1d[...].astype(self.dtype), ctx.segment_ids)
        q, k, v = self._split(m)
        o, _ = _rule(q, k, v, g, beta, ctx.segment_ids)
        return self._out(o, z, x.dtype)

    def extend(
        self, x: jax.Array, ctx: Context, cache: DeltaNetCache, layer: jax.Array | None = None
    ) -> tuple[jax.Array, DeltaNetCache, DeltaNetPending]:
        """Continue from `cache` with `x [B, T, D]`; only the first `ctx.num_valid` tokens of
        each row advance the states (β = g = 0 leaves the state as it is, exactly). With
        `layer`, `cache.state` is the scanned blocks' stacked states, of which `state[layer]`
        is this layer's: it is advanced in place and the stack returned.

        Also returns what `commit_pending` needs to redo the state update for fewer tokens.
        """
        m, z, beta, g = self._inputs(x)
        mc, _ = causal_conv1d(m, self.conv1d[...].astype(self.dtype), state=cache.conv)
        q, k, v = self._split(mc)
        pending = DeltaNetPending(m=m, k=k, v=v, g=g, beta=beta)
        if ctx.defer_gdn_state:  # verification: `commit` advances the states
            # On the jnp path, whose unused state update XLA drops: a decode kernel would write
            # the state in place, and XLA would copy the whole stack to keep the old one.
            o, _ = _advance(q, pending, cache, ctx.valid, layer, backend="xla")
            return self._out(o, z, x.dtype), cache, pending
        o, state = _advance(q, pending, cache, ctx.valid, layer)
        new = DeltaNetCache(
            conv=ax.constrain(_advance_conv(cache.conv, m, ctx.num_valid), CONV_STATE),
            state=ax.constrain(state, GDN_STATE if layer is None else (ax.LAYERS, *GDN_STATE)),
        )
        return self._out(o, z, x.dtype), new, pending


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaNetPending:
    """One extend call's per-token inputs to the state update (for speculative rollback)."""

    m: jax.Array  # [B, T, C] pre-conv channels
    k: jax.Array  # [B, T, K, E]
    v: jax.Array  # [B, T, N, H]
    g: jax.Array  # [B, T, N]
    beta: jax.Array  # [B, T, N]


def _conv(m: jax.Array, weight: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The short conv over whole packed rows; on a time-split mesh, each device's shard with
    its neighbour's last inputs (see `context_parallel`)."""
    axis = ax.context_axes()
    if axis is None:
        return causal_conv1d(m, weight, segment_ids=segment_ids)[0]
    channels = (ax.BATCH, ax.LENGTH, ax.GDN_CHANNELS)  # [B, T, C]
    names = [channels, (ax.CONV_WIDTH, ax.GDN_CHANNELS)]
    if segment_ids is None:
        fn = lambda m, w: causal_conv1d_context_parallel(m, w, axis_name=axis)
        return ax.shard_kernel(fn, (m, weight), names, channels)
    fn = lambda m, w, s: causal_conv1d_context_parallel(m, w, axis_name=axis, segment_ids=s)
    return ax.shard_kernel(fn, (m, weight, segment_ids), [*names, (ax.BATCH, ax.LENGTH)], channels)


def _rule(q, k, v, g, beta, segment_ids) -> tuple[jax.Array, jax.Array]:
    """The rule over whole packed rows from zero state (training, prefill from scratch).

    When the rules split the token axis over mesh axes, each device keeps its time shard and
    the context-parallel rule passes the state between shards; otherwise time is kept whole
    (a sequence-sharded input is all-gathered into the kernel).
    """
    axis = ax.context_axes()

    def fn(q, k, v, g, beta, seg):
        if axis is None:
            return gated_delta_rule(q, k, v, g, beta, segment_ids=seg)
        return gated_delta_rule_context_parallel(q, k, v, g, beta, axis_name=axis, segment_ids=seg)

    time = None if axis is None else ax.LENGTH
    qk = (ax.BATCH, time, ax.GDN_K_HEADS, None)  # [B, T, K, E]
    vn = (ax.BATCH, time, ax.GDN_V_HEADS, None)  # [B, T, N, H]
    gn = (ax.BATCH, time, ax.GDN_V_HEADS)  # [B, T, N]
    args = (q, k, v, g, beta, segment_ids)
    return ax.shard_kernel(fn, args, (qk, qk, vn, gn, gn, (ax.BATCH, time)), (vn, STATE))


def _rule_from(
    q, k, v, g, beta, state, layer=None, *, backend: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    # Decoding and draft verification (short T) go to the decode path, not padded chunks; a
    # prompt runs in chunks. (On CPU the token-serial scan beat one padded chunk up to T = 32,
    # 1.5-7x; neither is timed on a device.)
    if q.shape[1] < CHUNKED_MIN_TOKENS:
        return gated_delta_decode(q, k, v, g, beta, state, layer=layer, backend=backend)
    if layer is None:
        return gated_delta_rule(q, k, v, g, beta, initial_state=state)
    one = jax.lax.dynamic_index_in_dim(state, layer, 0, keepdims=False)
    o, one = gated_delta_rule(q, k, v, g, beta, initial_state=one)
    return o, jax.lax.dynamic_update_index_in_dim(state, one, layer, 0)


def _advance(
    q: jax.Array,
    p: DeltaNetPending,
    cache: DeltaNetCache,
    valid: jax.Array,
    layer: jax.Array | None = None,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Outputs `[B, T, N, H]` and the state after each row's valid tokens; with `layer`,
    `cache.state` is the stacked states of the scanned blocks and `state[layer]` advances.
    `backend`: of `gated_delta_decode`, for short T."""
    g = jnp.where(valid[..., None], p.g, 0.0)
    beta = jnp.where(valid[..., None], p.beta, 0.0)
    args = (q, p.k, p.v, g, beta, cache.state)
    rule = functools.partial(_rule_from, backend=backend)
    if layer is None:
        return ax.shard_kernel(rule, args, (QK, QK, V, G, G, STATE), (V, STATE))
    stacked = (ax.LAYERS, *STATE)  # [L, B, N, E, H]
    names = (QK, QK, V, G, G, stacked, ())
    return ax.shard_kernel(rule, (*args, layer), names, (V, stacked))


def _advance_conv(conv: jax.Array, m: jax.Array, num_valid: jax.Array) -> jax.Array:
    """The last W−1 pre-conv inputs after each row's valid tokens: `[B, W−1, C]`."""
    full = jnp.concatenate([conv, m.astype(conv.dtype)], axis=1)  # [B, W-1+T, C]
    return read_rows(full, num_valid, conv.shape[1])


def commit_pending(
    cache: DeltaNetCache, pending: DeltaNetPending, num_valid: jax.Array
) -> DeltaNetCache:
    """The scanned blocks' stacked states (`[L, ...]`, as are `pending`'s inputs) after only the
    first `num_valid[b]` tokens of an extend call (no parameters needed: the pending inputs are
    post-projection and post-conv)."""
    t = pending.g.shape[2]
    valid = jnp.arange(t)[None, :] < num_valid[:, None]

    # Block by block into the stack, as extend advances it: each update is a slice update in
    # place (over all blocks at once, XLA:GPU wrote the new stack apart and copied it back).
    # Under shard_map like the extend call: a decode kernel (Mosaic, Triton) cannot be
    # partitioned by XLA. The query is unused; the keys stand in for it.
    def advance(i, state):
        p = jax.tree.map(lambda x: x[i], pending)
        return _advance(p.k, p, dataclasses.replace(cache, state=state), valid, i)[1]

    state = jax.lax.fori_loop(0, cache.state.shape[0], advance, cache.state)
    conv = jax.vmap(_advance_conv, in_axes=(0, 0, None))(cache.conv, pending.m, num_valid)
    return DeltaNetCache(conv=conv, state=state)
