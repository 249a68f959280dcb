"""Per-forward inputs every mixer may read: rotary tables, token positions and document ids."""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
    """What the layers share within one forward pass.

    cos, sin: `[B, T, rotary_dim]` rotary tables (from the 3-axis positions).
    token_index: `[B, T]` index of each token in its row, used by the causal rule (rope positions
      may repeat, e.g. for image tokens, so they cannot order the tokens).
    segment_ids: `[B, T]` document ids of packed rows; attention stays inside a document and the
      GDN state and conv restart at each boundary.
    """

    cos: jax.Array
    sin: jax.Array
    token_index: jax.Array
    segment_ids: jax.Array
