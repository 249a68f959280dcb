"""Model configuration: a frozen dataclass, presets, and the Hugging Face `config.json` reader.

The field names are those of the HF `Qwen3_5TextConfig`, flattened: `rope_parameters` becomes
`rope_theta`, `partial_rotary_factor`, `mrope_section`, `mrope_interleaved` and an optional
`yarn` block. Everything derived (rotary dim, the scanned super-block pattern, parameter counts)
is a property, so a config never carries two copies of one fact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

from qwenjax.vision.config import VisionConfig

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)


class ConfigError(ValueError):
    """A configuration value is unknown, missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """Static YaRN context extension (HF `rope_type="yarn"`), applied to the rotary dims only."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None  # None: 0.1·ln(factor) + 1, as HF computes it


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Text model hyper-parameters (Qwen3.5 / Qwen3.6 hybrid: Gated DeltaNet + gated attention)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    mrope_interleaved: bool = True
    yarn: YarnScaling | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262_144
    tie_word_embeddings: bool = False
    mtp_num_hidden_layers: int = 0
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # The vision tower and the image/video token ids (VLM checkpoints only); the text model
    # ignores it, `build(..., vision=True)` adds the tower.
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.yarn, dict):
            object.__setattr__(self, "yarn", YarnScaling(**self.yarn))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the first inconsistent field."""
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ConfigError(f"unknown layer type(s) {unknown}; known: {list(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}"
            )
        rotary = self.head_dim * self.partial_rotary_factor
        if rotary != int(rotary) or int(rotary) % 2 or not 0 < rotary <= self.head_dim:
            raise ConfigError(
                f"head_dim * partial_rotary_factor = {rotary} must be an even integer in "
                f"(0, head_dim={self.head_dim}]"
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.rotary_dim // 2:
            raise ConfigError(
                f"mrope_section {list(self.mrope_section)} must have 3 entries summing to "
                f"rotary_dim/2 = {self.rotary_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.mtp_num_hidden_layers not in (0, 1):
            raise ConfigError(
                f"mtp_num_hidden_layers={self.mtp_num_hidden_layers}: 0 or 1 are supported"
            )
        if self.yarn is not None and self.yarn.factor < 1:
            raise ConfigError(f"yarn.factor must be >= 1, got {self.yarn.factor}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.vision is not None and self.vision.out_hidden_size != self.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size={self.vision.out_hidden_size} != hidden_size="
                f"{self.hidden_size}: the merger must output the text width"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def block_pattern(self) -> tuple[str, ...]:
        """The shortest run of layer types that repeats to give `layer_types` (the scan unit)."""
        n = self.num_hidden_layers
        for period in range(1, n + 1):
            if n % period == 0 and self.layer_types == self.layer_types[:period] * (n // period):
                return self.layer_types[:period]
        raise AssertionError("unreachable: the full sequence is always a period")

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers // len(self.block_pattern)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    def param_count(self, *, include_mtp: bool = False) -> int:
        """Exact number of text-model parameters (HF layout), optionally with the MTP block."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv, hd = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * 2 * q * hd + 2 * d * kv * hd + q * hd * d + 2 * hd
        gdn = (
            d * self.conv_dim
            + d * self.linear_value_dim
            + 2 * d * self.linear_num_value_heads
            + self.conv_dim * self.linear_conv_kernel_dim
            + 2 * self.linear_num_value_heads
            + self.linear_value_head_dim
            + self.linear_value_dim * d
        )
        layer_common = 3 * d * f + 2 * d  # MLP + the two pre-norms
        layers = sum(
            layer_common + (gdn if t == LINEAR_ATTENTION else attn) for t in self.layer_types
        )
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        total = self.vocab_size * d + head + d + layers
        if include_mtp:
            total += self.mtp_num_hidden_layers * (2 * d * d + 3 * d + layer_common + attn)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (fwd + bwd = 6·matmul params + attention), as in MFU reports."""
        matmul_params = self.param_count() - self.vocab_size * self.hidden_size
        n_attn = self.layer_types.count(FULL_ATTENTION)
        attn = 12 * n_attn * self.num_attention_heads * self.head_dim * seq_len / 2
        return 6.0 * matmul_params + attn

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        """A named preset: `qwen3.6-27b`, `qwen3.5-27b`, `tiny`."""
        try:
            return PRESETS[name]()
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, *, strict: bool = True) -> ModelConfig:
        """Read a HF `config.json` (a checkpoint directory, the file, or its parsed dict).

        Both layouts are accepted: text-only (`model_type="qwen3_5_text"`) and the VLM
        (`model_type="qwen3_5"` with the text fields under `text_config`; its `vision_config` and
        image/video token ids become `vision`). Keys this port does not know raise a
        `ConfigError` listing them (pass `strict=False` to only warn).
        """
        raw = _read_json(path_or_dict)
        text = raw.get("text_config", raw)
        if "text_config" in raw and not isinstance(text, dict):
            raise ConfigError("config.json: text_config must be an object")
        unknown = sorted(set(text) - _HF_TEXT_KEYS - _HF_IGNORED_KEYS)
        if unknown:
            message = f"config.json has keys this version of qwenjax does not know: {unknown}"
            if strict:
                raise ConfigError(message + " (pass strict=False to ignore them)")
            warnings.warn(message, stacklevel=2)
        missing = sorted(k for k in _HF_REQUIRED_KEYS if k not in text)
        if missing:
            raise ConfigError(f"config.json is missing required key(s) {missing}")
        kwargs: dict[str, Any] = {k: text[k] for k in _HF_TEXT_KEYS & set(text) if k in _FIELDS}
        if text.get("layer_types") is None:
            interval = text.get("full_attention_interval", 4)
            kwargs["layer_types"] = tuple(
                FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION
                for i in range(text["num_hidden_layers"])
            )
        kwargs.update(_rope_from_hf(text))
        if "tie_word_embeddings" in raw and "text_config" in raw:
            kwargs["tie_word_embeddings"] = raw["tie_word_embeddings"]
        if "vision_config" in raw:
            try:
                kwargs["vision"] = VisionConfig.from_hf(raw, strict=strict)
            except ValueError as e:
                raise ConfigError(f"config.json: {e}") from e
        try:
            return cls(**kwargs)
        except TypeError as e:  # wrong value types surface here
            raise ConfigError(f"config.json: {e}") from e

    def to_hf(self) -> dict[str, Any]:
        """The HF text `config.json` dict (`model_type="qwen3_5_text"`) for this config.

        Text only: `vision` is not written (a text checkpoint has no vision tower).
        """
        out: dict[str, Any] = {
            "architectures": ["Qwen3_5ForCausalLM"],
            "model_type": "qwen3_5_text",
        }
        for field in dataclasses.fields(self):
            if field.name in ("yarn", "rope_theta", "partial_rotary_factor", "mrope_section"):
                continue
            if field.name == "vision":
                continue
            if field.name == "mrope_interleaved":
                continue
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        rope: dict[str, Any] = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "mrope_section": list(self.mrope_section),
            "mrope_interleaved": self.mrope_interleaved,
        }
        if self.yarn is not None:
            y = self.yarn
            rope.update(
                rope_type="yarn",
                factor=y.factor,
                original_max_position_embeddings=y.original_max_position_embeddings,
                beta_fast=y.beta_fast,
                beta_slow=y.beta_slow,
                truncate=y.truncate,
            )
            if y.attention_factor is not None:
                rope["attention_factor"] = y.attention_factor
        out["rope_parameters"] = rope
        out["partial_rotary_factor"] = self.partial_rotary_factor
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_HF_TEXT_KEYS = (
    _FIELDS - {"yarn", "rope_theta", "mrope_section", "mrope_interleaved", "vision"}
) | {
    "rope_parameters",
    "rope_scaling",
    "full_attention_interval",
}
_HF_REQUIRED_KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
]
# Keys HF writes into every config.json, plus Qwen3.5 keys that change nothing in this port
# (attn_output_gate is always on for Qwen3.5; the state dtype is fp32 by policy).
_HF_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "initializer_range", "use_cache", "attention_bias", "attention_dropout", "attn_output_gate",
    "output_gate_type", "mamba_ssm_dtype", "mtp_use_dedicated_embeddings", "_name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
    "add_cross_attention", "cross_attention_hidden_size", "decoder_start_token_id",
    "sep_token_id", "task_specific_params", "finetuning_task", "prefix", "is_decoder",
    "tie_encoder_decoder", "pruned_heads", "torchscript", "use_bfloat16", "base_config_key",
    "default_theta", "head_dim_override", "layer_norm_epsilon", "router_aux_loss_coef",
}  # fmt: skip


