"""Images and videos → `pixel_values [N, C·Tp·P·P]` and grids `[n, 3]`, in transformers' layout.

    image → RGB uint8 → resize to (H, W) = smart_resize(...) → x/255 → (x − mean)/std
          → repeat ×Tp in time → patches of (C, Tp, P, P), ordered by 2×2 merge block
    video → sample frames at `fps` → the same per frame, Tp consecutive frames per patch

`smart_resize` keeps the aspect ratio, makes both sides multiples of P·merge (32) and keeps the
pixel count within [min_pixels, max_pixels]. Rows come image after image; within an image by merge
block (h/2, w/2), then the block's 2×2 patches, so each LLM token's 4 patches are consecutive.

Backend: PIL decodes and resizes (bicubic on uint8 RGB), NumPy does the rest; no torch. This is
transformers' `Qwen2VLImageProcessorPil`, reproduced bit for bit (the tests compare). The default
`Qwen2VLImageProcessor` resizes with torchvision instead and falls back to the PIL class when
torchvision is missing; its antialiased bicubic is not bit-identical to PIL's, so its
`pixel_values` can differ from ours by a uint8 step at some pixels (not measured: torchvision's
PyPI build does not import beside the CPU torch pinned for the tests). transformers' video
processor exists only with torchvision; we resize frames with PIL, like images.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Qwen3.5 / Qwen3.6 preprocessor_config.json and video_preprocessor_config.json.
IMAGE_MIN_PIXELS = 65_536
IMAGE_MAX_PIXELS = 16_777_216
VIDEO_MIN_PIXELS = 4_096
VIDEO_MAX_PIXELS = 25_165_824
MEAN = STD = (0.5, 0.5, 0.5)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, transformers' `resample`


def _pil():
    try:
        import PIL.Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("image preprocessing needs Pillow: pip install pillow") from e
    return PIL.Image


# ---------------------------------------------------------------------- decoding
def load_image(image: Any) -> np.ndarray:
    """An RGB uint8 array `[H, W, 3]` from a PIL image, a uint8 array, a path or a `data:` URL.

    Transparency is composited onto white, as transformers does (PIL images through PIL, arrays
    with alpha by its NumPy formula). Arrays may be `[H, W]`, or `[H, W, C]` / `[C, H, W]` with
    C in (1, 3, 4) (channels first when both ends could be channels, like transformers).
    """
    Image = _pil()
    if isinstance(image, str | os.PathLike):
        image = _open(os.fspath(image))
    if isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"unsupported image type {type(image).__name__}: PIL image, array or path")


def _open(source: str):
    Image = _pil()
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("data: URLs must be base64-encoded (data:image/png;base64,...)")
        image = Image.open(io.BytesIO(base64.b64decode(payload)))
    elif source.startswith(("http://", "https://")):
        raise ValueError(f"{source}: URLs are not fetched; download the image and pass its path")
    else:
        path = source.removeprefix("file://")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no image file at {path}")
        image = Image.open(path)
    image.load()
    return image


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (0..255), got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    elif image.ndim != 3:
        raise ValueError(f"image arrays must be [H, W] or [H, W, C], got shape {image.shape}")
    elif image.shape[0] in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    elif image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot tell the channel axis of an image of shape {image.shape}")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------------- sizes
def smart_resize(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """(H, W): multiples of `factor`, aspect ratio kept, H·W within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """`smart_resize` with the budget over all frames (transformers' Qwen3-VL video rule)."""
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:  # tiny frames are first scaled up to one block
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# ---------------------------------------------------------------------- pixels
def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an RGB uint8 `[H, W, 3]` image by PIL (uint8 out, like transformers)."""
    Image = _pil()
    return np.asarray(Image.fromarray(image).resize((width, height), resample=BICUBIC))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 `[H, W, C]` → float32 `[C, H, W]`: x/255 (rounded from fp64), then (x − mean)/std."""
    x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int):
    """`frames [F, C, H, W]` (F a multiple of Tp) → (`[t·h·w, C·Tp·P·P]`, (t, h, w)).

    Rows by temporal patch, then merge block (h/m, w/m), then the m×m patches of the block;
    each row is (C, Tp, P, P) flattened.
    """
    f, c, height, width = frames.shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    t, h, w = f // tp, height // p, width // p
    x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p)
    # → (t, h/m, w/m, m_h, m_w, C, Tp, P_h, P_w)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, c * tp * p * p), (t, h, w)


