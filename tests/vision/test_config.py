"""VisionConfig: read from the VLM config.json, exact parameter counts, clear errors."""

from __future__ import annotations

import json

import pytest

import qwenjax
from qwenjax.config import ConfigError, ModelConfig
from qwenjax.vision.config import VisionConfig, qwen3_6_27b
from tests.vision.conftest import TOKEN_IDS, VISION_KW


def test_from_hf_reads_the_vision_config_and_token_ids(hf_vlm):
    hf, path = hf_vlm
    config = ModelConfig.from_hf(path)
    assert config.vision == VisionConfig(**VISION_KW, **TOKEN_IDS, out_hidden_size=80)
    assert config.vision.param_count() == sum(
        p.numel() for p in hf.model.visual.parameters()
    )  # fmt: skip


def test_text_layout_has_no_vision(hf_checkpoint):
    _, path = hf_checkpoint("text")
    assert ModelConfig.from_hf(path).vision is None
    raw = ModelConfig.from_preset("tiny").to_hf()
    assert "vision" not in raw and "vision_config" not in raw


def test_27b_counts_match_the_published_checkpoint():
    assert qwen3_6_27b().param_count() == 460_730_096
    config = ModelConfig.from_preset("qwen3.6-27b").replace(vision=qwen3_6_27b())
    model = qwenjax.build(config, abstract=True, vision=True)
    assert qwenjax.param_count(model) == 27_781_427_952  # text + MTP + vision


def test_published_vision_config_parses():
    """The Qwen3.6-27B file: the old model_type and an empty deepstack list (ARCHITECTURE §1.1)."""
    raw = {
        "vision_config": {
            "depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 5120,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [],
            "initializer_range": 0.02, "model_type": "qwen3_5",
        },
        "image_token_id": 248056, "video_token_id": 248057,
        "vision_start_token_id": 248053, "vision_end_token_id": 248054,
    }  # fmt: skip
    assert VisionConfig.from_hf(raw) == qwen3_6_27b()
    vision, tokens = qwen3_6_27b().to_hf()
    assert VisionConfig.from_hf(json.loads(json.dumps({"vision_config": vision, **tokens}))) == (
        qwen3_6_27b()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"deepstack_visual_indexes": [8, 16]}, "DeepStack"),
        ({"num_position_embeddings": 2300}, "not a square"),
        ({"num_heads": 3}, "not a multiple of num_heads"),
        ({"num_heads": 4}, "head_dim=10 must be a multiple of 4"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"window_size": 112}, "does not know"),
        ({"out_hidden_size": 4096}, "text width"),
    ],
)
def test_bad_vision_configs_are_refused(hf_vlm, change, message):
    raw = json.loads((hf_vlm[1] / "config.json").read_text())
    raw["vision_config"].update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(raw)
