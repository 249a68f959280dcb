"""The multimodal model: the Qwen3.5 text model with the vision tower beside it.

    h = E[input_ids]
    h[image pads] = ViT(pixel_values, image_grid_thw)          in order, row after row
    h[video pads] = ViT(pixel_values_videos, video_grid_thw)
    positions = get_rope_index(input_ids, grids)              [3, B, T] T/H/W
    logits = Qwen35 blocks → norm → LM head, as for text

`Qwen35VL` is a `Qwen35` (every text method — `extend`, `mtp_hidden`, … — works unchanged, and its
text parameters sit at the same paths) with one more submodule, `visual`. Image and video
positions are found in `input_ids` by the token ids of `config.vision`.

Generation: `extend_multimodal` prefills a cache with the merged embeddings and the 3-D positions,
and stores each row's rope delta in the cache; `extend` then decodes at `slot + delta` on all
three axes (the vision tower never runs again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import ModelConfig
from qwenjax.model.cache import Cache
from qwenjax.model.params import LoRAConfig
from qwenjax.model.transformer import Qwen35
from qwenjax.vision.encoder import VisionEncoder
from qwenjax.vision.rope_index import check_vision_tokens, get_rope_index


def scatter_tokens(x: jax.Array, mask: jax.Array, tokens: jax.Array, what: str) -> jax.Array:
    """`x [B, T, D]` with its `mask` positions replaced, in row-major order, by `tokens [M, D]`."""
    if not isinstance(mask, jax.core.Tracer):
        found = int(mask.sum())
        if found != tokens.shape[0]:
            raise ValueError(
                f"input_ids hold {found} {what} tokens but the {what} inputs give "
                f"{tokens.shape[0]} (t·h·w/merge² per {what})"
            )
    order = jnp.cumsum(mask.reshape(-1)) - 1  # the k-th pad takes token k
    picked = jnp.take(tokens, jnp.clip(order, 0, tokens.shape[0] - 1), axis=0)
    return jnp.where(mask[..., None], picked.reshape(x.shape).astype(x.dtype), x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """A batch's images and videos in transformers' processor layout (rows in batch order).

    pixel_values `[N, C·Tp·P·P]` with image_grid_thw `[n, 3]`; pixel_values_videos with
    video_grid_thw likewise. The k-th grid belongs to the k-th image (video) run of `input_ids`,
    counted row after row.
    """

    pixel_values: Any = None
    image_grid_thw: Any = None
    pixel_values_videos: Any = None
    video_grid_thw: Any = None

    def __post_init__(self) -> None:
        for what, pixels, grid in (
            ("image", self.pixel_values, self.image_grid_thw),
            ("video", self.pixel_values_videos, self.video_grid_thw),
        ):
            if (pixels is None) != (grid is None):
                raise ValueError(f"pass both the {what} pixel values and their grid, or neither")

    def kwargs(self) -> dict[str, Any]:
        """The model's keyword arguments (`model(ids, **inputs.kwargs())`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def concat(cls, items: Sequence[VisionInputs | None]) -> VisionInputs | None:
        """One batch's inputs from each row's (None: a text row); None if no row has any."""
        items = [i for i in items if i is not None]
        if not items:
            return None

        def join(name: str):
            parts = [np.asarray(getattr(i, name)) for i in items if getattr(i, name) is not None]
            return np.concatenate(parts) if parts else None

        return cls(**{f.name: join(f.name) for f in dataclasses.fields(cls)})


