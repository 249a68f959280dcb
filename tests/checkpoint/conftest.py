"""Random tiny HF checkpoints (transformers, many shards, MTP in its own file) and helpers."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (lets safe_open(framework="numpy") return bfloat16)
import pytest
import torch
from safetensors import safe_open

from qwenjax.checkpoint import hf_to_qwenjax
from tests.hf_models import make_hf_model, save_hf_checkpoint

LAYOUTS = ("text", "vlm")
DTYPES = ("float32", "bfloat16")
SIDE_FILES = {"tokenizer.json": '{"dummy": true}\n', "chat_template.jinja": "{{ messages }}\n"}


def read_all(directory: str | Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a HF directory as (dtype, shape, raw bytes), read with `safetensors`."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(directory / name, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                t = f.get_tensor(key)
                out[key] = (str(t.dtype), tuple(t.shape), t.tobytes())
    return out


@pytest.fixture(scope="session")
def hf_source(tmp_path_factory):
    """`hf_source(layout, dtype)` → (torch model, checkpoint dir with tokenizer-like side files).

    Like the top-level `hf_checkpoint`, plus bf16 models (cast before saving, MTP
    tensors included) and extra non-weight files that conversion must carry along.
    """
    cache = {}

    def make(layout: str = "text", dtype: str = "float32"):
        if (layout, dtype) not in cache:
            model = make_hf_model(layout).to(getattr(torch, dtype))
            path = tmp_path_factory.mktemp(f"hf_{layout}_{dtype}")
            save_hf_checkpoint(model, path)
            for name, text in SIDE_FILES.items():
                (path / name).write_text(text)
            cache[layout, dtype] = model, path
        return cache[layout, dtype]

    return make


@pytest.fixture(scope="session")
def converted(hf_source, tmp_path_factory):
    """`converted(layout, dtype)` → our checkpoint dir made from `hf_source(layout, dtype)`."""
    cache = {}

    def make(layout: str = "text", dtype: str = "float32") -> Path:
        if (layout, dtype) not in cache:
            dst = tmp_path_factory.mktemp(f"ours_{layout}_{dtype}") / "ckpt"
            cache[layout, dtype] = hf_to_qwenjax(hf_source(layout, dtype)[1], dst, progress=False)
        return cache[layout, dtype]

    return make
