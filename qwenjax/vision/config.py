"""Vision tower configuration: HF's `vision_config` plus the special token ids of the VLM.

The field names are those of transformers' `Qwen3_5VisionConfig` (`rope_parameters` flattened to
`rope_theta`), and the four token ids come from the top level of the VLM `config.json`, where the
model reads them to find image and video positions in `input_ids`; nothing here hard-codes them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

# transformers' names for the two GELUs the vision MLP may use.
GELU_APPROXIMATE = {"gelu_pytorch_tanh": True, "gelu": False}


class VisionConfigError(ValueError):
    """A vision configuration value is unknown, missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen3.5 / Qwen3.6 ViT hyper-parameters (a Qwen3-VL-style ViT without DeepStack)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 5120
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10_000.0
    layer_norm_eps: float = 1e-6  # hard-coded in transformers, not a config.json key
    image_token_id: int = 248_056
    video_token_id: int = 248_057
    vision_start_token_id: int = 248_053
    vision_end_token_id: int = 248_054

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = [
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "out_hidden_size",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "num_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise VisionConfigError(f"vision {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise VisionConfigError(
                f"vision hidden_size={self.hidden_size} is not a multiple of "
                f"num_heads={self.num_heads}"
            )
        # The 2-D rotary splits half the head into row and column frequencies of 2 dims each.
        if self.head_dim % 4:
            raise VisionConfigError(f"vision head_dim={self.head_dim} must be a multiple of 4")
        if self.grid_side**2 != self.num_position_embeddings:
            raise VisionConfigError(
                f"num_position_embeddings={self.num_position_embeddings} is not a square"
            )
        if self.hidden_act not in GELU_APPROXIMATE:
            raise VisionConfigError(
                f"vision hidden_act={self.hidden_act!r}: supported {sorted(GELU_APPROXIMATE)}"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row of `pixel_values`: C · Tp · P · P (1536 for Qwen3.5)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per LLM token (a merge block of spatial_merge_size²)."""
        return self.spatial_merge_size**2

    @property
    def grid_side(self) -> int:
        """Side of the square learned position table (48 for 2304 entries)."""
        return math.isqrt(self.num_position_embeddings)

    def param_count(self) -> int:
        """Exact number of `model.visual.*` parameters."""
        d, f, m = self.hidden_size, self.intermediate_size, self.merge_unit
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        merger = 2 * d + (m * d) ** 2 + m * d + m * d * self.out_hidden_size + self.out_hidden_size
        patch = self.patch_dim * d + d
        return patch + self.num_position_embeddings * d + self.depth * block + merger

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf(cls, raw: dict, *, strict: bool = True) -> VisionConfig:
        """From a VLM `config.json` dict (its `vision_config` and top-level token ids)."""
        vision = raw.get("vision_config")
        if not isinstance(vision, dict):
            raise VisionConfigError("config.json has no vision_config object")
        unknown = sorted(set(vision) - _HF_VISION_KEYS - _HF_IGNORED_KEYS)
        if unknown:
            message = f"vision_config has keys this version of qwenjax does not know: {unknown}"
            if strict:
                raise VisionConfigError(message + " (pass strict=False to ignore them)")
            warnings.warn(message, stacklevel=2)
        if vision.get("deepstack_visual_indexes"):
            raise VisionConfigError(
                "deepstack_visual_indexes is not empty: DeepStack (Qwen3-VL) is not supported"
            )
        kwargs: dict[str, Any] = {k: vision[k] for k in _FIELDS & set(vision)}
        for key in ("patch_size", "temporal_patch_size"):  # HF allows [n, n]
            value = kwargs.get(key)
            if isinstance(value, list | tuple):
                if len(set(value)) != 1:
                    raise VisionConfigError(f"vision {key}={value}: only square patches")
                kwargs[key] = int(value[0])
        rope = vision.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise VisionConfigError(f"vision rope_type {rope['rope_type']!r}: only 'axial'")
        if "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        for key in _TOKEN_KEYS:
            if key in raw:
                kwargs[key] = raw[key]
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise VisionConfigError(f"vision_config: {e}") from e

    def to_hf(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(`vision_config` dict, top-level token-id entries) of a VLM `config.json`."""
        vision = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("rope_theta", "layer_norm_eps", *_TOKEN_KEYS)
        }
        vision["model_type"] = "qwen3_5_vision"
        vision["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "axial"}
        return vision, {k: getattr(self, k) for k in _TOKEN_KEYS}

    def replace(self, **changes: Any) -> VisionConfig:
        return dataclasses.replace(self, **changes)


_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)} - {"layer_norm_eps", *_TOKEN_KEYS}
_HF_VISION_KEYS = _FIELDS | {"rope_parameters", "deepstack_visual_indexes"}
_HF_IGNORED_KEYS = {
    "model_type", "initializer_range", "transformers_version", "architectures", "dtype",
    "torch_dtype", "_name_or_path", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "base_config_key",
}  # fmt: skip


def qwen3_6_27b() -> VisionConfig:
    """The vision tower of Qwen/Qwen3.6-27B (and Qwen3.5-27B), as published."""
    return VisionConfig()
