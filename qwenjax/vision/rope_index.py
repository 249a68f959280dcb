"""3-D mRoPE positions of a multimodal batch (transformers' `Qwen3_5Model.get_rope_index`).

Each row is walked as runs of text, image or video tokens, with a counter `cur = 0`:

    text run of n tokens          T = H = W = cur, cur+1, …, cur+n−1;   cur += n
    vision run, LLM grid t×h'×w'  T = cur + frame,  H = cur + row,  W = cur + col  (raster order)
                                  cur += max(h', w')                    (not the token count)

where h' = h/merge, w' = w/merge. A video's grid is first split into one grid per temporal patch
(t = 1): transformers writes a timestamp and <|vision_start|>/<|vision_end|> around each, so
each temporal patch is its own run. Runs take grids in order over the whole batch, row after row,
images from `image_grid_thw` and video frames from `video_grid_thw`. The rope delta of a row is
`max position + 1 − tokens`; decoding continues at `cache_length + delta` on all three axes.

Written with cumulative sums and gathers instead of a Python walk, so it runs under `jit` with
traced ids and grids (the shapes are static: [B, T] in, [3, B, T] out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.vision.config import VisionConfig

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_kinds(input_ids: jax.Array, vision: VisionConfig) -> jax.Array:
    """`[B, T]` 0 text, 1 image pad, 2 video pad (transformers' `mm_token_type_ids`)."""
    image = input_ids == vision.image_token_id
    video = input_ids == vision.video_token_id
    return jnp.where(image, IMAGE, jnp.where(video, VIDEO, TEXT)).astype(jnp.int32)


def _carry_forward(values: jax.Array, where: jax.Array) -> jax.Array:
    """`values` at the last position ≤ t where `where` holds, along the row (values must be
    non-decreasing at those positions; 0 before the first)."""
    return jax.lax.cummax(jnp.where(where, values, 0), axis=1)


def get_rope_index(
    input_ids: jax.Array,
    vision: VisionConfig,
    image_grid_thw: jax.Array | None = None,
    video_grid_thw: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Positions `[3, B, T]` (T/H/W) and rope deltas `[B]` for `input_ids [B, T]`.

    `attention_mask [B, T]` (1 = real token), as in transformers: masked tokens are skipped by
    the walk and get position 0.
    """
    b, t = input_ids.shape
    merge = vision.spatial_merge_size
    kind = token_kinds(input_ids, vision)
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    # A run starts where the kind differs from the previous real token's.
    last_real = jax.lax.cummax(jnp.where(valid, idx, -1), axis=1)
    prev_real = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last_real[:, :-1]], axis=1)
    prev_kind = jnp.where(
        prev_real >= 0, jnp.take_along_axis(kind, jnp.maximum(prev_real, 0), axis=1), -1
    )
    start = valid & (kind != prev_kind)

    def run_ordinal(k: int) -> jax.Array:
        """Which run of kind k, counted over the whole batch in row-major order."""
        first = (start & (kind == k)).reshape(-1)
        return (jnp.cumsum(first) - 1).reshape(b, t).astype(jnp.int32)

    # The (h, w) patch grid of each token's run; read only at image/video tokens. (An image
    # with t > 1 frames continues past h'·w' tokens; offset // (h'·w') below is its frame.)
    height = jnp.zeros((b, t), jnp.int32)
    width = jnp.zeros((b, t), jnp.int32)
    if image_grid_thw is not None:
        grid = jnp.asarray(image_grid_thw, jnp.int32)
        g = grid[jnp.clip(run_ordinal(IMAGE), 0, grid.shape[0] - 1)]  # [B, T, 3]
        is_image = kind == IMAGE
        height = jnp.where(is_image, g[..., 1], height)
        width = jnp.where(is_image, g[..., 2], width)
    if video_grid_thw is not None:
        grid = jnp.asarray(video_grid_thw, jnp.int32)
        # Run r is temporal patch r of the concatenated videos: find its video.
        video = jnp.searchsorted(jnp.cumsum(grid[:, 0]), run_ordinal(VIDEO), side="right")
        g = grid[jnp.clip(video, 0, grid.shape[0] - 1)]
        is_video = kind == VIDEO
        height = jnp.where(is_video, g[..., 1], height)
        width = jnp.where(is_video, g[..., 2], width)
    is_vision = valid & (kind != TEXT)
    h, w = height // merge, width // merge  # the LLM grid

    # Advance the counter by 1 per text token and by max(h', w') at each vision run's start.
    advance = jnp.where(valid & (kind == TEXT), 1, 0)
    advance = jnp.where(start & is_vision, jnp.maximum(height, width) // merge, advance)
    cur = jnp.cumsum(advance, axis=1) - advance  # the counter before each token
    run_cur = _carry_forward(cur, start)  # the counter at the start of the token's run
    real_index = jnp.cumsum(valid, axis=1) - 1
    offset = real_index - _carry_forward(real_index, start)  # index within the run

    area, w_safe, h_safe = jnp.maximum(h * w, 1), jnp.maximum(w, 1), jnp.maximum(h, 1)
    t_pos = jnp.where(is_vision, run_cur + offset // area, cur)
    h_pos = jnp.where(is_vision, run_cur + (offset // w_safe) % h_safe, cur)
    w_pos = jnp.where(is_vision, run_cur + offset % w_safe, cur)
    positions = jnp.where(valid, jnp.stack([t_pos, h_pos, w_pos]), 0).astype(jnp.int32)
    delta = positions.max(axis=(0, 2)) + 1 - valid.sum(axis=1)
    return positions, delta.astype(jnp.int32)


def get_rope_index_host(
    input_ids: np.ndarray,
    vision: VisionConfig,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`get_rope_index` in NumPy, for host-side data pipelines: the same positions and deltas,
    computed by walking the runs as the module docstring describes.

    Eager `get_rope_index` compiles every op for every new document length (~2 s a document on
    a CPU); this takes microseconds per run. Raises ValueError when the ids hold more image or
    video runs than the grids describe.
    """
    ids = np.asarray(input_ids)
    b, t = ids.shape
    valid = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    kind = np.where(
        ids == vision.image_token_id, IMAGE, np.where(ids == vision.video_token_id, VIDEO, TEXT)
    )
    grids = {
        IMAGE: iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist()),
        # a video is one run per temporal patch
        VIDEO: iter(
            [(1, h, w) for f, h, w in np.asarray(video_grid_thw).tolist() for _ in range(f)]
            if video_grid_thw is not None
            else []
        ),
    }
    merge = vision.spatial_merge_size
    positions = np.zeros((3, b, t), np.int64)
    for row in range(b):
        cols = np.flatnonzero(valid[row])  # masked tokens are skipped and keep position 0
        kinds = kind[row, cols]
        cur = 0
        for run in np.split(np.arange(len(cols)), np.flatnonzero(np.diff(kinds)) + 1):
            if not len(run):
                continue
            where, n, k = cols[run], len(run), kinds[run[0]]
            if k == TEXT:
                positions[:, row, where] = cur + np.arange(n)
                cur += n
                continue
            grid = next(grids[k], None)
            if grid is None:
                name = "image" if k == IMAGE else "video"
                raise ValueError(f"row {row} has more {name} runs than {name}_grid_thw describes")
            h, w = grid[1] // merge, grid[2] // merge
            offset = np.arange(n)
            positions[:, row, where] = cur + np.stack(
                [offset // (h * w), offset // w % h, offset % w]
            )
            cur += max(h, w)
    delta = positions.max(axis=(0, 2)) + 1 - valid.sum(axis=1)
    return positions.astype(np.int32), delta.astype(np.int32)


def check_vision_tokens(
    input_ids, vision: VisionConfig, image_grid_thw=None, video_grid_thw=None
) -> None:
    """Raise a clear error when concrete ids and grids disagree (run count or run length)."""
    if any(isinstance(a, jax.core.Tracer) for a in (input_ids, image_grid_thw, video_grid_thw)):
        return
    ids = np.asarray(input_ids)
    unit = vision.merge_unit
    images = np.zeros((0, 3), int) if image_grid_thw is None else np.asarray(image_grid_thw)
    videos = np.zeros((0, 3), int) if video_grid_thw is None else np.asarray(video_grid_thw)
    expected = {
        "image": [int(t * h * w) // unit for t, h, w in images],
        "video": [int(h * w) // unit for t, h, w in videos for _ in range(int(t))],
    }
    for name, token in (("image", vision.image_token_id), ("video", vision.video_token_id)):
        runs = []
        for row in ids:
            is_tok = np.concatenate([[False], row == token, [False]])
            edges = np.flatnonzero(is_tok[1:] != is_tok[:-1])
            runs += [int(n) for n in edges[1::2] - edges[::2]]
        if runs != expected[name]:
            what = "temporal patches" if name == "video" else "images"
            raise ValueError(
                f"input_ids hold {len(runs)} {name} runs of lengths {runs}, but the {name} grids "
                f"describe {len(expected[name])} {what} of {expected[name]} tokens"
            )
