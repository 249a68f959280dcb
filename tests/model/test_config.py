"""ModelConfig: presets, both config.json layouts, exact parameter counts, clear errors."""

from __future__ import annotations

import json

import pytest

import qwenjax
from qwenjax.config import ConfigError, ModelConfig


def test_27b_preset_matches_published_counts():
    config = ModelConfig.from_preset("qwen3.6-27b")
    assert config.block_pattern == ("linear_attention",) * 3 + ("full_attention",)
    assert config.num_blocks == 16
    assert config.param_count() == 26_895_998_464
    assert config.param_count(include_mtp=True) - config.param_count() == 424_699_392


def test_abstract_27b_model_has_the_exact_parameter_count():
    model = qwenjax.build(ModelConfig.from_preset("qwen3.6-27b"), abstract=True)
    assert qwenjax.param_count(model, include_mtp=False) == 26_895_998_464
    assert qwenjax.param_count(model) - qwenjax.param_count(model, include_mtp=False) == 424_699_392


@pytest.mark.parametrize("layout", ["text", "vlm"])
def test_from_hf_reads_both_layouts(hf_checkpoint, layout):
    hf, path = hf_checkpoint(layout)
    config = ModelConfig.from_hf(path)
    text = hf.config.get_text_config()
    assert config.hidden_size == text.hidden_size
    assert config.layer_types == tuple(text.layer_types)
    assert config.mrope_section == tuple(text.rope_parameters["mrope_section"])
    assert config.mtp_num_hidden_layers == 1
    assert config.linear_num_value_heads == text.linear_num_value_heads


def test_to_hf_round_trips():
    config = ModelConfig.from_preset("qwen3.6-27b")
    assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config


def test_full_attention_interval_builds_layer_types():
    raw = ModelConfig.from_preset("tiny").to_hf()
    del raw["layer_types"]
    raw["full_attention_interval"] = 2
    assert ModelConfig.from_hf(raw).layer_types == ("linear_attention", "full_attention") * 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"linear_num_value_heads": 7}, "not a multiple of linear_num_key_heads"),
        ({"layer_types": ["linear_attention"] * 7 + ["sliding_attention"]}, "unknown layer type"),
        ({"num_hidden_layers": 6}, "layer_types has 8 entries"),
        ({"head_dim": 30}, "even integer"),
        ({"hidden_size": 0}, "positive integer"),
    ],
)
def test_inconsistent_values_raise(change, message):
    raw = ModelConfig.from_preset("tiny").to_hf() | change
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(raw)


def test_unknown_keys_raise_unless_not_strict():
    raw = ModelConfig.from_preset("tiny").to_hf() | {"moe_experts": 8}
    with pytest.raises(ConfigError, match="moe_experts"):
        ModelConfig.from_hf(raw)
    with pytest.warns(UserWarning, match="moe_experts"):
        assert ModelConfig.from_hf(raw, strict=False) == ModelConfig.from_preset("tiny")


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("qwen9")
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelConfig.from_hf(tmp_path)
