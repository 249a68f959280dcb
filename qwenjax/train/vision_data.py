"""Image and video chat documents for fine-tuning a `Qwen35VL`: pixels, pad expansion, mRoPE.

A chat record whose messages hold image / video content parts (the parts `chat_inputs` takes:
OpenAI `image_url` / `video_url` with a path or `data:` URL, transformers' `image` / `video`,
video frame lists or frame directories) becomes one document:

    render   the built-in Qwen3.6 format with bare parts (<|vision_start|><|image_pad|>…) and the
             assistant-span loss mask, as for text chat
    expand   each image pad → t·h·w/merge² pads; each video pad → per temporal patch
             "<s.s seconds>" + <|vision_start|> + pads + <|vision_end|>; done on token ids
             (special tokens bound every spliced piece, so the ids equal `chat_inputs`'), with
             loss mask 0 on every inserted token
    pixels   the processor's pixel_values / image_grid_thw (and videos') of this document
    mrope    `get_rope_index_host` of the document alone: `[3, T]` positions starting at 0

Documents are packed whole (a vision document longer than `seq_len` is dropped with a warning,
never split); `collate` joins a batch's pixels in token order (row after row, document after
document) and pads them to a bucket so the jitted step compiles once per bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from qwenjax.tokenizer import Tokenizer
from qwenjax.train.loss import VISION_KEYS
from qwenjax.vision.config import VisionConfig
from qwenjax.vision.preprocess import pad_pixels
from qwenjax.vision.processor import VISION_END, VISION_START, Media, Processor
from qwenjax.vision.rope_index import get_rope_index_host

log = logging.getLogger(__name__)


def expand_document(
    ids: Sequence[int],
    mask: Sequence[int],
    media: Sequence[Media],
    tokenizer: Tokenizer,
    processor: Processor,
    vision: VisionConfig,
) -> dict[str, np.ndarray]:
    """A rendered document with one pad per image / video → its expanded ids, mask and pixels."""
    inputs, timestamps = processor.load(media)
    images = [] if inputs is None or inputs.image_grid_thw is None else inputs.image_grid_thw
    videos = [] if inputs is None or inputs.video_grid_thw is None else inputs.video_grid_thw
    start, end = tokenizer.token_to_id(VISION_START), tokenizer.token_to_id(VISION_END)
    unit = vision.spatial_merge_size**2
    image_runs = iter([vision.image_token_id] * (int(np.prod(g)) // unit) for g in images)
    video_runs = iter(
        [
            token
            for s in stamps
            for token in [
                *tokenizer.encode(f"<{s:.1f} seconds>"),
                start,
                *[vision.video_token_id] * (int(h * w) // unit),
                end,
            ]
        ]
        for (_, h, w), stamps in zip(videos, timestamps, strict=True)
    )
    found = ids.count(vision.image_token_id), ids.count(vision.video_token_id)
    if found != (len(images), len(videos)):
        raise ValueError(
            f"the document has {found[0]} image and {found[1]} video placeholders for "
            f"{len(images)} images and {len(videos)} videos"
        )
    out_ids, out_mask = [], []
    for token, m in zip(ids, mask, strict=True):
        if token == vision.image_token_id or token == vision.video_token_id:
            run = next(image_runs if token == vision.image_token_id else video_runs)
            out_ids += run
            out_mask += [0] * len(run)  # never a target: the model sees these, it does not say them
        else:
            out_ids.append(token)
            out_mask.append(m)
    doc = {"input_ids": np.asarray(out_ids, np.int32), "loss_mask": np.asarray(out_mask, np.int32)}
    for key, value in (inputs.kwargs() if inputs is not None else {}).items():
        if value is not None:
            doc[key] = np.asarray(value, np.float32 if key.startswith("pixel") else np.int32)
    return doc


def with_mrope(doc: dict[str, np.ndarray], vision: VisionConfig) -> dict[str, np.ndarray]:
    """`doc` plus `mrope [3, T]`, its `get_rope_index_host` positions as a document of its own, and
    every `VISION_KEYS` entry (empty where it has none: the packer wants one structure)."""
    ids = doc["input_ids"][None]
    if is_vision_document(doc):
        grids = doc.get("image_grid_thw"), doc.get("video_grid_thw")
        positions = get_rope_index_host(ids, vision, *grids)[0][:, 0]
    else:  # text: T = H = W = 0, 1, …
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), (3, ids.shape[1]))
    empty = {
        "pixel_values": np.zeros((0, vision.patch_dim), np.float32),
        "image_grid_thw": np.zeros((0, 3), np.int32),
    }
    empty |= {
        "pixel_values_videos": empty["pixel_values"],
        "video_grid_thw": empty["image_grid_thw"],
    }
    return empty | doc | {"mrope": positions.astype(np.int32)}


def is_vision_document(doc: dict[str, np.ndarray]) -> bool:
    """Whether `doc` holds image or video tokens (not just empty pixel entries)."""
    return any(len(doc.get(key, ())) for key in ("image_grid_thw", "video_grid_thw"))


def drop_long(doc: dict[str, np.ndarray], seq_len: int) -> list[dict[str, np.ndarray]]:
    """`[doc]`, or `[]` with a warning when it is longer than a row (its images cannot be cut)."""
    n = len(doc["input_ids"])
    if n <= seq_len:
        return [doc]
    log.warning(
        "dropping an image/video chat document of %d tokens: longer than seq_len %d, and a "
        "document with images is never split across rows (raise seq_len or lower max_pixels)",
        n,
        seq_len,
    )
    return []


def collate_vision(
    rows: Sequence[dict], seq_len: int, batch_size: int, bucket: int, merge: int
) -> dict[str, np.ndarray]:
    """The vision part of a batch: `positions [3, B, T]` (each row's documents' mRoPE, 0 on
    padding) and, for the kinds present, pixels and grids in token order, padded to `bucket`."""
    positions = np.zeros((3, batch_size, seq_len), np.int32)
    for b, row in enumerate(rows):
        mrope = np.concatenate(list(row["mrope"]), axis=1) if len(row["mrope"]) else None
        if mrope is not None:
            positions[:, b, : mrope.shape[1]] = mrope
    out = {"positions": positions}
    for pixels_key, grid_key in (VISION_KEYS[:2], VISION_KEYS[2:]):
        pixels = [x for row in rows for x in row[pixels_key]]
        if sum(map(len, pixels)):
            grids = [g for row in rows for g in row[grid_key]]
            width = pixels[0].shape[1]
            out[pixels_key], out[grid_key] = pad_pixels(pixels, grids, bucket, merge, width)
    return out
