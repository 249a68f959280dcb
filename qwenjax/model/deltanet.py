"""Gated DeltaNet (the linear-attention layers).

    m = x @ W_qkv                          flat channels [q (K·E) | k (K·E) | v (N·H)]
    q, k, v = split(silu(causal_conv(m)))  depthwise, width W, restarts at document boundaries
    z = x @ W_z;  β = sigmoid(x @ W_b);  g = −exp(A_log) · softplus(x @ W_a + dt_bias)
    o = gated_delta_rule(l2norm(q)/√E, l2norm(k), v, g, β)   value head n reads key head n // (N/K)
    out = GatedRMSNorm(o, z) @ W_out

Letters: K key heads, N value heads, E key dim, H value dim, C conv channels, W conv width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import ModelConfig
from qwenjax.kernels.causal_conv import causal_conv1d
from qwenjax.kernels.gated_delta_rule import gated_delta_rule
from qwenjax.model.context import Context
from qwenjax.model.norms import GatedRMSNorm, upcast
from qwenjax.model.params import LoRAConfig, dense, lora, normal_002, ones, param


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
        self.in_proj_z = param(rngs, normal_002, (d, n, h), (ax.EMBED, ax.GDN_V_HEADS, None), param_dtype)  # fmt: skip
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

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        cast = lambda p: p[...].astype(self.dtype)
        # m: [B, T, C]
        m = dense("btd,dc->btc", x, self.in_proj_qkv, self.in_proj_qkv_lora, self.dtype)
        m, _ = causal_conv1d(m, cast(self.conv1d), segment_ids=ctx.segment_ids)
        m = jax.nn.silu(m)
        splits = np.cumsum([cfg.linear_key_dim, cfg.linear_key_dim])
        q, k, v = jnp.split(m, splits, axis=-1)
        q = q.reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)  # [B, T, K, E]
        k = k.reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        v = v.reshape(b, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)  # [B, T, N, H]
        z = dense("btd,dnh->btnh", x, self.in_proj_z, self.in_proj_z_lora, self.dtype)
        beta = jax.nn.sigmoid(jnp.einsum("btd,dn->btn", x, cast(self.in_proj_b)))
        a = upcast(jnp.einsum("btd,dn->btn", x, cast(self.in_proj_a)))
        # g in fp32: a bf16 exp(A_log) times a softplus near 0 would lose the slow decays.
        g = -jnp.exp(upcast(self.A_log[...])) * jax.nn.softplus(a + upcast(self.dt_bias[...]))
        o, _ = gated_delta_rule(q, k, v, g, beta, segment_ids=ctx.segment_ids)
        y = self.norm(o.astype(x.dtype), z)  # [B, T, N, H]
        return dense("btnh,nhd->btd", y, self.out_proj, self.out_proj_lora, self.dtype)