# ---------------------------------------------------------------------- processors
@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Qwen3.5's image preprocessing; `processor(images)` → `pixel_values`, `image_grid_thw`.

    `min_pixels` / `max_pixels` bound each resized image (transformers' `size` shortest_edge /
    longest_edge): fewer pixels, fewer LLM tokens (one per 32×32 px).
    """

    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = MEAN
    image_std: tuple[float, ...] = STD

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )
        object.__setattr__(self, "image_mean", tuple(self.image_mean))
        object.__setattr__(self, "image_std", tuple(self.image_std))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> ImageProcessor:
        """From a `preprocessor_config.json` (a directory, the file or its dict), then overrides."""
        return cls(**{**_processor_kwargs(path_or_dict, "preprocessor_config.json"), **overrides})

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def frames(self, image: Any) -> np.ndarray:
        """One image as `[Tp, C, H', W']` float32: resized, normalised, repeated in time."""
        rgb = load_image(image)
        rgb = resize(rgb, *self.resized_size(*rgb.shape[:2]))
        x = normalize(rgb, self.image_mean, self.image_std)
        return np.broadcast_to(x, (self.temporal_patch_size, *x.shape))

    def __call__(self, images: Any | Sequence[Any]) -> dict[str, np.ndarray]:
        """`pixel_values [Σ h·w, C·Tp·P·P]` float32 and `image_grid_thw [n, 3]` int64."""
        if not isinstance(images, list | tuple):
            images = [images]
        if not images:
            raise ValueError("no images")
        rows, grids = [], []
        for image in images:
            patches, grid = patchify(
                self.frames(image), self.patch_size, self.temporal_patch_size, self.merge_size
            )
            rows.append(patches)
            grids.append(grid)
        return {
            "pixel_values": np.concatenate(rows),
            "image_grid_thw": np.asarray(grids, np.int64),
        }


@dataclasses.dataclass(frozen=True)
class VideoProcessor:
    """Qwen3.5's video preprocessing for a list of frames; see `__call__`.

    Frames are sampled at `fps` per second of video (clamped to [min_frames, max_frames]); every
    `temporal_patch_size` consecutive sampled frames form one temporal patch, whose timestamp is
    the mean of its first and last frame's. The pixel budget is over all sampled frames.
    """

    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = MEAN
    image_std: tuple[float, ...] = STD
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )
        object.__setattr__(self, "image_mean", tuple(self.image_mean))
        object.__setattr__(self, "image_std", tuple(self.image_std))

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> VideoProcessor:
        """From a `video_preprocessor_config.json` (a directory, the file or its dict)."""
        kwargs = _processor_kwargs(path_or_dict, "video_preprocessor_config.json")
        return cls(**{**kwargs, **overrides})

    def sample_indices(
        self, total_frames: int, video_fps: float, num_frames: int | None = None
    ) -> np.ndarray:
        """Indices of the frames kept: `num_frames`, or `fps` per second, evenly spread."""
        if num_frames is None:
            num_frames = int(total_frames / video_fps * self.fps)
            num_frames = min(max(num_frames, self.min_frames), self.max_frames, total_frames)
        return np.linspace(0, total_frames - 1, num_frames).round().astype(int)

    def timestamps(self, indices: Sequence[int], video_fps: float) -> list[float]:
        """Seconds of each temporal patch: the mean time of its first and last frame."""
        tp = self.temporal_patch_size
        indices = list(indices)
        indices += [indices[-1]] * (-len(indices) % tp)  # the last frame repeats, as in patchify
        seconds = [i / video_fps for i in indices]
        return [(seconds[i] + seconds[i + tp - 1]) / 2 for i in range(0, len(seconds), tp)]

    def __call__(
        self,
        frames: Sequence[Any] | np.ndarray,
        video_fps: float | None = None,
        *,
        num_frames: int | None = None,
        sample: bool = True,
    ) -> dict[str, Any]:
        """One video, given as its frames (images of one size, or a `[F, H, W, 3]` uint8 array).

        Args:
          frames: every frame of the clip, in order.
          video_fps: the clip's frame rate; transformers assumes 24 (with a warning) without it.
          num_frames: sample this many frames instead of `fps` per second.
          sample: False keeps every given frame (already sampled).

        Returns:
          `pixel_values_videos [t·h·w, C·Tp·P·P]`, `video_grid_thw [1, 3]`, `timestamps` (one
          per temporal patch, seconds) and `frame_indices` (the frames used).
        """
        if video_fps is None:
            warnings.warn("video_fps not given: assuming 24 frames per second", stacklevel=2)
            video_fps = 24.0
        total = len(frames)
        indices = self.sample_indices(total, video_fps, num_frames) if sample else np.arange(total)
        rgb = [load_image(frames[i]) for i in indices]
        if len({f.shape for f in rgb}) != 1:
            raise ValueError("all frames of a video must have the same size")
        factor = self.patch_size * self.merge_size
        size = smart_resize_video(
            len(rgb), *rgb[0].shape[:2], self.temporal_patch_size, factor,
            self.min_pixels, self.max_pixels,
        )  # fmt: skip
        x = np.stack([normalize(resize(f, *size), self.image_mean, self.image_std) for f in rgb])
        if pad := -len(x) % self.temporal_patch_size:  # repeat the last frame
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        patches, grid = patchify(x, self.patch_size, self.temporal_patch_size, self.merge_size)
        return {
            "pixel_values_videos": patches,
            "video_grid_thw": np.asarray([grid], np.int64),
            "timestamps": self.timestamps(indices, video_fps),
            "frame_indices": indices,
        }


def _processor_kwargs(path_or_dict: str | os.PathLike | dict, filename: str) -> dict[str, Any]:
    """Our fields from a transformers processor config; settings we cannot honour raise."""
    if isinstance(path_or_dict, dict):
        raw = path_or_dict
    else:
        path = Path(path_or_dict)
        raw = json.loads((path / filename if path.is_dir() else path).read_text())
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if raw.get(flag) is False:
            raise ValueError(f"{flag}=false is not supported")
    if raw.get("resample", BICUBIC) != BICUBIC:
        raise ValueError(f"resample={raw['resample']}: only bicubic ({BICUBIC}) is supported")
    if abs(raw.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ValueError(f"rescale_factor={raw['rescale_factor']}: only 1/255 is supported")
    out: dict[str, Any] = {}
    size = raw.get("size") or {}
    if "shortest_edge" in size:
        out["min_pixels"] = size["shortest_edge"]
    if "longest_edge" in size:
        out["max_pixels"] = size["longest_edge"]
    for key in ("min_pixels", "max_pixels"):  # older configs
        if raw.get(key) is not None:
            out[key] = raw[key]
    keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    keys += ("fps", "min_frames", "max_frames") if "video" in filename else ()
    out.update({k: raw[k] for k in keys if raw.get(k) is not None})
    return out


GRIDS_BUCKET = 4  # grid rows are padded to a multiple of this


def pad_pixels(
    pixels: list[np.ndarray], grids: list[np.ndarray], bucket: int, merge: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Patch rows for a jitted vision tower in shapes from few buckets (training batches, the
    server's image prompts): the concatenated pixels padded to a multiple of `bucket` rows (at
    least one bucket), the pad described by one extra grid `(1, merge, pad/merge)` (a dummy
    image whose tokens no pad position takes), and the grids padded with zero rows to a
    multiple of GRIDS_BUCKET."""
    pixel_values = np.concatenate(pixels) if pixels else np.zeros((0, width), np.float32)
    grid = np.concatenate(grids) if grids else np.zeros((0, 3), np.int32)
    n = len(pixel_values)
    pad = max(-(-n // bucket), 1) * bucket - n
    pixel_values = np.pad(pixel_values, ((0, pad), (0, 0)))
    grid = np.concatenate([grid, [[1, merge, pad // merge]]]).astype(np.int32)
    rows = -(-len(grid) // GRIDS_BUCKET) * GRIDS_BUCKET
    return pixel_values, np.pad(grid, ((0, rows - len(grid)), (0, 0)))
