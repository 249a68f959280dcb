"""Image and video preprocessing against transformers 5.24.

Images: `Qwen2VLImageProcessorPil` (what transformers itself uses without torchvision) set up as
Qwen3.5's preprocessor_config.json, on odd sizes and aspect ratios, inputs of every kind, and
budgets that the resize hits from below and from above: `pixel_values` must be equal. Videos:
transformers' Qwen3-VL video processor needs torchvision to run whole, so its pieces are
compared: frame sampling, the video `smart_resize`, the patch count, the timestamps and the
patch layout (`patchify`).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    smart_resize as hf_smart_resize_video,
)
from transformers.video_utils import VideoMetadata

from qwenjax.vision.preprocess import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    ImageProcessor,
    VideoProcessor,
    load_image,
    normalize,
    resize,
    smart_resize,
    smart_resize_video,
)

QWEN35_PREPROCESSOR = {
    "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def hf_image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """Qwen3.5's preprocessor_config.json with another pixel budget."""
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def random_image(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth plus noise: bicubic over- and undershoot gets exercised, clipping included.
    y, x = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(x[..., None] / 7.0 + y[..., None] / 11.0 + np.arange(channels))
    noisy = base + rng.normal(0, 40, (h, w, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


# (height, width, min_pixels, max_pixels): the last two of each group hit the budget
SIZES = [
    (37, 53, 4096, 1 << 20),  # rounds up to one block per side
    (100, 333, 4096, 1 << 20),
    (517, 211, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS),  # the published budget, no hit
    (20, 900, 1024, 1 << 16),  # 1:45 aspect ratio
    (61, 47, 65_536, 1 << 20),  # below min_pixels: scaled up
    (1203, 799, 4096, 200_000),  # above max_pixels: scaled down
    (301, 1999, 4096, 123_456),  # above max_pixels, wide
]


@pytest.mark.parametrize(("height", "width", "min_pixels", "max_pixels"), SIZES)
def test_images_equal_transformers(height, width, min_pixels, max_pixels):
    img = random_image(height, width, seed=height * width)
    images = [img, PIL.Image.fromarray(img)]
    ours = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images)
    ref = hf_image_processor(min_pixels, max_pixels)(images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-5
    pixels = ours["image_grid_thw"][0, 1:].prod() * 16 * 16
    if (height, width) == (61, 47):
        assert pixels >= min_pixels
    if height * width > max_pixels:
        assert pixels <= max_pixels


def test_every_input_kind_equals_transformers(tmp_path):
    """PIL RGBA/L/P, arrays (gray, RGBA, channels first), a file path and a data: URL."""
    rgba = random_image(45, 70, seed=1, channels=4)
    gray = random_image(70, 45, seed=2, channels=1)[..., 0]
    palette = PIL.Image.fromarray(random_image(50, 50, seed=3)).convert("P")
    rgb = random_image(66, 99, seed=4)
    path = tmp_path / "image.png"
    PIL.Image.fromarray(rgb).save(path)
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgba).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    ref_inputs = [
        PIL.Image.fromarray(rgba),
        PIL.Image.fromarray(gray),
        palette,
        rgba,
        np.moveaxis(rgb, -1, 0),
        PIL.Image.open(path),
        PIL.Image.open(io.BytesIO(buffer.getvalue())),
    ]
    our_inputs = [*ref_inputs[:5], str(path), url]
    ours = ImageProcessor(min_pixels=4096, max_pixels=1 << 18)(our_inputs)
    ref = hf_image_processor(4096, 1 << 18)(images=ref_inputs, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-5


def test_smart_resize_equals_transformers():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(8, 5000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 1 << 20))
        hi = lo + int(rng.integers(0, 1 << 24))
        assert smart_resize(h, w, 32, lo, hi) == hf_smart_resize(h, w, 32, lo, hi)
        frames = int(rng.integers(2, 60))
        assert smart_resize_video(frames, h, w, 2, 32, lo, hi) == hf_smart_resize_video(
            frames, h, w, 2, 32, lo, hi
        )


@pytest.mark.parametrize(
    ("total", "video_fps", "fps", "num_frames"),
    [(50, 24.0, 2.0, None), (7, 3.0, 2.0, None), (31, 29.97, 1.5, None), (300, 30.0, 2.0, None),
     (23, 10.0, 2.0, 5), (3, 30.0, 2.0, None)],
)  # fmt: skip
def test_video_grid_and_timestamps_equal_transformers(total, video_fps, fps, num_frames):
    height, width = 90, 134
    frames = [random_image(height, width, seed=i) for i in range(total)]
    processor = VideoProcessor(min_pixels=4096, max_pixels=1 << 18, fps=fps)
    out = processor(frames, video_fps, num_frames=num_frames)

    size = {"shortest_edge": 4096, "longest_edge": 1 << 18}
    hf = Qwen3VLVideoProcessor(size=size)
    indices = hf.sample_frames(
        VideoMetadata(total_num_frames=total, fps=video_fps), num_frames=num_frames,
        fps=None if num_frames else fps,
    )  # fmt: skip
    np.testing.assert_array_equal(out["frame_indices"], indices)
    timestamps = Qwen3VLProcessor._calculate_timestamps(None, indices, video_fps, 2)
    assert out["timestamps"] == timestamps
    h, w = hf_smart_resize_video(len(indices), height, width, 2, 32, 4096, 1 << 18)
    t = -(-len(indices) // 2)
    np.testing.assert_array_equal(out["video_grid_thw"], [[t, h // 16, w // 16]])
    n = hf.get_num_of_video_patches(len(indices), height, width, {"size": size})
    assert out["pixel_values_videos"].shape == (n, 1536) and len(out["timestamps"]) == t


def test_video_patch_layout_equals_transformers():
    """Our frames through transformers' own `patchify` (a torch op) give our rows, odd frame
    count included (the last frame is repeated)."""
    frames = [random_image(70, 100, seed=10 + i) for i in range(5)]
    processor = VideoProcessor(min_pixels=4096, max_pixels=1 << 18)
    out = processor(frames, 1.0, sample=False)
    h, w = (int(v) * 16 for v in out["video_grid_thw"][0, 1:])
    x = np.stack([normalize(resize(f, h, w), (0.5,) * 3, (0.5,) * 3) for f in frames])
    hf = Qwen3VLVideoProcessor()
    patches, t, gh, gw = hf.patchify(torch.from_numpy(x)[None], 16, 2, 2)
    np.testing.assert_array_equal(out["video_grid_thw"], [[t, gh, gw]])
    np.testing.assert_array_equal(out["pixel_values_videos"], patches[0].numpy())
    assert out["timestamps"] == [0.5, 2.5, 4.0]  # (0+1)/2, (2+3)/2, (4+4)/2


def test_an_image_is_a_video_of_two_equal_frames():
    img = random_image(80, 120, seed=5)
    image = ImageProcessor(min_pixels=4096, max_pixels=1 << 16)(img)
    video = VideoProcessor(min_pixels=2 * 4096, max_pixels=2 << 16)([img, img], 1.0, sample=False)
    np.testing.assert_array_equal(image["image_grid_thw"], video["video_grid_thw"])
    np.testing.assert_array_equal(image["pixel_values"], video["pixel_values_videos"])


def test_processors_read_the_hf_configs():
    image = ImageProcessor.from_hf(QWEN35_PREPROCESSOR, max_pixels=1 << 20)
    assert (image.min_pixels, image.max_pixels, image.patch_size) == (65_536, 1 << 20, 16)
    video = VideoProcessor.from_hf(
        {"size": {"shortest_edge": 4096, "longest_edge": 25165824}, "fps": 2, "merge_size": 2}
    )
    assert (video.min_pixels, video.max_pixels, video.fps) == (4096, 25165824, 2)
    with pytest.raises(ValueError, match="do_normalize"):
        ImageProcessor.from_hf({**QWEN35_PREPROCESSOR, "do_normalize": False})


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="not fetched"):
        load_image("https://example.com/cat.png")
    with pytest.raises(FileNotFoundError):
        load_image("/nonexistent/cat.png")
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessor(min_pixels=10, max_pixels=5)
