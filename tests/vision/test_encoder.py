"""The vision tower alone against transformers' `Qwen3_5VisionModel` (fp32, ≤ 1e-5 relative).

Grids are chosen to cover: a non-square image, several images in one call, a grid larger than
the 5×5 learned position table on one side and smaller on the other, and a two-frame video
(attention must stay within each frame).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenjax.checkpoint import load
from qwenjax.vision.encoder import patch_layout
from tests.conftest import rel_err

TOL = 1e-5
GRIDS = {
    "one image": [[1, 6, 4]],
    "images and a video": [[1, 2, 8], [1, 10, 6], [2, 4, 4]],
}


@pytest.fixture(scope="module")
def models(hf_vlm):
    hf, path = hf_vlm
    return hf, load(path, vision=True)


def hf_tower(hf, pixel_values: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = hf.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def random_patches(grid: np.ndarray, seed: int) -> np.ndarray:
    n = int(grid.prod(axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, 1536)).astype(np.float32)


@pytest.mark.parametrize("case", GRIDS)
def test_vision_tower_matches_transformers(models, case):
    hf, model = models
    grid = np.array(GRIDS[case])
    pixel_values = random_patches(grid, seed=len(case))
    ref_features, ref_tokens = hf_tower(hf, pixel_values, grid)
    features = model.visual.features(jnp.asarray(pixel_values), jnp.asarray(grid))
    tokens = model.visual(jnp.asarray(pixel_values), jnp.asarray(grid))
    assert tokens.shape == (len(pixel_values) // 4, 80)
    errors = rel_err(features, ref_features), rel_err(tokens, ref_tokens)
    print(f"{case}: blocks {errors[0]:.1e}, merged {errors[1]:.1e}")
    assert max(errors) < TOL, errors


def test_jitted_tower_compiles_once_per_patch_count(models):
    """Grids are data: three image shapes with 24 patches share one compilation."""
    hf, model = models
    graphdef, state = nnx.split(model.visual)
    traces = []

    @jax.jit
    def tower(state, pixel_values, grid):
        traces.append(None)
        return nnx.merge(graphdef, state)(pixel_values, grid)

    for i, grid in enumerate(([[1, 4, 6]], [[1, 6, 4]], [[1, 2, 12]])):
        grid = np.array(grid)
        pixel_values = random_patches(grid, seed=10 + i)
        got = tower(state, jnp.asarray(pixel_values), jnp.asarray(grid))
        assert rel_err(got, hf_tower(hf, pixel_values, grid)[1]) < TOL
    assert len(traces) == 1


def test_patch_layout_is_merge_block_order():
    layout = patch_layout(jnp.array([[1, 2, 4], [2, 2, 2]]), 16, 2)
    # image 1 (2×4): block (0,0) then block (0,1); each block row-major 2×2
    np.testing.assert_array_equal(layout["row"][:8], [0, 0, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(layout["col"][:8], [0, 1, 0, 1, 2, 3, 2, 3])
    # every frame is its own attention segment: image 1, then the video's two frames
    np.testing.assert_array_equal(layout["frame"], [0] * 8 + [1] * 4 + [2] * 4)


def test_wrong_grid_is_refused(models):
    _, model = models
    with pytest.raises(ValueError, match="describes 24 patches but pixel_values has 20 rows"):
        model.visual(jnp.zeros((20, 1536)), jnp.array([[1, 4, 6]]))
    with pytest.raises(ValueError, match="multiples of the merge size"):
        model.visual(jnp.zeros((15, 1536)), jnp.array([[1, 3, 5]]))
