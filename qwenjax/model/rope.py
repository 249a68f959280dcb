"""Partial, interleaved multimodal RoPE (mRoPE) with optional static YaRN — pure functions.

Only the first `rotary_dim` (64 of 256) dims of each head rotate, NeoX rotate-half style: dim j
pairs with dim j + rotary_dim/2 and both use frequency j. Positions have three axes (T, H, W); for
text all three are equal and this is ordinary 1-D RoPE. Frequency j reads the H position when
`j % 3 == 1` (within the H section), the W position when `j % 3 == 2` (within the W section),
else the T position: the "THWTHW…" interleave of `mrope_section`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.config import ModelConfig


def base_inv_frequencies(dim: int, base: float) -> np.ndarray:
    """`1 / base^(2i/dim)` for i < dim/2, fp32, bit for bit as torch computes it.

    The power is taken in float64 and rounded once: numpy's float32 pow is an ulp off on AVX-512
    hosts, and one ulp of frequency is 0.03 rad at position 900K.
    """
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    power = (base ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def inv_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[rotary_dim/2]` (fp32) and the cos/sin scale (1 unless YaRN)."""
    dim, base = config.rotary_dim, config.rope_theta
    inv_freq = base_inv_frequencies(dim, base)
    yarn = config.yarn
    if yarn is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        ctx = yarn.original_max_position_embeddings
        return dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = (1 - ramp).astype(np.float32)
    inv_freq = (inv_freq / yarn.factor) * (1 - extrapolate) + inv_freq * extrapolate
    scale = yarn.attention_factor
    if scale is None:
        scale = 0.1 * math.log(yarn.factor) + 1.0 if yarn.factor > 1 else 1.0
    return inv_freq.astype(np.float32), float(scale)


def mrope_axis(config: ModelConfig) -> np.ndarray:
    """For each frequency index, which position axis (0=T, 1=H, 2=W) drives it."""
    idx = np.arange(config.rotary_dim // 2)
    _, h, w = config.mrope_section
    axis = np.zeros_like(idx)
    axis[(idx % 3 == 1) & (idx < 3 * h)] = 1
    axis[(idx % 3 == 2) & (idx < 3 * w)] = 2
    return axis


def rope_tables(
    config: ModelConfig, positions: jax.Array, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, rotary_dim]` for positions `[B, T]` (text) or `[3, B, T]` (T/H/W).

    Computed in fp32 and cast to the model dtype, as transformers does (bf16 runs rotate in bf16).
    """
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions, (3, *positions.shape))
    if positions.ndim != 3 or positions.shape[0] != 3:
        raise ValueError(f"positions must be [B, T] or [3, B, T], got shape {positions.shape}")
    inv_freq, scale = inv_frequencies(config)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, R/2]
    axis = mrope_axis(config)
    freqs = freqs[axis, :, :, np.arange(len(axis))]  # [R/2, B, T]: each index from its axis
    freqs = jnp.moveaxis(freqs, 0, -1)  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first `rotary_dim` dims of `x [B, T, N, H]`; the rest pass through."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    rotated = xr * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([rotated.astype(x.dtype), xp], axis=-1)
