"""Tiny random transformers Qwen3.5 models (torch, CPU) used as the parity reference.

Every parameter, 1-D ones included, is randomised: zero-initialised norms would hide bugs.
Sizes are deliberately not powers of two.
"""

from __future__ import annotations

import torch
import transformers

TEXT_KW = dict(
    vocab_size=331,
    hidden_size=80,
    intermediate_size=112,
    num_hidden_layers=8,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=24,
    linear_num_key_heads=2,
    linear_num_value_heads=6,
    linear_key_head_dim=12,
    linear_value_head_dim=20,
    linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 1e7,
        "partial_rotary_factor": 0.25,
        "mrope_section": [1, 1, 1],
        "mrope_interleaved": True,
    },
)
VISION_KW = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    num_position_embeddings=16,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with random values of a realistic scale (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 15.99 + 0.01))
            elif p.ndim == 1:
                p.copy_(
                    0.3 * torch.randn(p.shape, generator=g)
                    + (1.0 if "norm" in name and "linear_attn" in name else 0.0)
                )
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def text_config(**overrides) -> transformers.Qwen3_5TextConfig:
    return transformers.Qwen3_5TextConfig(**{**TEXT_KW, **overrides})


def make_hf_model(layout: str = "text", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random fp32 `Qwen3_5ForCausalLM` ("text") or `Qwen3_5ForConditionalGeneration` ("vlm")."""
    torch.manual_seed(seed)
    if layout == "text":
        model = transformers.Qwen3_5ForCausalLM(text_config(**overrides))
    elif layout == "vlm":
        cfg = transformers.Qwen3_5Config(
            text_config=TEXT_KW | overrides,
            vision_config={**VISION_KW, "out_hidden_size": {**TEXT_KW, **overrides}["hidden_size"]},
        )
        model = transformers.Qwen3_5ForConditionalGeneration(cfg)
    else:
        raise ValueError(layout)
    return randomize_(model.float().eval(), seed)


def mtp_state_dict(config, seed: int) -> dict[str, torch.Tensor]:
    """Random `mtp.*` tensors in the published layout (transformers builds no MTP module)."""
    g = torch.Generator().manual_seed(seed + 1000)
    d, f = config.hidden_size, config.intermediate_size
    n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {
        "mtp.fc.weight": (d, 2 * d),
        "mtp.pre_fc_norm_embedding.weight": (d,),
        "mtp.pre_fc_norm_hidden.weight": (d,),
        "mtp.norm.weight": (d,),
        "mtp.layers.0.input_layernorm.weight": (d,),
        "mtp.layers.0.post_attention_layernorm.weight": (d,),
        "mtp.layers.0.self_attn.q_proj.weight": (2 * n * h, d),
        "mtp.layers.0.self_attn.k_proj.weight": (k * h, d),
        "mtp.layers.0.self_attn.v_proj.weight": (k * h, d),
        "mtp.layers.0.self_attn.o_proj.weight": (d, n * h),
        "mtp.layers.0.self_attn.q_norm.weight": (h,),
        "mtp.layers.0.self_attn.k_norm.weight": (h,),
        "mtp.layers.0.mlp.gate_proj.weight": (f, d),
        "mtp.layers.0.mlp.up_proj.weight": (f, d),
        "mtp.layers.0.mlp.down_proj.weight": (d, f),
    }
    scale = lambda s: 0.3 if len(s) == 1 else 0.05
    return {k: scale(s) * torch.randn(s, generator=g) for k, s in shapes.items()}


def save_hf_checkpoint(model, path, *, with_mtp: bool = True, seed: int = 0, max_shard_size="50KB"):
    """`save_pretrained` (several shards by default) plus the `mtp.*` tensors in their own shard."""
    import json
    import os

    from safetensors.torch import save_file

    model.save_pretrained(path, max_shard_size=max_shard_size)
    if not with_mtp:
        return
    text_cfg = model.config.get_text_config()
    dtype = next(model.parameters()).dtype
    mtp = {k: v.to(dtype) for k, v in mtp_state_dict(text_cfg, seed).items()}
    save_file({k: v.contiguous() for k, v in mtp.items()}, os.path.join(path, "mtp.safetensors"))
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    else:  # single-file checkpoint: make an index so both files are found
        index = {"metadata": {}, "weight_map": {}}
        from safetensors import safe_open

        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            index["weight_map"] = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    target = cfg.get("text_config", cfg)
    target["mtp_num_hidden_layers"] = 1
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
