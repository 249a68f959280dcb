"""Float64 NumPy oracle for the MTP head (§4.1 of ARCHITECTURE.md), on HF-named tensors.

Written from the spec, independently of `qwenjax.model`: it reads the published tensor layout
(`mtp.fc.weight [D, 2D]`, `q_proj` rows per head `[q ; gate]`, …) directly.
"""

import numpy as np


def rms_norm(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def rope(x, positions, rotary_dim, theta):
    """Rotate-half RoPE on the first `rotary_dim` dims of x `[T, N, H]` (text: 1-D positions)."""
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    f = positions[:, None] * inv  # [T, R/2]
    cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rot = np.concatenate([-xr[..., half:], xr[..., :half]], -1)
    return np.concatenate([xr * cos[:, None] + rot * sin[:, None], xp], -1)


def gated_attention(x, t, prefix, n_heads, n_kv, head_dim, rotary_dim, theta, positions):
    """One sequence `x [T, D]`, causal."""
    seq = x.shape[0]
    p = x @ t[prefix + "q_proj.weight"].T  # [T, N * 2H]
    p = p.reshape(seq, n_heads, 2, head_dim)
    q, gate = p[:, :, 0], p[:, :, 1]
    k = (x @ t[prefix + "k_proj.weight"].T).reshape(seq, n_kv, head_dim)
    v = (x @ t[prefix + "v_proj.weight"].T).reshape(seq, n_kv, head_dim)
    q = rope(rms_norm(q, t[prefix + "q_norm.weight"]), positions, rotary_dim, theta)
    k = rope(rms_norm(k, t[prefix + "k_norm.weight"]), positions, rotary_dim, theta)
    out = np.zeros((seq, n_heads, head_dim))
    group = n_heads // n_kv
    for h in range(n_heads):
        s = q[:, h] @ k[:, h // group].T / np.sqrt(head_dim)
        s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (pr / pr.sum(-1, keepdims=True)) @ v[:, h // group]
    out = out * (1 / (1 + np.exp(-gate)))
    return out.reshape(seq, -1) @ t[prefix + "o_proj.weight"].T


def mtp_logits(hidden, next_ids, t, embed, lm_head, cfg, positions):
    """Logits `[T, V]` of the MTP head for one sequence.

    hidden: `[T, D]` trunk hidden states after the final norm; next_ids: `[T]` tokens x_{i+1}.
    """
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    e = rms_norm(np.asarray(embed, np.float64)[next_ids], t["mtp.pre_fc_norm_embedding.weight"])
    h = rms_norm(np.asarray(hidden, np.float64), t["mtp.pre_fc_norm_hidden.weight"])
    u = np.concatenate([e, h], -1) @ t["mtp.fc.weight"].T
    pre = "mtp.layers.0."
    a = gated_attention(
        rms_norm(u, t[pre + "input_layernorm.weight"]),
        t,
        pre + "self_attn.",
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.rotary_dim,
        cfg.rope_theta,
        np.asarray(positions, np.float64),
    )
    y = u + a
    z = rms_norm(y, t[pre + "post_attention_layernorm.weight"])
    gate, up = z @ t[pre + "mlp.gate_proj.weight"].T, z @ t[pre + "mlp.up_proj.weight"].T
    y = y + (gate / (1 + np.exp(-gate)) * up) @ t[pre + "mlp.down_proj.weight"].T
    return rms_norm(y, t["mtp.norm.weight"]) @ np.asarray(lm_head, np.float64).T
