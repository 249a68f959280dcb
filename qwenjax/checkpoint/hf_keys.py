"""The Hugging Face ⇄ qwenjax parameter table.

Every qwenjax parameter (a path in the NNX state) maps to one HF tensor, or — for the scanned
super-blocks, whose parameters carry a leading `[num_blocks]` axis — to one HF tensor per block.
Three transforms cover all tensors:

* `copy`:   same array (embeddings, norm weights, A_log, dt_bias).
* `linear`: HF `nn.Linear` weight `[out, in]` ⇄ our kernel `[in dims..., out dims...]`
            (`W.T` reshaped; `n_in` of our leading axes are the input).
* `conv`:   HF depthwise `Conv1d` weight `[C, 1, W]` ⇄ our `[W, C]`.

HF prefixes: the text-only layout (`Qwen3_5ForCausalLM`) uses `model.`; the VLM layout
(`Qwen3_5ForConditionalGeneration`) uses `model.language_model.`; `lm_head.` and `mtp.` are
top-level in both. `model.visual.*` belongs to the vision issue.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from qwenjax.config import LINEAR_ATTENTION, ModelConfig

TEXT_PREFIX = "model."
VLM_PREFIX = "model.language_model."
MIXER_NAMES = {LINEAR_ATTENTION: "linear_attn", "full_attention": "self_attn"}
# Our output projections take two input axes ([heads, head_dim]); every other kernel takes one.
TWO_INPUT_AXES = {"o_proj", "out_proj"}
BARE_HF_PARAMS = {"A_log", "dt_bias"}  # HF nn.Parameters without a ".weight" suffix


@dataclasses.dataclass(frozen=True)
class Entry:
    """One qwenjax parameter and the HF tensor(s) it is made of."""

    path: tuple[str | int, ...]  # path in the NNX Param state
    hf_keys: tuple[str, ...]  # one key, or one per stacked block (in block order)
    shape: tuple[int, ...]  # our shape, including the block axis when stacked
    kind: str  # "copy" | "linear" | "conv"
    n_in: int = 1

    @property
    def stacked(self) -> bool:
        return self.path[0] == "blocks"

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
        return s

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        """HF tensor → our slice (a view where possible; the caller copies into place)."""
        if self.kind == "linear":
            return w.T.reshape(self.our_slice_shape)
        if self.kind == "conv":
            return w[:, 0, :].T
        return w

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        """Our slice → HF tensor (C-contiguous, ready to write)."""
        s = self.our_slice_shape
        if self.kind == "linear":
            w = w.reshape(math.prod(s[: self.n_in]), math.prod(s[self.n_in :])).T
        elif self.kind == "conv":
            w = w.T[:, None, :]
        return np.ascontiguousarray(w)


def _hf_local_name(sub: Sequence[str | int], layer_type: str) -> str:
    """Name inside a decoder layer: ('mixer', 'q_norm', 'weight') → 'self_attn.q_norm.weight'."""
    names = [MIXER_NAMES[layer_type] if p == "mixer" else str(p) for p in sub]
    if names[-1] != "weight" and names[-1] not in BARE_HF_PARAMS:
        names.append("weight")
    return ".".join(names)


def _kind(path: Sequence[str | int], ndim: int) -> tuple[str, int]:
    leaf = str(path[-1])
    if leaf == "conv1d":
        return "conv", 1
    if leaf == "embed_tokens" or ndim == 1:
        return "copy", 1
    return "linear", 2 if leaf in TWO_INPUT_AXES else 1


def hf_keys_for(path: Sequence[str | int], config: ModelConfig, prefix: str) -> tuple[str, ...]:
    """The HF key(s) of one of our parameter paths."""
    head = path[0]
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
        stacked = path[0] == "blocks"
        kind, n_in = _kind(path, len(shape) - stacked)
        entries.append(
            Entry(tuple(path), hf_keys_for(path, config, prefix), tuple(shape), kind, n_in)
        )
    return entries
