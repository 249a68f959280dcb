"""Readable cross-entropy: all `[B, T, V]` logits at once (the oracle for the chunked form)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_reference(
    hidden: jax.Array, weight: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(Σ mask · −log softmax(hidden @ weight)[target], Σ mask)`; see `api.cross_entropy`."""
    logits = jnp.einsum("btd,dv->btv", hidden, weight, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V] fp32
    # Masked-out targets may be anything (padding); read a valid index there instead.
    safe = jnp.where(mask != 0, targets, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(jnp.where(mask != 0, nll, 0.0)), jnp.sum(mask != 0, dtype=jnp.int32)
