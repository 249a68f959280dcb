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
    num_valid: `[B]` when extending a cache: the first `num_valid[b]` tokens of row b are real and
      go into its state; the rest (padding, drafts awaiting verification) leave the GDN and conv
      states untouched. token_index is then each token's cache slot.
    defer_gdn_state: (static) the extend call is a speculative verification whose GDN states
      `commit` computes afterwards for the kept tokens: the GDN layers only read their states
      for the outputs and return them as they were (see `Qwen35.extend(keep_pending=True)`).
    """

    cos: jax.Array
    sin: jax.Array
    token_index: jax.Array
    segment_ids: jax.Array
    num_valid: jax.Array | None = None
    defer_gdn_state: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def valid(self) -> jax.Array:
        """`[B, T]` bool: token t of row b is one of its `num_valid[b]` real tokens."""
        t = self.token_index.shape[1]
        return jax.numpy.arange(t)[None, :] < self.num_valid[:, None]
