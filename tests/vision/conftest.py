"""A tiny random `Qwen3_5ForConditionalGeneration` whose image/video token ids are in its vocab.

The shared `hf_checkpoint("vlm")` model keeps the published ids (248056, …), far outside its
331-token vocab, so transformers cannot embed them; this one uses ids 300–303 and a vision tower
of odd sizes (3 blocks, width 40, head dim 20, a 5×5 position table).
"""

from __future__ import annotations

import pytest
import transformers

from tests.hf_models import TEXT_KW, randomize_, save_hf_checkpoint

VISION_KW = dict(
    depth=3,
    hidden_size=40,
    intermediate_size=56,
    num_heads=2,
    num_position_embeddings=25,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
TOKEN_IDS = dict(
    image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303
)


def make_vlm(seed: int = 0):
    cfg = transformers.Qwen3_5Config(
        text_config=TEXT_KW,
        vision_config={**VISION_KW, "out_hidden_size": TEXT_KW["hidden_size"]},
        **TOKEN_IDS,
    )
    model = transformers.Qwen3_5ForConditionalGeneration(cfg)
    return randomize_(model.float().eval(), seed)


@pytest.fixture(scope="session")
def hf_vlm(tmp_path_factory):
    """(transformers VLM, its checkpoint directory with config + shards + mtp.*)."""
    model = make_vlm()
    path = tmp_path_factory.mktemp("hf_vlm_vision")
    save_hf_checkpoint(model, path)
    return model, path
