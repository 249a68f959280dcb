"""The Hugging Face ⇄ qwenjax parameter table.

Every qwenjax parameter (a path in the NNX state) maps to one HF tensor, or — for the scanned
blocks (text super-blocks and ViT blocks), whose parameters carry a leading `[num_blocks]`
axis — to one HF tensor per block. Five transforms cover all tensors:

* `copy`:   same array (embeddings, norm weights, biases, A_log, dt_bias).
* `linear`: HF `nn.Linear` weight `[out, in]` ⇄ our kernel `[in dims..., out dims...]`
            (`W.T` reshaped; `n_in` of our leading axes are the input).
* `conv`:   HF depthwise `Conv1d` weight `[C, 1, W]` ⇄ our `[W, C]`.
* `patch`:  HF patch-embedding `Conv3d` weight `[D, C, Tp, P, P]` ⇄ our `[C, Tp, P, P, D]`.
* `flat`:   HF 1-D tensor ⇄ ours reshaped (the ViT qkv bias `[3·N·H]` ⇄ `[3, N, H]`).

HF prefixes: the text-only layout (`Qwen3_5ForCausalLM`) uses `model.`; the VLM layout
(`Qwen3_5ForConditionalGeneration`) uses `model.language_model.`; `lm_head.` and `mtp.` are
top-level in both. The vision tower (`visual` in our state) is `model.visual.*`; our names
mirror HF's (`kernel` ⇄ `weight`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from qwenjax.config import LINEAR_ATTENTION, ModelConfig

TEXT_PREFIX = "model."
VLM_PREFIX = "model.language_model."
VISUAL_PREFIX = "model.visual."
MIXER_NAMES = {LINEAR_ATTENTION: "linear_attn", "full_attention": "self_attn"}
# Our output projections take two input axes ([heads, head_dim]); every other kernel takes one.
TWO_INPUT_AXES = {"o_proj", "out_proj"}
# The ViT kernels reading [heads, head_dim] and [4 merged patches, D].
VISUAL_TWO_INPUT_AXES = {("attn", "proj", "kernel"), ("merger", "linear_fc1", "kernel")}
BARE_HF_PARAMS = {"A_log", "dt_bias"}  # HF nn.Parameters without a ".weight" suffix


@dataclasses.dataclass(frozen=True)
class Entry:
    """One qwenjax parameter and the HF tensor(s) it is made of."""

    path: tuple[str | int, ...]  # path in the NNX Param state
    hf_keys: tuple[str, ...]  # one key, or one per stacked block (in block order)
    shape: tuple[int, ...]  # our shape, including the block axis when stacked
    kind: str  # "copy" | "linear" | "conv" | "patch" | "flat"
    n_in: int = 1

    @property
    def stacked(self) -> bool:
        return is_stacked(self.path)

    @property
    def our_slice_shape(self) -> tuple[int, ...]:
        """Our shape of the part that one HF tensor fills."""
        return self.shape[1:] if self.stacked else self.shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        s = self.our_slice_shape
        if self.kind == "linear":
            return (math.prod(s[self.n_in :]), math.prod(s[: self.n_in]))
        if self.kind == "conv":
            return (s[1], 1, s[0])
        if self.kind == "patch":
            return (s[-1], *s[:-1])
        if self.kind == "flat":
            return (math.prod(s),)
        return s

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        """HF tensor → our slice (a view where possible; the caller copies into place)."""
        if self.kind == "linear":
            return w.T.reshape(self.our_slice_shape)
        if self.kind == "conv":
            return w[:, 0, :].T
        if self.kind == "patch":
            return np.moveaxis(w, 0, -1)
        if self.kind == "flat":
            return w.reshape(self.our_slice_shape)
        return w

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        """Our slice → HF tensor (C-contiguous, ready to write)."""
        s = self.our_slice_shape
        if self.kind == "linear":
            w = w.reshape(math.prod(s[: self.n_in]), math.prod(s[self.n_in :])).T
        elif self.kind == "conv":
            w = w.T[:, None, :]
        elif self.kind == "patch":
            w = np.moveaxis(w, -1, 0)
        elif self.kind == "flat":
            w = w.reshape(-1)
        return np.ascontiguousarray(w)


def is_stacked(path: Sequence[str | int]) -> bool:
    """A scanned parameter with a leading block axis: text super-blocks or ViT blocks."""
    return path[0] == "blocks" or tuple(path[:2]) == ("visual", "blocks")


def _hf_local_name(sub: Sequence[str | int], layer_type: str) -> str:
    """Name inside a decoder layer: ('mixer', 'q_norm', 'weight') → 'self_attn.q_norm.weight'."""
    names = [MIXER_NAMES[layer_type] if p == "mixer" else str(p) for p in sub]
    if names[-1] != "weight" and names[-1] not in BARE_HF_PARAMS:
        names.append("weight")
    return ".".join(names)


def _kind(path: Sequence[str | int], ndim: int) -> tuple[str, int]:
    if path[0] == "visual":
        return _visual_kind(path, ndim)
    leaf = str(path[-1])
    if leaf == "conv1d":
        return "conv", 1
    if leaf == "embed_tokens" or ndim == 1:
        return "copy", 1
    return "linear", 2 if leaf in TWO_INPUT_AXES else 1


def _visual_kind(path: Sequence[str | int], ndim: int) -> tuple[str, int]:
    names = tuple(map(str, path[1:]))
    if names == ("patch_embed", "kernel"):
        return "patch", 1
    if names[-2:] == ("qkv", "bias"):
        return "flat", 1
    if ndim == 1 or names == ("pos_embed",):
        return "copy", 1
    return "linear", 2 if names[-3:] in VISUAL_TWO_INPUT_AXES else 1


def _visual_keys(path: Sequence[str | int], config: ModelConfig) -> tuple[str, ...]:
    """('visual', 'blocks', 'attn', 'qkv', 'kernel') → model.visual.blocks.{i}.attn.qkv.weight."""
    names = ["weight" if p == "kernel" else str(p) for p in path[1:]]
    if names[0] == "patch_embed":  # HF wraps the Conv3d as patch_embed.proj
        names.insert(1, "proj")
    if names[-1] not in ("weight", "bias"):  # a bare table: pos_embed
        names.append("weight")
    if names[0] == "blocks":
        if config.vision is None:
            raise ValueError("visual parameters need a config with a vision tower")
        local = ".".join(names[1:])
        return tuple(f"{VISUAL_PREFIX}blocks.{i}.{local}" for i in range(config.vision.depth))
    return (VISUAL_PREFIX + ".".join(names),)


def hf_keys_for(path: Sequence[str | int], config: ModelConfig, prefix: str) -> tuple[str, ...]:
    """The HF key(s) of one of our parameter paths."""
    head = path[0]
    if head == "visual":
        return _visual_keys(path, config)
    if head == "blocks":  # ('blocks', 'layers', j, *sub): layer b·P + j of every block b
        j, sub = int(path[2]), path[3:]
        pattern = config.block_pattern
        local = _hf_local_name(sub, pattern[j])
        return tuple(
            f"{prefix}layers.{b * len(pattern) + j}.{local}" for b in range(config.num_blocks)
        )
    if head == "mtp":
        if path[1] == "layer":
            return (f"mtp.layers.0.{_hf_local_name(path[2:], 'full_attention')}",)
        return ("mtp." + _hf_local_name(path[1:], "full_attention"),)
    if head == "lm_head":
        return ("lm_head.weight",)
    return (prefix + _hf_local_name(path, "full_attention"),)


def table(
    shapes: dict[tuple[str | int, ...], tuple[int, ...]], config: ModelConfig, prefix: str
) -> list[Entry]:
    """Entries for every parameter in `shapes` (our path → our shape), in a stable order."""
    entries = []
    for path, shape in sorted(shapes.items(), key=lambda kv: tuple(map(str, kv[0]))):
        kind, n_in = _kind(path, len(shape) - is_stacked(path))
        entries.append(
            Entry(tuple(path), hf_keys_for(path, config, prefix), tuple(shape), kind, n_in)
        )
    return entries
