"""Gated attention (the full-attention layers).

[q ; gate] = x @ Wq               per head: first H values are the query, next H the gate
q, k = q_norm(q), k_norm(x @ Wk)  zero-centred RMSNorm over H, shared by all heads
q, k = rope(q), rope(k)           first rotary_dim dims only
o = softmax(q kᵀ / √H + mask) v   GQA: query head n reads kv head n // (N / K)
out = (o ⊙ sigmoid(gate)) @ Wo
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import ModelConfig
from qwenjax.kernels.attention import attention, cache_attention
from qwenjax.kernels.context_parallel import attention_context_parallel
from qwenjax.model.cache import KV_CACHE, KVCache, write_rows
from qwenjax.model.context import Context
from qwenjax.model.norms import RMSNorm
from qwenjax.model.params import LoRAConfig, dense, lora, normal_002, param
from qwenjax.model.rope import apply_rope

# Logical names of the attention kernel's operands: rows and heads split, time and head dim whole.
Q = (ax.BATCH, None, ax.Q_HEADS, None)  # [B, T, N, H]
KV = (ax.BATCH, ax.KV_HEADS, None, None)  # [B, K, S, H] a cache
POS = (ax.BATCH, None)  # [B, T]


class GatedAttention(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype,
        param_dtype,
        lora_config: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.dtype = dtype
        self.heads = (n, k, h)  # query heads, KV heads, head dim
        # Input projections are stored 2-D, heads flattened into the output dim: TPU tiles an
        # array's two minor dims, so a `[D, N, H]` weight is relaid out for its dot.
        self.q_proj = param(rngs, normal_002, (d, n * 2 * h), (ax.EMBED, ax.Q_HEADS), param_dtype, units=(None, n))  # fmt: skip
        self.k_proj = param(rngs, normal_002, (d, k * h), (ax.EMBED, ax.KV_HEADS), param_dtype, units=(None, k))  # fmt: skip
        self.v_proj = param(rngs, normal_002, (d, k * h), (ax.EMBED, ax.KV_HEADS), param_dtype, units=(None, k))  # fmt: skip
        self.o_proj = param(rngs, normal_002, (n, h, d), (ax.Q_HEADS, ax.HEAD_DIM, ax.EMBED), param_dtype)  # fmt: skip
        self.q_proj_lora = lora(self.q_proj, 1, lora_config, rngs)
        self.k_proj_lora = lora(self.k_proj, 1, lora_config, rngs)
        self.v_proj_lora = lora(self.v_proj, 1, lora_config, rngs)
        self.o_proj_lora = lora(self.o_proj, 2, lora_config, rngs)
        self.q_norm = RMSNorm(h, config.rms_norm_eps, axis_name=ax.HEAD_DIM, dtype=param_dtype, rngs=rngs)  # fmt: skip
        self.k_norm = RMSNorm(h, config.rms_norm_eps, axis_name=ax.HEAD_DIM, dtype=param_dtype, rngs=rngs)  # fmt: skip

    def _qkv(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, ...]:
        b, t, _ = x.shape
        n, nk, h = self.heads
        proj = lambda w, adapter: dense("btd,dc->btc", x, w, adapter, self.dtype)
        qg = proj(self.q_proj, self.q_proj_lora).reshape(b, t, n, 2 * h)
        q, gate = jnp.split(qg, 2, axis=-1)  # [B, T, N, H] each
        k = proj(self.k_proj, self.k_proj_lora).reshape(b, t, nk, h)  # [B, T, K, H]
        v = proj(self.v_proj, self.v_proj_lora).reshape(b, t, nk, h)
        q = apply_rope(self.q_norm(q), ctx.cos, ctx.sin)
        k = apply_rope(self.k_norm(k), ctx.cos, ctx.sin)
        return q, gate, k, v

    def _out(self, o: jax.Array, gate: jax.Array) -> jax.Array:
        o = o * jax.nn.sigmoid(gate)
        return dense("btnh,nhd->btd", o, self.o_proj, self.o_proj_lora, self.dtype)

    def extend(
        self, x: jax.Array, ctx: Context, cache: KVCache, layer: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Tokens at cache slots `ctx.token_index` (consecutive per row): write, then attend.

        Every token's K/V is written (the cache length is the caller's bookkeeping); a query at
        slot p reads slots ≤ p, all written by earlier kept tokens or by this call. With `layer`,
        `cache` holds the scanned blocks' stacked caches `[L, B, K, S, H]`: only the new slots
        of `[layer]` are written and the stack is returned (a slice of it would be a copy of the
        layer's whole cache, and writing it back another, every decode step).
        """
        q, gate, k, v = self._qkv(x, ctx)
        start = ctx.token_index[:, 0]
        names = KV_CACHE if layer is None else (ax.LAYERS, *KV_CACHE)
        write = lambda buffer, new: ax.constrain(
            write_rows(buffer, new, start, layer, slot_axis=2), names
        )
        k, v = write(cache.k, k), write(cache.v, v)
        if layer is None:
            attend = lambda q, k, v, qp: cache_attention(q, k, v, q_positions=qp)
            args, kv = (q, k, v, ctx.token_index), KV
        else:
            attend = lambda q, k, v, qp, i: cache_attention(q, k, v, q_positions=qp, layer=i)
            args, kv = (q, k, v, ctx.token_index, layer), (ax.LAYERS, *KV)
        names = (Q, kv, kv, POS) + ((),) * (layer is not None)
        o = ax.shard_kernel(attend, args, names, Q)  # [B, T, N, H]
        return self._out(o, gate), KVCache(k=k, v=v)

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        q, gate, k, v = self._qkv(x, ctx)
        o = _self_attention(q, k, v, ctx.token_index, ctx.segment_ids)  # [B, T, N, H]
        return self._out(o, gate)


def _self_attention(q, k, v, pos, seg) -> jax.Array:
    """Causal self attention over packed rows; `pos` is arange(T) per row (Qwen35.context).

    When the rules split the token axis over mesh axes, each device keeps its queries and
    all-gathers keys and values (context parallelism); otherwise time is kept whole.
    """
    axis = ax.context_axes()

    def fn(q, k, v, pos, seg):
        if axis is None:
            return attention(
                q,
                k,
                v,
                q_positions=pos,
                kv_positions=pos,
                q_segment_ids=seg,
                kv_segment_ids=seg,
                positions_in_order=True,
            )
        return attention_context_parallel(
            q,
            k,
            v,
            axis_name=axis,
            q_positions=pos,
            kv_positions=pos,
            q_segment_ids=seg,
            kv_segment_ids=seg,
        )

    time = None if axis is None else ax.LENGTH
    qn = (ax.BATCH, time, ax.Q_HEADS, None)  # [B, T, N, H]
    kvn = (ax.BATCH, time, ax.KV_HEADS, None)  # [B, T, K, H]
    posn = (ax.BATCH, time)  # [B, T]
    return ax.shard_kernel(fn, (q, k, v, pos, seg), (qn, kvn, kvn, posn, posn), qn)
