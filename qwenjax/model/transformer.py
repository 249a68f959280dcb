"""The Qwen3.5 / Qwen3.6 hybrid text model.

    h = E[input_ids]
    h = scan(HybridBlock, h) over num_blocks stacked super-blocks   (16 × [3 GDN + 1 attention])
    h = norm(h)                      → `hidden()` returns this
    logits = h @ W_lm                → `logits()`; `__call__` = both
    mtp(h, E[x_{i+1}]) → norm        → `mtp_hidden()`, read out through the same LM head

The stacked blocks are applied with `lax.scan`, so compile time does not grow with depth; each
block is rematerialised in the backward pass as `remat` says (see `REMAT_POLICIES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import ModelConfig
from qwenjax.model.block import HybridBlock
from qwenjax.model.cache import Cache, DeltaNetCache, KVCache, LayerCache, rope_positions
from qwenjax.model.context import Context
from qwenjax.model.mtp import MTPHead
from qwenjax.model.norms import RMSNorm
from qwenjax.model.params import LoRAConfig, normal_002, param
from qwenjax.model.rope import rope_tables

# What the backward pass keeps of each scanned block's forward (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,  # keep everything: fastest, most memory; no checkpoint at all
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    # keep matmul outputs in host memory (HBM-bound runs; costs PCIe/DMA bandwidth)
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    # "full", and inside the block's recompute each layer again keeps only its input, so the
    # backward holds one layer's intermediates instead of the block's four, for one more
    # forward pass (long context: the GDN layers' chunk states and UT tensors)
    "layers": jax.checkpoint_policies.nothing_saveable,
}


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` positions that restart at 0 at every document boundary."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _block_view(stacked: LayerCache, i: jax.Array) -> LayerCache:
    """What block i's layer gets of a stacked cache: the stacks themselves, which the layers
    index in place, except a Gated DeltaNet conv state (a few tokens a row), sliced."""
    if isinstance(stacked, DeltaNetCache):
        return DeltaNetCache(conv=stacked.conv[i], state=stacked.state)
    return stacked


def _block_put(stacked: LayerCache, new: LayerCache, i: jax.Array) -> LayerCache:
    """`stacked` after block i's layer returned `new` (`_block_view`'s inverse)."""
    if isinstance(stacked, DeltaNetCache):
        conv = jax.lax.dynamic_update_index_in_dim(stacked.conv, new.conv, i, 0)
        return DeltaNetCache(conv=conv, state=new.state)
    return new


class Qwen35(nnx.Module):
    """Text model. `model(input_ids)` → logits `[B, T, vocab]`."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        lora_config: LoRAConfig | None = None,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}"
            )
        param_dtype = dtype if param_dtype is None else param_dtype
        d, v = config.hidden_size, config.vocab_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_config=lora_config)
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = param(rngs, normal_002, (v, d), (ax.VOCAB, ax.EMBED), param_dtype)

        @nnx.split_rngs(splits=config.num_blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
        def make_blocks(rngs: nnx.Rngs) -> HybridBlock:
            return HybridBlock(config, rngs=rngs, **kw)

        self.blocks = make_blocks(rngs)
        self.norm = RMSNorm(d, config.rms_norm_eps, axis_name=ax.EMBED, dtype=param_dtype, rngs=rngs)  # fmt: skip
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else param(rngs, normal_002, (d, v), (ax.EMBED, ax.VOCAB), param_dtype)
        )
        self.mtp = MTPHead(config, rngs=rngs, **kw) if config.mtp_num_hidden_layers else None

    # ------------------------------------------------------------------ pieces
    def context(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> Context:
        """Rotary tables, token index and document ids for `input_ids [B, T]`.

        Without `positions`, each document's positions start at 0 (so a packed row equals its
        documents run alone). `positions` may be `[B, T]` or `[3, B, T]` (mRoPE T/H/W).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        if segment_ids is None:
            segment_ids = jnp.zeros(input_ids.shape, jnp.int32)
        elif segment_ids.shape != input_ids.shape:
            raise ValueError(
                f"segment_ids shape {segment_ids.shape} != input_ids shape {input_ids.shape}"
            )
        if positions is None:
            positions = positions_from_segments(segment_ids)
        elif positions.shape[-2:] != input_ids.shape:
            raise ValueError(
                f"positions shape {positions.shape} does not end with input_ids shape "
                f"{input_ids.shape}"
            )
        cos, sin = rope_tables(self.config, positions, self.dtype)
        token_index = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return Context(cos=cos, sin=sin, token_index=token_index, segment_ids=segment_ids)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        return ax.constrain(x, ax.HIDDEN)  # [B, T, D]

    def hidden(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states `[B, T, D]`."""
        ctx = self.context(input_ids, positions, segment_ids)
        return self.norm(self.run_blocks(self.embed(input_ids), ctx))

    def run_blocks(self, x: jax.Array, ctx: Context) -> jax.Array:
        graphdef, state = nnx.split(self.blocks)

        remat_layers = self.remat == "layers"

        def body(x, block_state):
            x = nnx.merge(graphdef, block_state)(x, ctx, remat_layers=remat_layers)
            return ax.constrain(x, ax.HIDDEN), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        x, _ = jax.lax.scan(body, x, state)
        return x

    def head_weight(self) -> jax.Array:
        """The LM head `[D, V]` in the compute dtype (the embedding, transposed, when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].astype(self.dtype).T
        return self.lm_head[...].astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[B, T, V]` in the model dtype (losses upcast; training uses `train.loss` instead)."""
        return jnp.einsum("btd,dv->btv", hidden, self.head_weight())

    def mtp_hidden(
        self,
        hidden: jax.Array,
        next_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """MTP hidden states `[B, T, D]`: index i combines `hidden[i]` with token `next_ids[i]`.

        The caller shifts: `next_ids[i] = input_ids[i + 1]`. Positions and segment ids are those
        of `hidden` (index i belongs to h_i's document), so the MTP layer's attention never reads
        across a document boundary.
        """
        if self.mtp is None:
            raise ValueError("this model has no MTP head (mtp_num_hidden_layers = 0)")
        ctx = self.context(next_ids, positions, segment_ids)
        return ax.constrain(self.mtp(hidden, self.embed(next_ids), ctx), ax.HIDDEN)

    # ------------------------------------------------------------------ decoding
    def cache_context(
        self,
        input_ids: jax.Array,
        start: jax.Array,
        num_valid: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> Context:
        """Context for `input_ids [B, T]` going to cache slots `start[b] + t`; the rotary
        `positions` (`[B, T]` or `[3, B, T]`) default to the slots."""
        b, t = input_ids.shape
        slots = rope_positions(start, t)  # [B, T]
        positions = slots if positions is None else positions
        cos, sin = rope_tables(self.config, positions, self.dtype)
        num_valid = jnp.full((b,), t, jnp.int32) if num_valid is None else num_valid
        zeros = jnp.zeros((b, t), jnp.int32)
        return Context(cos=cos, sin=sin, token_index=slots, segment_ids=zeros, num_valid=num_valid)

    def extend(
        self,
        input_ids: jax.Array,
        cache: Cache,
        num_valid: jax.Array | None = None,
        *,
        keep_pending: bool = False,
    ) -> tuple[jax.Array, Cache, Any]:
        """Run `input_ids [B, T]` after the tokens `cache` holds (prefill, decode, verification).

        Row b's first `num_valid[b]` tokens (default all) are kept: they advance the GDN and
        conv states and the cache length; the rest are padding whose outputs are meaningless.
        Rotary positions continue at `cache.next_positions` (slot + the row's rope delta).

        Returns:
          (final-normed hidden `[B, T, D]`, the new cache, and with `keep_pending` the GDN
          inputs `commit` needs to keep fewer tokens — else None). With `keep_pending` (a
          speculative verification) the new cache's GDN and conv states are the old ones: the
          layers only read their states for the outputs, and `commit` advances them by the
          kept tokens (each state is then read for the outputs and advanced once, in place).
        """
        positions = cache.next_positions(input_ids.shape[1])
        ctx = self.cache_context(input_ids, cache.length, num_valid, positions)
        return self.extend_embedded(self.embed(input_ids), ctx, cache, keep_pending=keep_pending)

    def extend_embedded(
        self, x: jax.Array, ctx: Context, cache: Cache, *, keep_pending: bool = False
    ) -> tuple[jax.Array, Cache, Any]:
        """`extend` from input embeddings `x [B, T, D]` and a `cache_context` (e.g. with the
        vision tower's tokens in `x` and 3-D positions in `ctx`)."""
        graphdef, state = nnx.split(self.blocks)
        ctx = dataclasses.replace(ctx, defer_gdn_state=keep_pending)

        # The stacked cache rides in the carry: as scanned inputs with stacked outputs, XLA kept
        # a second whole cache beside the donated one and copied it out after the loop, every
        # decode step (tests/inference/test_decode_memory.py; benchmarks/decode_hlo.py lists
        # what a step still writes). Nor is a layer's slice cut out: the layers write their new
        # KV slots and advance `state[i]` in the stack itself (a slice would be a copy, and
        # writing it back another, of the whole layer's cache).
        def body(carry, xs):
            x, blocks = carry
            block_state, i = xs
            view = tuple(_block_view(c, i) for c in blocks)
            x, new, pending = nnx.merge(graphdef, block_state).extend(x, ctx, view, i)
            blocks = tuple(_block_put(c, n, i) for c, n in zip(blocks, new, strict=True))
            return (ax.constrain(x, ax.HIDDEN), blocks), pending if keep_pending else None

        index = jnp.arange(self.config.num_blocks)
        (x, blocks), pending = jax.lax.scan(body, (x, cache.blocks), (state, index))
        new = dataclasses.replace(cache, blocks=blocks, length=cache.length + ctx.num_valid)
        return self.norm(x), new, pending

    def mtp_extend(
        self,
        hidden: jax.Array,
        next_ids: jax.Array,
        cache: KVCache,
        start: jax.Array,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """MTP hidden `[B, T, D]` for trunk indices `start[b] + t` (the MTP cache slots),
        writing the MTP layer's KV cache; `next_ids[b, t]` is the token after that index.
        `positions` are the trunk's rotary positions of those indices (default: the indices,
        as for text without a rope delta)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (mtp_num_hidden_layers = 0)")
        ctx = self.cache_context(next_ids, start, positions=positions)
        y, cache = self.mtp.extend(hidden, self.embed(next_ids), ctx, cache)
        return ax.constrain(y, ax.HIDDEN), cache

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        return self.logits(self.hidden(input_ids, positions, segment_ids))
