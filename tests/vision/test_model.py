"""The multimodal model against transformers' `Qwen3_5ForConditionalGeneration` (fp32 logits
≤ 1e-4 relative) and `get_rope_index` (exact), for batches that mix image, video and text rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenjax.checkpoint import load
from qwenjax.vision.config import VisionConfig
from qwenjax.vision.rope_index import get_rope_index, get_rope_index_host
from tests.conftest import rel_err
from tests.vision.conftest import END, IMAGE, START, TOKEN_IDS, VIDEO, Prompt, hf_logits, patches

TOL = 1e-4
VISION = VisionConfig(**TOKEN_IDS, out_hidden_size=80)


def hf_rope_index(hf, ids, images, videos, mask=None):
    kinds = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
    pos, delta = hf.model.get_rope_index(
        t(ids), t(kinds), image_grid_thw=t(images), video_grid_thw=t(videos), attention_mask=t(mask)
    )
    return pos.numpy(), delta.numpy()[:, 0]


def test_rope_index_worked_example():
    """ARCHITECTURE §6.4: [t, t, <vs>, 2×2 image, <ve>, t, t]."""
    ids = np.array([[1, 2, START, IMAGE, IMAGE, IMAGE, IMAGE, END, 3, 4]])
    pos, delta = get_rope_index(jnp.asarray(ids), VISION, jnp.array([[1, 4, 4]]))
    np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2, 3, 3, 3, 3, 5, 6, 7],
                                              [0, 1, 2, 3, 3, 4, 4, 5, 6, 7],
                                              [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]])  # fmt: skip
    assert delta.tolist() == [-2]


@pytest.mark.parametrize("left_pad", [False, True])
def test_rope_index_equals_transformers(hf_vlm, left_pad):
    hf, _ = hf_vlm
    p = Prompt(seed=int(left_pad))
    rows = [
        p.text(3) + p.image(6, 4) + p.text(4) + p.image(2, 8) + p.text(2),  # two images
        p.text(9),  # text only
        p.text(2) + p.video(3, 4, 6) + p.text(1) + p.image(10, 2) + p.text(3),  # video + image
        p.image(4, 4) + p.image(2, 2) + p.video(1, 2, 2),  # back to back, no text between
        p.text(1) + p.video(2, 6, 2),
    ]
    ids, mask, images, videos = p.batch(rows, left_pad=left_pad)
    mask = mask if left_pad else None
    ref_pos, ref_delta = hf_rope_index(hf, ids, images, videos, mask)
    pos, delta = jax.jit(get_rope_index, static_argnums=1)(ids, VISION, images, videos, mask)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)
    # The NumPy walk (host data pipelines) is a second implementation held to the same result.
    host_pos, host_delta = get_rope_index_host(ids, VISION, images, videos, mask)
    np.testing.assert_array_equal(host_pos, ref_pos)
    np.testing.assert_array_equal(host_delta, ref_delta)
    with pytest.raises(ValueError, match="more video runs"):
        get_rope_index_host(ids, VISION, images, videos[:-1], mask)


@pytest.fixture(scope="module")
def model(hf_vlm):
    return load(hf_vlm[1], vision=True)


def test_mixed_batch_matches_transformers(hf_vlm, model):
    """Two images in a row, a text-only row, and a video plus an image in one row."""
    hf, _ = hf_vlm
    p = Prompt(seed=2)
    rows = [
        p.text(3) + p.image(6, 4) + p.text(4) + p.image(2, 8) + p.text(2),
        p.text(30),
        p.text(4) + p.video(3, 4, 6) + p.text(3) + p.image(4, 10) + p.text(2),
    ]
    ids, _, images, videos = p.batch(rows)
    pixels, video_pixels = patches(images, seed=3), patches(videos, seed=4)
    ref = hf_logits(
        hf, ids, pixel_values=pixels, image_grid_thw=images,
        pixel_values_videos=video_pixels, video_grid_thw=videos,
    )  # fmt: skip
    got = model(
        jnp.asarray(ids), pixel_values=jnp.asarray(pixels), image_grid_thw=images,
        pixel_values_videos=jnp.asarray(video_pixels), video_grid_thw=videos,
    )  # fmt: skip
    errors = [rel_err(got[b], ref[b]) for b in range(len(rows))]
    print("images / text / video + image rows:", ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < TOL, errors


def test_text_only_input_equals_the_text_model(hf_vlm, model):
    """Without pixels the VLM is the text model (same parameters, same positions)."""
    ids = jnp.asarray(np.random.default_rng(7).integers(0, 290, (2, 17)))
    text_model = load(hf_vlm[1])
    assert not hasattr(text_model, "visual")
    np.testing.assert_array_equal(model(ids), text_model(ids))


def test_mismatched_inputs_are_refused(model):
    p = Prompt(seed=8)
    ids, _, _, _ = p.batch([p.text(2) + p.image(2, 4)])
    small = np.array([[1, 2, 2]])
    with pytest.raises(ValueError, match=r"lengths \[2\], but the image grids describe 1 images"):
        model(jnp.asarray(ids), pixel_values=jnp.zeros((4, 1536)), image_grid_thw=small)
    with pytest.raises(ValueError, match="both"):
        model(jnp.asarray(ids), pixel_values=jnp.zeros((8, 1536)))
