"""Training loss: next-token cross-entropy plus the MTP loss (ARCHITECTURE.md §4.2).

    L = L_main + λ · L_mtp
    L_main = mean over counted t of −log p(x_{t+1} | h_t)                 logits from the LM head
    L_mtp  = mean over counted i of −log p(x_{i+2} | mtp(h_i, E[x_{i+1}]))  same (shared) LM head

Targets never cross a packed document: t → t+1 counts iff `loss_mask[t+1]` and
`segment_ids[t] == segment_ids[t+1]`; i → i+2 counts iff `loss_mask[i+2]` and
`segment_ids[i] == segment_ids[i+1] == segment_ids[i+2]`. Shifts keep the length T (the last one
or two positions get target 0 and mask 0, as Megatron's roll-and-zero does), so every array
keeps the same `[B, T]` sharding. The MTP gradient flows into the trunk (Megatron's default).

Batch (all int32 `[..., B, T]`): `input_ids`, `segment_ids`, `positions` (restarting at 0 per
document), `loss_mask` (1 where token t is a trained target, i.e. predicting it counts).
Image and video rows (a `Qwen35VL` model) add the processor's `pixel_values` / `image_grid_thw`
/ `pixel_values_videos` / `video_grid_thw` of the batch (`VISION_KEYS`), and their `positions`
are the 3-D mRoPE positions `[3, B, T]` of `vision.rope_index.get_rope_index`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax.kernels.cross_entropy import token_nll
from qwenjax.model import Qwen35

Batch = dict[str, jax.Array]
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _shift(x: jax.Array, k: int) -> jax.Array:
    """`y[..., t] = x[..., t + k]`, zero-filled at the end."""
    return jnp.concatenate([x[..., k:], jnp.zeros_like(x[..., :k])], axis=-1)


def shifted_targets(batch: Batch, k: int) -> tuple[jax.Array, jax.Array]:
    """Targets `x_{t+k}` and their bool mask for every position t (any leading dims)."""
    segments = batch["segment_ids"]
    mask = _shift(batch["loss_mask"], k) != 0
    for j in range(1, k + 1):
        mask &= _shift(segments, j) == segments
    return _shift(batch["input_ids"], k), mask


def target_counts(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Numbers of counted main (t+1) and MTP (t+2) targets in `batch` (int32 scalars)."""
    return tuple(jnp.sum(shifted_targets(batch, k)[1], dtype=jnp.int32) for k in (1, 2))


def loss_fn(
    model: Qwen35,
    batch: Batch,
    *,
    mtp_weight: float = 0.1,
    ce_chunk: int = 512,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`L_main + mtp_weight · L_mtp` on one `[B, T]` batch, and its metrics.

    Args:
      model: the model (its compute dtype and remat policy apply).
      batch: `input_ids`, `segment_ids`, `positions`, `loss_mask`, each `[B, T]`.
      mtp_weight: λ; 0 (or a model without an MTP head) skips the MTP head entirely.
      ce_chunk: logits tile of the fused LM-head cross-entropy: about `ce_chunk · V` fp32
        logits per device at once (`kernels.cross_entropy.token_nll`).
      counts: the normalisers `(main, mtp)`, default this batch's own `target_counts`. Pass the
        totals of a whole accumulated batch: then loss and metrics of its micro-batches add up
        to exactly the big batch's (a mean of sums, not a mean of means).

    Returns:
      `(loss, metrics)`: metrics `loss`, `ce_loss`, `mtp_loss` (fp32, normalised by `counts`)
      and `tokens`, `mtp_tokens` (int32, this batch's counted targets); all additive over
      micro-batches that share `counts`.
    """
    main_targets, main_mask = shifted_targets(batch, 1)
    mtp_targets, mtp_mask = shifted_targets(batch, 2)
    n_main, n_mtp = target_counts(batch) if counts is None else counts
    ids, positions, segments = batch["input_ids"], batch["positions"], batch["segment_ids"]

    vision = {k: batch[k] for k in VISION_KEYS if k in batch}
    hidden = model.hidden(ids, positions, segments, **vision)  # [B, T, D]
    head = model.head_weight()  # [D, V]
    hiddens, targets = [hidden], [main_targets]
    with_mtp = model.mtp is not None and bool(mtp_weight)
    if with_mtp:
        # Index i pairs h_i with x_{i+1} (= the main target) in h_i's document.
        hiddens.append(model.mtp_hidden(hidden, main_targets, positions, segments))
        targets.append(mtp_targets)
    # Both losses go through the head in one pass: W is gathered, and its gradient reduced, once.
    nll = token_nll(jnp.stack(hiddens), head, jnp.stack(targets), chunk_size=ce_chunk)
    masked_sum = lambda x, mask: jnp.sum(jnp.where(mask, x, 0.0))
    ce_loss = masked_sum(nll[0], main_mask) / jnp.maximum(n_main, 1)
    tokens = jnp.sum(main_mask, dtype=jnp.int32)

    mtp_loss, mtp_tokens = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    if with_mtp:
        mtp_loss = masked_sum(nll[1], mtp_mask) / jnp.maximum(n_mtp, 1)
        mtp_tokens = jnp.sum(mtp_mask, dtype=jnp.int32)

    loss = ce_loss + mtp_weight * mtp_loss
    metrics = dict(
        loss=loss, ce_loss=ce_loss, mtp_loss=mtp_loss, tokens=tokens, mtp_tokens=mtp_tokens
    )
    return loss, metrics
