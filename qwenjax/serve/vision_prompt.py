"""A prompt's images and videos for the scheduler's chunked prefill.

The vision tower and the mRoPE walk need the whole prompt, while the scheduler prefills it a chunk
at a time. So at a vision request's first chunk, once:

    tower      the `VisionEncoder` over the prompt's images, then over its videos; the pixels are
               padded to a power-of-two patch bucket with a dummy image (`vision.preprocess`'s
               `pad_pixels`), so the tower compiles once per bucket, not per image size
    embed      the prompt's embeddings with the tower's tokens at the pad positions, its 3-D
               positions `[3, 1, T]` and its rope delta (`get_rope_index`), on the ids padded to
               a power of two at least one prefill chunk wide (one compile per such length)

and per chunk, `window` slices that chunk's `[1, C, D]` embeddings and `[3, 1, C]` positions, so a
chunk boundary may fall anywhere, inside an image too. The numbers equal `extend_multimodal` on
the whole prompt (offline `Engine`), up to the tower's padding (its own frame: no real patch
attends to it, and its tokens come after every real one).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.inference.engine import _model, traced_under_pins
from qwenjax.vision.config import VisionConfig
from qwenjax.vision.model import Qwen35VL, VisionInputs
from qwenjax.vision.preprocess import pad_pixels

MIN_PATCHES = 64  # the smallest patch bucket


@functools.partial(jax.jit, static_argnames=("graphdef",))
@traced_under_pins
def _tower(graphdef, params, pixels: jax.Array, grid: jax.Array) -> jax.Array:
    """LLM tokens `[N/merge², D]` of padded `pixels [N, C·Tp·P·P]`."""
    model: Qwen35VL = _model(graphdef, params)
    return model.visual(pixels, grid)


@functools.partial(jax.jit, static_argnames=("graphdef",))
@traced_under_pins
def _embed(graphdef, params, ids, num_valid, image_tokens, image_grid, video_tokens, video_grid):
    """Embeddings `[1, T, D]`, positions `[3, 1, T]` and rope delta `[1]` of `ids [1, T]`."""
    model: Qwen35VL = _model(graphdef, params)
    valid = jnp.arange(ids.shape[1])[None, :] < num_valid
    positions, delta = model.rope_index(ids, image_grid, video_grid, valid)
    return model.embed_vision_tokens(ids, image_tokens, video_tokens), positions, delta


@functools.partial(jax.jit, static_argnames=("width",))
def _window(embeds: jax.Array, positions: jax.Array, start, *, width: int):
    """Slots `[start, start + width)` of `embeds [1, T, D]` and `positions [3, 1, T]`."""
    return (
        jax.lax.dynamic_slice_in_dim(embeds, start, width, axis=1),
        jax.lax.dynamic_slice_in_dim(positions, start, width, axis=2),
    )


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class PromptVision:
    """The vision side of one prompt, ready for chunked prefill (device arrays)."""

    embeds: jax.Array  # [1, T, D] the prompt's input embeddings, T ≥ every chunk's end
    positions: jax.Array  # [3, 1, T] mRoPE positions (0 past the prompt)
    delta: jax.Array  # [1] int32 rope delta: decoding continues at slot + delta

    def window(self, start: int, width: int) -> tuple[jax.Array, jax.Array]:
        """The embeddings `[1, width, D]` and positions `[3, 1, width]` of a chunk."""
        return _window(self.embeds, self.positions, jnp.int32(start), width=width)


def prepare(
    graphdef,
    params,
    config: VisionConfig,
    prompt: list[int],
    vision: VisionInputs,
    *,
    chunk: int,
    pad_id: int,
) -> PromptVision:
    """Run the tower (of `config`) on `vision` and lay out the whole `prompt` (see the module
    docstring); `chunk` is the scheduler's prefill chunk (a power of two)."""
    merge, unit = config.spatial_merge_size, config.merge_unit
    tokens, grids = {}, {}
    for kind, pixels, grid in (
        ("image", vision.pixel_values, vision.image_grid_thw),
        ("video", vision.pixel_values_videos, vision.video_grid_thw),
    ):
        if pixels is None:
            tokens[kind] = grids[kind] = None
            continue
        pixels, grid = np.asarray(pixels, np.float32), np.asarray(grid, np.int32)
        bucket = -(-_pow2(len(pixels), MIN_PATCHES) // unit) * unit
        padded, padded_grid = pad_pixels([pixels], [grid], bucket, merge, pixels.shape[1])
        # The padded grid serves the walk too: its extra rows come after every real run.
        grids[kind] = jnp.asarray(padded_grid)
        tokens[kind] = _tower(graphdef, params, jnp.asarray(padded), grids[kind])
    width = _pow2(len(prompt), chunk)  # a multiple of the chunk: every chunk's window fits
    ids = np.full((1, width), pad_id, np.int32)
    ids[0, : len(prompt)] = prompt
    embeds, positions, delta = _embed(
        graphdef,
        params,
        jnp.asarray(ids),
        jnp.int32(len(prompt)),
        tokens["image"],
        grids["image"],
        tokens["video"],
        grids["video"],
    )
    return PromptVision(embeds, positions, delta)
