"""Chat messages with images and videos → the rendered prompt's text and `VisionInputs`.

transformers' `Qwen3VLProcessor`, in three steps:

    media    the image / video content parts in message order, each replaced by a bare
             `{"type": "image"}` / `{"type": "video"}` part (what the chat template reads)
    render   the chat template writes `<|vision_start|><|image_pad|><|vision_end|>` per image
             and `<|vision_start|><|video_pad|><|vision_end|>` per video
    expand   the k-th `<|image_pad|>` becomes t·h·w / merge² pads (one per LLM token of image k);
             the k-th `<|video_pad|>` becomes, per temporal patch of video k,
             `<{seconds:.1f} seconds><|vision_start|>` + pads (h·w / merge²) + `<|vision_end|>`
             (only the pad is replaced, so the template's own start/end stay around it)

Accepted parts: OpenAI `{"type": "image_url", "image_url": {"url": ...}}` and
`{"type": "video_url", "video_url": {"url": ...}}`, transformers' `{"type": "image", "url" |
"path" | "image": ...}` and `{"type": "video", "video" | "path" | "url": ...}`. An image is a path,
a `data:` URL, a PIL image or a uint8 array (http URLs are never fetched); a video is a list of
frames, a `[F, H, W, 3]` uint8 array or a directory of frame images (sorted by name). Video files
are not decoded (no decoder dependency). A video part may carry `fps`, the frame rate of the
frames given: they are then sampled at the processor's `fps`; without it the frames are taken as
already sampled at the processor's `fps` and all kept.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenjax.vision.model import VisionInputs
from qwenjax.vision.preprocess import ImageProcessor, VideoProcessor

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Media:
    """One image or video of a conversation, before loading."""

    kind: str  # "image" or "video"
    source: Any
    fps: float | None = None  # video: frame rate of the frames given


def _url(value: Any) -> Any:
    """`{"url": ...}` (OpenAI) or the value itself."""
    return value.get("url") if isinstance(value, Mapping) else value


def _media_of(part: Mapping[str, Any], where: str) -> Media | None:
    """The image or video of a content part (None for text), by the template's own tests."""
    kind = part.get("type")
    if "image" in part or "image_url" in part or kind in ("image", "image_url"):
        keys, what = ("image", "image_url", "url", "path"), "image"
    elif "video" in part or "video_url" in part or kind in ("video", "video_url"):
        keys, what = ("video", "video_url", "url", "path"), "video"
    else:
        return None
    source = next((_url(part[k]) for k in keys if part.get(k) is not None), None)
    if source is None:
        raise ValueError(f"{where}: {what} part without a source ({' / '.join(keys)})")
    fps = part.get("fps")
    return Media(what, source, None if fps is None else float(fps))


def extract_media(
    messages: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[Media]]:
    """(messages with bare image / video parts, their media in rendering order)."""
    out, media = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str) or not isinstance(content, Sequence):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            found = _media_of(part, where) if isinstance(part, Mapping) else None
            if found is None:
                parts.append(part)
            else:
                media.append(found)
                parts.append({"type": found.kind})
        out.append({**message, "content": parts})
    return out, media


def _frames(source: Any) -> Sequence[Any] | np.ndarray:
    if isinstance(source, str | os.PathLike):
        path = Path(os.fspath(source).removeprefix("file://"))
        if not path.is_dir():
            raise ValueError(
                f"video {source}: give a directory of frame images or a list of frames "
                "(video files are not decoded)"
            )
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"video directory {path} holds no frame images")
        return files
    if isinstance(source, np.ndarray | list | tuple):
        return source
    raise TypeError(f"unsupported video type {type(source).__name__}: frames or a directory")


@dataclasses.dataclass(frozen=True)
class Processor:
    """Image and video preprocessing plus the pad expansion of a rendered chat prompt."""

    image: ImageProcessor = dataclasses.field(default_factory=ImageProcessor)
    video: VideoProcessor = dataclasses.field(default_factory=VideoProcessor)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, **image_overrides: Any) -> Processor:
        """From a checkpoint's `preprocessor_config.json` / `video_preprocessor_config.json`
        (published defaults where a file is missing); `image_overrides` e.g. `max_pixels`."""
        directory = Path(directory)
        image_file = directory / "preprocessor_config.json"
        video_file = directory / "video_preprocessor_config.json"
        if image_file.is_file():
            image = ImageProcessor.from_hf(image_file, **image_overrides)
        else:
            image = ImageProcessor(**image_overrides)
        video = VideoProcessor.from_hf(video_file) if video_file.is_file() else VideoProcessor()
        return cls(image, video)

    def load(self, media: Sequence[Media]) -> tuple[VisionInputs | None, list[list[float]]]:
        """The pixel inputs of `media` and each video's temporal-patch timestamps."""
        images = [m.source for m in media if m.kind == "image"]
        videos, timestamps = [], []
        for m in media:
            if m.kind == "video":
                sampled = m.fps is not None
                fps = m.fps if sampled else self.video.fps
                out = self.video(_frames(m.source), fps, sample=sampled)
                videos.append(out)
                timestamps.append(out["timestamps"])
        if not images and not videos:
            return None, []
        pixels = self.image(images) if images else {}
        join = lambda key: np.concatenate([v[key] for v in videos]) if videos else None
        inputs = VisionInputs(
            pixels.get("pixel_values"),
            pixels.get("image_grid_thw"),
            join("pixel_values_videos"),
            join("video_grid_thw"),
        )
        return inputs, timestamps

    def expand(self, text: str, inputs: VisionInputs | None, timestamps: Sequence) -> str:
        """`text` with each image / video pad expanded to its tokens (in order)."""
        images = [] if inputs is None or inputs.image_grid_thw is None else inputs.image_grid_thw
        videos = [] if inputs is None or inputs.video_grid_thw is None else inputs.video_grid_thw
        found = text.count(IMAGE_PAD), text.count(VIDEO_PAD)
        if found != (len(images), len(videos)):
            raise ValueError(
                f"the prompt has {found[0]} image and {found[1]} video placeholders for "
                f"{len(images)} images and {len(videos)} videos"
            )
        image_unit, video_unit = self.image.merge_size**2, self.video.merge_size**2
        image_text = iter(IMAGE_PAD * (int(np.prod(g)) // image_unit) for g in images)
        frame = lambda s, n: f"<{s:.1f} seconds>{VISION_START}{VIDEO_PAD * n}{VISION_END}"
        video_text = iter(
            "".join(frame(s, int(h * w) // video_unit) for s in stamps)
            for (_, h, w), stamps in zip(videos, timestamps, strict=True)
        )
        pattern = f"{re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)}"
        return re.sub(
            pattern, lambda m: next(image_text if m.group() == IMAGE_PAD else video_text), text
        )
