"""Packed test batches, and the small hybrid model the training tests run on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.api import build
from qwenjax.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from qwenjax.model import Qwen35

# The tiny preset with a 2-layer period (GDN, attention) instead of 4: the same code paths
# (scan over blocks, both mixers, MTP head) at half the compile time of each train step.
SMALL = ModelConfig.from_preset("tiny").replace(
    num_hidden_layers=4, layer_types=(LINEAR_ATTENTION, FULL_ATTENTION) * 2
)


def packed_batch(seed: int, rows: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    """Rows of several packed documents, some followed by padding (segment 0, loss mask 0, token 0).

    Each document has a prompt (loss mask 0) and an answer (loss mask 1); positions restart at
    0 in every document; segment ids count documents from 1 within a row.
    """
    rng = np.random.default_rng(seed)
    names = ("input_ids", "segment_ids", "positions", "loss_mask")
    batch = {name: np.zeros((rows, seq_len), np.int32) for name in names}
    for row in range(rows):
        start, doc = 0, 1
        while start < seq_len - 6:
            length = int(rng.integers(4, seq_len // 2))
            end = min(start + length, seq_len - int(rng.integers(0, 4)))  # leave some padding
            prompt = int(rng.integers(1, max(2, end - start - 1)))
            batch["input_ids"][row, start:end] = rng.integers(3, vocab, end - start)
            batch["segment_ids"][row, start:end] = doc
            batch["positions"][row, start:end] = np.arange(end - start)
            batch["loss_mask"][row, start + prompt : end] = 1
            start, doc = end, doc + 1
    return batch


def documents(batch: dict[str, np.ndarray]) -> list[tuple[int, int, int]]:
    """`(row, start, end)` of every document (non-zero segment) in a packed batch."""
    docs = []
    for row, segments in enumerate(batch["segment_ids"]):
        for seg in np.unique(segments[segments > 0]):
            where = np.nonzero(segments == seg)[0]
            docs.append((row, int(where[0]), int(where[-1]) + 1))
    return docs


def random_model(config: ModelConfig, seed: int = 0, **build_kwargs) -> Qwen35:
    """`build(config, **build_kwargs)` with NumPy random values instead of JAX's initialisers.

    JAX's threefry initialisers take XLA tens of seconds to compile on CPU; these tests only
    need some fixed, well-scaled values: matrices N(0, 0.02²), vectors N(0, 0.1²) (norm
    weights, A_log, dt_bias), LoRA B zero (as `build` makes it).
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(build(config, abstract=True, **build_kwargs))

    def fill(path, leaf):
        names = [n for n in leaf.get_metadata()["out_sharding"] if n != "layers"]
        std = 0.02 if len(names) >= 2 else 0.1
        if path[-1].key == "b" and isinstance(leaf, nnx.LoRAParam):
            std = 0.0
        value = (rng.normal(size=leaf.shape) * std).astype(leaf.dtype)
        return leaf.replace(value=jnp.asarray(value))

    is_variable = lambda x: isinstance(x, nnx.Variable)
    state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=is_variable)
    return nnx.merge(graphdef, state)
