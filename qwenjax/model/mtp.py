"""Multi-token-prediction head (one block; shares the trunk's embedding and LM head).

At index i it reads the trunk's final-normed hidden state h_i and the next token x_{i+1}:

    u = [pre_fc_norm_embedding(E[x_{i+1}]) ; pre_fc_norm_hidden(h_i)] @ W_fc   embedding first
    y = DecoderLayer_full_attention(u)     own attention over MTP positions ≤ i, same rope as h_i
    return norm(y)                         → shared LM head → logits for x_{i+2}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import FULL_ATTENTION, ModelConfig
from qwenjax.model.block import DecoderLayer
from qwenjax.model.cache import KVCache
from qwenjax.model.context import Context
from qwenjax.model.norms import RMSNorm
from qwenjax.model.params import LoRAConfig, normal_002, param


class MTPHead(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype,
        param_dtype,
        lora_config: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        d, eps = config.hidden_size, config.rms_norm_eps
        norm = lambda: RMSNorm(d, eps, axis_name=ax.EMBED, dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.pre_fc_norm_embedding = norm()
        self.pre_fc_norm_hidden = norm()
        self.fc = param(rngs, normal_002, (2 * d, d), (None, ax.EMBED), param_dtype)
        self.layer = DecoderLayer(
            config,
            FULL_ATTENTION,
            dtype=dtype,
            param_dtype=param_dtype,
            lora_config=lora_config,
            rngs=rngs,
        )
        self.norm = norm()

    def _fuse(self, hidden: jax.Array, next_embeds: jax.Array) -> jax.Array:
        u = jnp.concatenate(
            [self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], axis=-1
        )  # [B, T, 2D]
        return jnp.einsum("bte,ed->btd", u, self.fc[...].astype(self.dtype))

    def __call__(self, hidden: jax.Array, next_embeds: jax.Array, ctx: Context) -> jax.Array:
        """`hidden [B, T, D]` (trunk, after its final norm), `next_embeds [B, T, D]` = E[x_{i+1}]."""
        return self.norm(self.layer(self._fuse(hidden, next_embeds), ctx))

    def extend(
        self, hidden: jax.Array, next_embeds: jax.Array, ctx: Context, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """`__call__` with the MTP layer's own KV cache (slot i holds index i's keys)."""
        y, cache, _ = self.layer.extend(self._fuse(hidden, next_embeds), ctx, cache)
        return self.norm(y), cache
