"""Decoder layer (pre-norm mixer + pre-norm SwiGLU) and the hybrid super-block that is scanned.

x = x + mixer(input_layernorm(x))          mixer: Gated DeltaNet or gated attention
x = x + mlp(post_attention_layernorm(x))
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import FULL_ATTENTION, ModelConfig
from qwenjax.model.attention import GatedAttention
from qwenjax.model.cache import LayerCache
from qwenjax.model.context import Context
from qwenjax.model.deltanet import GatedDeltaNet
from qwenjax.model.mlp import MLP
from qwenjax.model.norms import RMSNorm
from qwenjax.model.params import LoRAConfig


class DecoderLayer(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_type: str,
        *,
        dtype,
        param_dtype,
        lora_config: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_config=lora_config, rngs=rngs)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, axis_name=ax.EMBED, dtype=param_dtype, rngs=rngs)
        mixer = GatedAttention if layer_type == FULL_ATTENTION else GatedDeltaNet
        self.mixer = mixer(config, **kw)
        self.post_attention_layernorm = RMSNorm(d, eps, axis_name=ax.EMBED, dtype=param_dtype, rngs=rngs)  # fmt: skip
        self.mlp = MLP(config, **kw)

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        x = x + self.mixer(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def extend(
        self, x: jax.Array, ctx: Context, cache: LayerCache, layer: jax.Array | None = None
    ) -> tuple[jax.Array, Any, Any]:
        """`__call__` continuing from `cache`: (x, new cache, pending GDN inputs or None).
        `layer`: the cache holds the scanned blocks' stacks (see `Qwen35.extend_embedded`)."""
        out = self.mixer.extend(self.input_layernorm(x), ctx, cache, layer)
        y, cache, pending = out if len(out) == 3 else (*out, None)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), cache, pending


class HybridBlock(nnx.Module):
    """One period of `layer_types` (3 × GDN then 1 × attention for Qwen3.5/3.6): the scan unit."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, **kw):
        # kw: dtype, param_dtype, lora_config, as for DecoderLayer
        layers = [DecoderLayer(config, t, rngs=rngs, **kw) for t in config.block_pattern]
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array, ctx: Context, *, remat_layers: bool = False) -> jax.Array:
        """`remat_layers`: checkpoint each layer on its own (the "layers" remat policy)."""
        for layer in self.layers:
            x = _checkpointed(layer, x, ctx) if remat_layers else layer(x, ctx)
        return x

    def extend(
        self, x: jax.Array, ctx: Context, caches: tuple, index: jax.Array | None = None
    ) -> tuple[jax.Array, tuple, tuple]:
        """`index`: this block's position in the scan; the Gated DeltaNet caches in `caches`
        then hold the stacked states of all blocks (see `Qwen35.extend_embedded`)."""
        new, pending = [], []
        for layer, cache in zip(self.layers, caches, strict=True):
            x, cache, p = layer.extend(x, ctx, cache, index)
            new.append(cache)
            pending.append(p)
        return x, tuple(new), tuple(pending)


def _checkpointed(layer: DecoderLayer, x: jax.Array, ctx: Context) -> jax.Array:
    """`layer(x, ctx)` keeping only its input for the backward pass."""
    graphdef, state = nnx.split(layer)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, ctx)

    return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(state, x)
