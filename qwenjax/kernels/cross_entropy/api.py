"""Vocab-blocked cross-entropy: the LM-head matmul fused with the loss, one vocab block at a time.

With W cut into vocab blocks W_j `[D, Vb]` and every token of the batch at once:

    forward    logits_j = hidden @ W_j                    [B, T, Vb]  fp32 accumulation
               lse      = online logsumexp over j         [B, T]      (running max and sum)
               loss     = Σ mask · (lse − logit[target])
    backward   dlogits_j = ḡ · mask · (exp(logits_j − lse) − onehot_j(target))
               dhidden  += dlogits_j W_jᵀ                  fp32 accumulator [B, T, D]
               dW_j      = hiddenᵀ dlogits_j               complete: block j's gradient

Peak memory is one `[B, T, Vb]` tile, never `[B, T, V]` (for Qwen3.6, V = 248,320: 1 GiB fp32
per 1,024 tokens): `chunk_size` sets the tile to about `B · chunk_size · V` elements. The
backward (a `custom_vjp`) recomputes each tile from the saved per-token logsumexp. dlogits
enter the two matmuls in the hidden states' dtype (bf16 in training: what a TPU's default
precision does to fp32 operands anyway), and each dW_j sums all tokens in one fp32-accumulated
matmul, so it is rounded to W's dtype once; a token-chunked loop over a bf16 W instead sums
its chunks in bf16. The target logit is picked with a one-hot reduction, not a gather.
`token_nll` also takes several losses that share the head stacked, `[S, B, T, D]` (next-token
and MTP): one pass over the blocks then serves them all.

Why blocks of the vocabulary rather than chunks of tokens: every block's dW_j is complete, so
nothing of W's size is accumulated across the loop. Sharded (under `sharding.use_rules`), each
device runs its own tokens through every block; W_j is all-gathered over its D shards as the
loop reaches it and dW_j reduce-scattered onto W's sharding straight away, so per pass W
crosses the links once and dW once, and no device holds more of either than one block. With
the vocabulary also split over `tensor`, each device runs its own part of every block and the
per-shard partial logsumexps and dhidden are combined once, after the loop. The token-chunked
form this replaces made XLA gather W and reduce a full-size fp32 dW in every chunk (compiled
27B train step on a v5p: 2.4 and 4.7 GiB per 512-token chunk, 152 GiB of the head's
collectives a step against 9.5 GiB now), and with the token axis sharded over `sequence`
all-reduce each chunk's fp32 logits instead, for every chunk of the sequence on every chip
(970 GiB per 262K-token sequence against 9.5 GiB; `benchmarks/results/*_cross_entropy.md`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwenjax import sharding as ax
from qwenjax.kernels.cross_entropy.reference import cross_entropy_reference

IMPLEMENTATIONS = ("chunked", "reference")
# W is viewed as [D, N, V/N]: N vocab shards (the `tensor` split of V, contiguous), each cut
# into J blocks of Vb along its last axis. Tokens come as [S, B, T] (S losses that share the
# head, stacked). Per block: logits [S, B, T, N, Vb]; per-shard partials [S, B, T, N, ...].
_TOKENS = (None, ax.BATCH, ax.LENGTH)
_PARTIAL = (*_TOKENS, ax.VOCAB)
_W_BLOCK = (None, ax.VOCAB, None)  # [D, N, Vb], D gathered
_W = (ax.EMBED, ax.VOCAB, None)  # [D, N, V/N] (or a block of it), on W's own sharding
# Blocks a multiple of this wide start on a TPU tile's edge in W's row-major [D, V] layout.
_LANES = 128


def vocab_blocks(v_shard: int, tokens: int, chunk_size: int) -> int:
    """J: the fewest blocks, dividing a device's `v_shard` vocab entries, that keep a tile of
    its `tokens` tokens within `chunk_size · v_shard` logits; with blocks a multiple of 128
    wide when such a J exists (for the 27B's V = 248,320, J = 10 where 8 would do)."""
    need = min(-(-tokens // chunk_size), v_shard)
    fits = [j for j in range(need, v_shard + 1) if v_shard % j == 0]
    return next((j for j in fits if v_shard // j % _LANES == 0), fits[0])


def _view(weight: jax.Array, layout: tuple[int, int]) -> jax.Array:
    """[D, V] -> [D, N, V/N]."""
    return weight.reshape(weight.shape[0], layout[0], -1)


def _block(w3: jax.Array, j: jax.Array, layout: tuple[int, int], dtype) -> jax.Array:
    """Block j of W [D, N, V/N] as [D, N, Vb] in `dtype`, D whole on every device.

    Read through a [D, N, J, Vb] view: a dynamic slice of the last axis instead made XLA:CPU
    gather all of W before the loop and slice the gathered copy.
    """
    w4 = w3.reshape(*w3.shape[:2], layout[1], -1)
    block = jax.lax.dynamic_index_in_dim(w4, j, axis=2, keepdims=False)
    return ax.constrain(block.astype(dtype), _W_BLOCK)


def _logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """[S, B, T, D] x [D, N, Vb] -> fp32 [S, B, T, N, Vb]."""
    out = jnp.einsum("sbtd,dnv->sbtnv", h, w, preferred_element_type=jnp.float32)
    return ax.constrain(out, (*_PARTIAL, None))


def _is_target(w3_shape, j: jax.Array, layout, targets: jax.Array) -> jax.Array:
    """bool [S, B, T, N, Vb]: which entries of block j are each token's target."""
    _, n, v_shard = w3_shape
    vb = v_shard // layout[1]
    ids = jnp.arange(n)[:, None] * v_shard + j * vb + jnp.arange(vb)  # [N, Vb]
    return ids.astype(targets.dtype) == targets[..., None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nll(hidden, weight, targets, layout):
    """fp32 [S, B, T] −log softmax(hidden @ W)[target]; `layout` = (N, J)."""
    return _nll_fwd(hidden, weight, targets, layout)[0]


def _nll_fwd(hidden, weight, targets, layout):
    w3 = _view(weight, layout)
    partial = lambda fill: ax.constrain(
        jnp.full((*targets.shape, layout[0]), fill, jnp.float32), _PARTIAL
    )

    def body(j, carry):
        top, total, target = carry  # running max, Σ exp(logit − max), target logit
        logits = _logits(hidden, _block(w3, j, layout, hidden.dtype))
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        total = total * jnp.exp(top - new_top) + jnp.sum(
            jnp.exp(logits - new_top[..., None]), axis=-1
        )
        hit = _is_target(w3.shape, j, layout, targets)
        target = target + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        return new_top, total, target

    init = (partial(-jnp.inf), partial(0.0), partial(0.0))
    top, total, target = jax.lax.fori_loop(0, layout[1], body, init)
    lse = jax.nn.logsumexp(top + jnp.log(total), axis=-1)  # [S, B, T]: the N shards combined
    return lse - jnp.sum(target, axis=-1), (hidden, weight, targets, lse)


def _nll_bwd(layout, residuals, ct):
    hidden, weight, targets, lse = residuals
    w3 = _view(weight, layout)
    vb = w3.shape[2] // layout[1]
    scale = ct[..., None, None]  # [S, B, T, 1, 1]
    dh_names = (*_PARTIAL, None)

    def body(j, carry):
        dh, dw = carry  # dh per vocab shard [S, B, T, N, D], fp32; dw as W [D, N, V/N]
        w = _block(w3, j, layout, hidden.dtype)
        p = jnp.exp(_logits(hidden, w) - lse[..., None, None])  # softmax over all of V
        dlogits = (scale * (p - _is_target(w3.shape, j, layout, targets))).astype(hidden.dtype)
        dh = dh + jnp.einsum("sbtnv,dnv->sbtnd", dlogits, w, preferred_element_type=jnp.float32)
        dw_j = jnp.einsum("sbtd,sbtnv->dnv", hidden, dlogits, preferred_element_type=jnp.float32)
        # Written in place, a column block of W's own layout: a scan's stacked [J, ...] output
        # (or a J axis of its own) made XLA lay the gradient out transposed and copy it, and the
        # optimizer's moments with it, in and out of that layout.
        dw_j = ax.constrain(dw_j.astype(dw.dtype), _W)  # complete: rounded once, if at all
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_j, j * vb, axis=2)
        return ax.constrain(dh, dh_names), ax.constrain(dw, _W)

    dh = jnp.zeros((*targets.shape, layout[0], hidden.shape[-1]), jnp.float32)
    dw = ax.constrain(jnp.zeros_like(w3), _W)
    dh, dw = jax.lax.fori_loop(0, layout[1], body, (ax.constrain(dh, dh_names), dw))
    dh = ax.constrain(jnp.sum(dh, axis=3).astype(hidden.dtype), (*_TOKENS, ax.ACT_EMBED))
    return dh, ax.constrain(dw.reshape(weight.shape), (ax.EMBED, ax.VOCAB)), None


_nll.defvjp(_nll_fwd, _nll_bwd)


def token_nll(
    hidden: jax.Array, weight: jax.Array, targets: jax.Array, *, chunk_size: int = 512
) -> jax.Array:
    """Per-token −log softmax(hidden @ weight)[target], never holding `[..., T, V]` logits.

    Args:
      hidden: `[B, T, D]`, or `[S, B, T, D]`: S losses that share the head (next-token and
        MTP), stacked so that one pass moves W and its gradient for all of them.
      weight: `[D, V]` LM head, cast to hidden's dtype block by block. Its gradient comes
        back in its own dtype, each block computed whole in one fp32-accumulated matmul, so
        rounded once (a bf16 head's, like every other bf16 weight's).
      targets: int ids of hidden's leading shape; any value where the caller masks the loss
        (an id outside [0, V) gives logsumexp alone).
      chunk_size: sets the logits tile: a device's tokens times one vocab block hold about
        `chunk_size · V` fp32 logits (its own part of V when V is sharded) at once.

    Returns:
      fp32 nll of targets' shape.
    """
    if hidden.ndim not in (3, 4) or weight.ndim != 2 or hidden.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"expected hidden [B, T, D] or [S, B, T, D] and weight [D, V], got {hidden.shape}, "
            f"{weight.shape}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {targets.shape} must be {hidden.shape[:-1]}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    stacked = hidden.ndim == 4
    hidden, targets = (hidden, targets) if stacked else (hidden[None], targets[None])
    s, b, t, _ = hidden.shape
    v = weight.shape[1]
    n = ax.active_shards(ax.VOCAB)
    n = n if v % n == 0 else 1
    rows = ax.active_shards(ax.BATCH) * ax.active_shards(ax.LENGTH)
    tokens = s * b * t // rows if b * t % rows == 0 else s * b * t  # one device's
    nll = _nll(hidden, weight, targets, (n, vocab_blocks(v // n, tokens, chunk_size)))
    return nll if stacked else nll[0]


def cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int = 512,
    implementation: str = "chunked",
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy of `hidden @ weight` and the number of counted targets.

    Args:
      hidden: `[B, T, D]` final hidden states (any float dtype; the matmuls run in it and
        accumulate in fp32).
      weight: `[D, V]` LM head (see `token_nll`).
      targets: `[B, T]` int target ids (ignored where `mask` is 0, so padding may be anything).
      mask: `[B, T]` 1 where the target counts, else 0.
      chunk_size: logits tile size (see `token_nll`).
      implementation: "chunked" or "reference" (materialises `[B, T, V]`; for tests).

    Returns:
      `(loss_sum, count)`: fp32 Σ mask · nll and int32 Σ mask. Sums, not a mean, so callers
      can normalise over several micro-batches exactly.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; one of {IMPLEMENTATIONS}")
    if hidden.ndim != 3 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"expected hidden [B, T, D] and weight [D, V], got {hidden.shape}, {weight.shape}"
        )
    if targets.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"targets {targets.shape} and mask {mask.shape} must be {hidden.shape[:2]}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if implementation == "reference":
        return cross_entropy_reference(hidden, weight, targets, mask)
    nll = token_nll(hidden, weight, targets, chunk_size=chunk_size)
    return jnp.sum(jnp.where(mask != 0, nll, 0.0)), jnp.sum(mask != 0, dtype=jnp.int32)
