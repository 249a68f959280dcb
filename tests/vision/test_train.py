"""Fine-tuning on image and video rows: the loss equals transformers' (`labels` → its
`ForCausalLMLoss`, fp32, ≤ 1e-5 relative), and a train step runs on it with the vision tower
frozen (its parameters unchanged, the language model's updated).

The batch is built by hand (the data pipeline's batches: tests/vision/test_train_data.py): one
row with an image, one with a video, the loss on each row's last tokens (its "answer").
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.checkpoint import load
from qwenjax.train.loss import loss_fn
from qwenjax.train.optim import OptimConfig
from qwenjax.train.step import init_train_state, jit_train_step, make_train_step
from qwenjax.vision.rope_index import get_rope_index
from tests.vision.conftest import IMAGE, VIDEO, Prompt, patches

TOL = 1e-5
ANSWER = 9  # trained tokens at the end of each row


@pytest.fixture(scope="module")
def example(hf_vlm):
    """(batch, transformers loss) for an image row and a video row of equal length (38)."""
    hf, path = hf_vlm
    model = load(path, vision=True)
    p = Prompt(seed=31)
    rows = [
        p.text(8) + p.image(6, 10) + p.text(4 + ANSWER),
        p.text(3) + p.video(2, 4, 6) + p.text(2 + ANSWER),
    ]
    assert len(rows[0]) == len(rows[1])
    ids, _, images, videos = p.batch(rows)
    vision = {
        "pixel_values": patches(images, seed=32),
        "image_grid_thw": images,
        "pixel_values_videos": patches(videos, seed=33),
        "video_grid_thw": videos,
    }
    mask = np.zeros(ids.shape, np.int32)
    mask[:, -ANSWER:] = 1
    positions, _ = get_rope_index(ids, model.config.vision, images, videos)
    batch = {
        "input_ids": ids.astype(np.int32),
        "segment_ids": np.zeros(ids.shape, np.int32),
        "positions": np.asarray(positions),
        "loss_mask": mask,
        **vision,
    }
    kinds = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(ids),
            mm_token_type_ids=torch.from_numpy(kinds),
            labels=torch.from_numpy(np.where(mask == 1, ids, -100)),
            **{k: torch.from_numpy(v) for k, v in vision.items()},
        )
    return model, batch, float(out.loss)


def test_loss_equals_transformers(example):
    model, batch, want = example
    loss, metrics = nnx.jit(lambda m, b: loss_fn(m, b, mtp_weight=0.1, ce_chunk=16))(model, batch)
    assert int(metrics["tokens"]) == 2 * ANSWER
    err = abs(float(metrics["ce_loss"]) - want) / want
    print(f"ce loss {float(metrics['ce_loss']):.6f} vs transformers {want:.6f}: {err:.1e}")
    assert err < TOL
    assert float(loss) == pytest.approx(want + 0.1 * float(metrics["mtp_loss"]), rel=1e-6)


def test_train_step_keeps_the_vision_tower_frozen(example):
    model, batch, want = example
    before = jax.tree.map(np.asarray, nnx.state(model))
    mesh = ax.make_mesh(ax.MeshConfig(fsdp=1), devices=jax.devices()[:1])
    optim = OptimConfig(lr=1e-3, warmup_steps=1, total_steps=4)
    state, shardings = init_train_state(model, optim, mesh, ax.FSDP_RULES)
    assert "visual" not in state.params and "visual" in state.frozen
    step = make_train_step(model, optim, mtp_weight=0.0, ce_chunk=16)
    step = jit_train_step(step, mesh, ax.FSDP_RULES, shardings)
    one_micro_batch = {k: v[None] for k, v in batch.items()}
    state, metrics = step(state, one_micro_batch)
    assert abs(float(metrics["loss"]) - want) / want < TOL  # the loss before the update
    visual = jax.tree.map(np.asarray, state.frozen["visual"])
    jax.tree.map(np.testing.assert_array_equal, visual, before["visual"])
    embed = np.asarray(state.params["embed_tokens"][...])
    assert not np.array_equal(embed, before["embed_tokens"])