class Qwen35VL(Qwen35):
    """`model(input_ids, pixel_values=…, image_grid_thw=…)` → logits `[B, T, vocab]`."""

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
        if config.vision is None:
            raise ValueError("config.vision is None: this config has no vision tower")
        super().__init__(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            lora_config=lora_config,
            remat=remat,
            rngs=rngs,
        )
        # Created after the text model, so the text init equals a text-only build's.
        self.visual = VisionEncoder(
            config.vision, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
        )

    def rope_index(
        self,
        input_ids: jax.Array,
        image_grid_thw: jax.Array | None = None,
        video_grid_thw: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """mRoPE positions `[3, B, T]` and rope deltas `[B]` (see `vision.rope_index`)."""
        return get_rope_index(
            input_ids, self.config.vision, image_grid_thw, video_grid_thw, attention_mask
        )

    def embed_multimodal(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        pixel_values_videos: jax.Array | None = None,
        video_grid_thw: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings `[B, T, D]` with the vision tower's tokens at the pad positions."""
        tokens = []
        for what, pixels, grid in (
            ("image", pixel_values, image_grid_thw),
            ("video", pixel_values_videos, video_grid_thw),
        ):
            if (pixels is None) != (grid is None):
                raise ValueError(f"pass both the {what} pixel values and their grid, or neither")
            tokens.append(None if pixels is None else self.visual(pixels, grid))
        return self.embed_vision_tokens(input_ids, *tokens)

    def embed_vision_tokens(
        self,
        input_ids: jax.Array,
        image_tokens: jax.Array | None = None,
        video_tokens: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings `[B, T, D]` with the k-th image (video) pad, counted row after row,
        replaced by row k of the tower's `image_tokens [M, D]` (`video_tokens`); rows past the
        pads (a padded tower batch) are not read."""
        vision = self.config.vision
        x = self.embed(input_ids)
        for what, token_id, tokens in (
            ("image", vision.image_token_id, image_tokens),
            ("video", vision.video_token_id, video_tokens),
        ):
            if tokens is not None:
                x = scatter_tokens(x, input_ids == token_id, tokens, what)
        return ax.constrain(x, ax.HIDDEN)

    def hidden(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        pixel_values_videos: jax.Array | None = None,
        video_grid_thw: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states `[B, T, D]`.

        Without `positions`, multimodal inputs get `get_rope_index` positions and text-only
        calls the text model's. Packed rows (`segment_ids`) with images need explicit positions.
        """
        grids = image_grid_thw is not None or video_grid_thw is not None
        if grids:
            check_vision_tokens(input_ids, self.config.vision, image_grid_thw, video_grid_thw)
        if positions is None and grids:
            if segment_ids is not None:
                raise ValueError("packed rows (segment_ids) with images or videos need positions")
            positions, _ = self.rope_index(input_ids, image_grid_thw, video_grid_thw)
        ctx = self.context(input_ids, positions, segment_ids)
        x = self.embed_multimodal(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        return self.norm(self.run_blocks(x, ctx))

    def extend_multimodal(
        self,
        input_ids: jax.Array,
        cache: Cache,
        num_valid: jax.Array | None = None,
        *,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        pixel_values_videos: jax.Array | None = None,
        video_grid_thw: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache, jax.Array]:
        """`extend` by a prompt chunk holding whole images / videos (a prefill).

        The chunk gets `get_rope_index` positions of its first `num_valid[b]` tokens, shifted
        to continue the row (`cache.next_positions`); each row's rope delta grows by the
        chunk's, so later `extend` calls continue after its largest position.

        Returns:
          (final-normed hidden `[B, T, D]`, the new cache, the rotary positions `[3, B, T]`
          used; the MTP head's prefill reads them).
        """
        b, t = input_ids.shape
        if num_valid is None:
            num_valid = jnp.full((b,), t, jnp.int32)
        valid = jnp.arange(t)[None, :] < num_valid[:, None]
        positions, delta = self.rope_index(input_ids, image_grid_thw, video_grid_thw, valid)
        offset = cache.next_positions(1)  # [B, 1]: where the row continues
        positions = positions + offset[None]
        delta = jnp.where(num_valid > 0, delta, 0)  # an empty row keeps its delta
        old = jnp.zeros((b,), jnp.int32) if cache.rope_delta is None else cache.rope_delta
        ctx = self.cache_context(input_ids, cache.length, num_valid, positions)
        x = self.embed_multimodal(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        hidden, cache, _ = self.extend_embedded(x, ctx, cache)
        return hidden, dataclasses.replace(cache, rope_delta=old + delta), positions

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        pixel_values_videos: jax.Array | None = None,
        video_grid_thw: jax.Array | None = None,
    ) -> jax.Array:
        hidden = self.hidden(
            input_ids,
            positions,
            segment_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
        )
        return self.logits(hidden)
