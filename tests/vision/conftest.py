"""A tiny random `Qwen3_5ForConditionalGeneration` whose image/video token ids are in its vocab.

The shared `hf_checkpoint("vlm")` model keeps the published ids (248056, …), far outside its
331-token vocab, so transformers cannot embed them; this one uses ids 300–303 and a vision tower
of odd sizes (3 blocks, width 40, head dim 20, a 5×5 position table). `Prompt` builds token rows
as the processor expands them; `hf_logits` runs transformers on them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from qwenjax.vision.model import VisionInputs
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
IMAGE, VIDEO = TOKEN_IDS["image_token_id"], TOKEN_IDS["video_token_id"]
START, END = TOKEN_IDS["vision_start_token_id"], TOKEN_IDS["vision_end_token_id"]


class Prompt:
    """Builds token rows the way the processor expands them (text ids below 290)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.images, self.videos = [], []

    def text(self, n: int) -> list[int]:
        return [int(i) for i in self.rng.integers(0, 290, n)]

    def image(self, h: int, w: int) -> list[int]:
        self.images.append((1, h, w))
        return [START] + [IMAGE] * (h * w // 4) + [END]

    def video(self, t: int, h: int, w: int) -> list[int]:
        """Per temporal patch: "<x.x seconds>" (here 3 text ids) + start + pads + end, all
        inside the template's own start/end pair (transformers replaces only the pad)."""
        self.videos.append((t, h, w))
        ids = [START]
        for _ in range(t):
            ids += self.text(3) + [START] + [VIDEO] * (h * w // 4) + [END]
        return [*ids, END]

    def batch(self, rows: list[list[int]], *, left_pad: bool = False):
        """ids [B, T] padded with text, the attention mask, and the grids (None when empty)."""
        width = max(map(len, rows))
        ids, mask = [], []
        for row in rows:
            pad = self.text(width - len(row))
            ids.append(pad + row if left_pad else row + pad)
            real = [1] * len(row)
            mask.append([0] * len(pad) + real if left_pad else real + [1] * len(pad))
        grid = lambda g: np.array(g, np.int64) if g else None
        return np.array(ids), np.array(mask), grid(self.images), grid(self.videos)


def row(seed: int, build) -> tuple[list[int], VisionInputs | None]:
    """One prompt and its own images / videos (random patches)."""
    p = Prompt(seed)
    ids = build(p)
    images = np.array(p.images, np.int64) if p.images else None
    videos = np.array(p.videos, np.int64) if p.videos else None
    if images is None and videos is None:
        return ids, None
    return ids, VisionInputs(patches(images, seed), images, patches(videos, seed + 1), videos)


def hf_logits(hf, ids, **inputs) -> np.ndarray:
    kinds = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    inputs = {k: torch.from_numpy(v) for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy(kinds), **inputs
        )
    return out.logits.numpy()


def patches(grid, seed: int) -> np.ndarray | None:
    if grid is None:
        return None
    n = int(grid.prod(axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, 1536)).astype(np.float32)


def make_vlm(seed: int = 0, token_ids: dict = TOKEN_IDS):
    cfg = transformers.Qwen3_5Config(
        text_config=TEXT_KW,
        vision_config={**VISION_KW, "out_hidden_size": TEXT_KW["hidden_size"]},
        **token_ids,
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


# The pixel budget of the chat checkpoint: images of at most 12 LLM tokens (48 patches).
CHAT_PREPROCESSOR = {"size": {"shortest_edge": 1024, "longest_edge": 12_288}}


def write_chat_vlm(directory) -> str:
    """A VLM checkpoint directory that chats: the tiny byte-level tokenizer (whose vision ids
    are 265/266/268/269), a small pixel budget in preprocessor_config.json, a random model."""
    from qwenjax.testing.tiny_data import save_tiny_tokenizer

    tokenizer = save_tiny_tokenizer(directory)
    ids = {key: tokenizer_id(tokenizer, token) for key, token in CHAT_TOKENS.items()}
    save_hf_checkpoint(make_vlm(seed=5, token_ids=ids), tokenizer)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        (tokenizer / name).write_text(json.dumps(CHAT_PREPROCESSOR))
    return str(tokenizer)


@pytest.fixture(scope="session")
def chat_vlm(tmp_path_factory):
    return write_chat_vlm(tmp_path_factory.mktemp("chat_vlm"))


CHAT_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def tokenizer_id(directory, token: str) -> int:
    from qwenjax.tokenizer import Tokenizer

    return Tokenizer.from_dir(directory).token_to_id(token)
