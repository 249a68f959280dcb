"""SwiGLU feed-forward: `down(silu(x @ Wg) ⊙ (x @ Wu))`."""

from __future__ import annotations

import jax
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import ModelConfig
from qwenjax.model.params import LoRAConfig, dense, lora, normal_002, param


class MLP(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype,
        param_dtype,
        lora_config: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        d, f = config.hidden_size, config.intermediate_size
        self.dtype = dtype
        self.gate_proj = param(rngs, normal_002, (d, f), (ax.EMBED, ax.MLP), param_dtype)
        self.up_proj = param(rngs, normal_002, (d, f), (ax.EMBED, ax.MLP), param_dtype)
        self.down_proj = param(rngs, normal_002, (f, d), (ax.MLP, ax.EMBED), param_dtype)
        self.gate_proj_lora = lora(self.gate_proj, 1, lora_config, rngs)
        self.up_proj_lora = lora(self.up_proj, 1, lora_config, rngs)
        self.down_proj_lora = lora(self.down_proj, 1, lora_config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = dense("btd,df->btf", x, self.gate_proj, self.gate_proj_lora, self.dtype)
        up = dense("btd,df->btf", x, self.up_proj, self.up_proj_lora, self.dtype)
        h = jax.nn.silu(gate) * up  # [B, T, F]
        return dense("btf,fd->btd", h, self.down_proj, self.down_proj_lora, self.dtype)
