"""Causal depthwise convolution over time (the GDN short conv), segment-aware, with a state.

`y[t, c] = Σ_j w[j, c] · x[t − (W−1) + j, c]`, taps that reach into another document (or before
the sequence) read zero — or, at the start of the sequence, the carried state of the previous
call's last W−1 inputs, which is how decoding continues a prefill.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_conv1d(
    x: jax.Array,
    weight: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    state: jax.Array | None = None,
    state_segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal conv.

    Args:
      x: `[B, T, C]` inputs.
      weight: `[W, C]`; tap W−1 multiplies the current token.
      segment_ids: `[B, T]`; a tap never crosses a document boundary. The carried state belongs
        to the first token's document.
      state: `[B, W−1, C]` the inputs before `x` (zeros when None).
      state_segment_ids: `[B, W−1]` the documents of the state's inputs (a context-parallel
        shard's halo); by default they belong to the first token's document.

    Returns:
      `(y [B, T, C], new_state [B, W−1, C])`, y in the dtype of x (fp32 accumulation).
    """
    width = weight.shape[0]
    b, t, c = x.shape
    if weight.shape[1] != c:
        raise ValueError(f"conv weight {weight.shape} does not match {c} channels of x {x.shape}")
    if state is None:
        state = jnp.zeros((b, width - 1, c), x.dtype)
    full = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    if segment_ids is not None:
        if state_segment_ids is None:
            state_segment_ids = jnp.repeat(segment_ids[:, :1], width - 1, axis=1)
        seg = jnp.concatenate([state_segment_ids, segment_ids], axis=1)
    acc = jnp.promote_types(x.dtype, jnp.float32)  # accumulate like a conv kernel, round once
    y = jnp.zeros((b, t, c), acc)
    for j in range(width):
        tap = full[:, j : j + t].astype(acc) * weight[j].astype(acc)
        if segment_ids is not None:
            tap = jnp.where((seg[:, j : j + t] == segment_ids)[..., None], tap, 0)
        y = y + tap
    return y.astype(x.dtype), full[:, t:]