def _read_json(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"no config.json at {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _rope_from_hf(text: dict) -> dict[str, Any]:
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    out: dict[str, Any] = {}
    out["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", 10_000_000.0)))
    out["partial_rotary_factor"] = float(
        rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    )
    if "mrope_section" in rope:
        out["mrope_section"] = tuple(rope["mrope_section"])
    out["mrope_interleaved"] = bool(rope.get("mrope_interleaved", True))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        out["yarn"] = YarnScaling(
            factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast") or 32.0),
            beta_slow=float(rope.get("beta_slow") or 1.0),
            truncate=bool(rope.get("truncate", True)),
            attention_factor=rope.get("attention_factor"),
        )
    elif rope_type != "default":
        raise ConfigError(f"rope_type {rope_type!r} is not supported (default or yarn)")
    return out


# ---------------------------------------------------------------------- presets
def qwen3_6_27b() -> ModelConfig:
    """Qwen/Qwen3.6-27B text model, as published (`text_config` of its config.json)."""
    return ModelConfig(
        vocab_size=248_320,
        hidden_size=5120,
        intermediate_size=17_408,
        num_hidden_layers=64,
        layer_types=((LINEAR_ATTENTION,) * 3 + (FULL_ATTENTION,)) * 16,
        num_attention_heads=24,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=48,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        rope_theta=10_000_000.0,
        partial_rotary_factor=0.25,
        mrope_section=(11, 11, 10),
        rms_norm_eps=1e-6,
        max_position_embeddings=262_144,
        mtp_num_hidden_layers=1,
        bos_token_id=248_044,
        eos_token_id=248_044,
    )


def qwen3_5_27b() -> ModelConfig:
    """Qwen/Qwen3.5-27B: the same text architecture as Qwen3.6-27B (only the template differs)."""
    return qwen3_6_27b()


def tiny() -> ModelConfig:
    """A small hybrid model (2 super-blocks) for tests, the demo and laptops."""
    return ModelConfig(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=8,
        layer_types=((LINEAR_ATTENTION,) * 3 + (FULL_ATTENTION,)) * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=6,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        mrope_section=(2, 1, 1),
        max_position_embeddings=4096,
        mtp_num_hidden_layers=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def with_yarn(config: ModelConfig, factor: float = 4.0) -> ModelConfig:
    """The model cards' static-YaRN recipe for ~1M context (factor 4 over 262,144 tokens)."""
    return config.replace(
        yarn=YarnScaling(factor=factor, original_max_position_embeddings=262_144),
        max_position_embeddings=math.ceil(262_144 * factor),
    )


PRESETS = {"qwen3.6-27b": qwen3_6_27b, "qwen3.5-27b": qwen3_5_27b, "tiny": tiny}
